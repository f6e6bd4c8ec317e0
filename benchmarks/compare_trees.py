"""Two source trees side by side in one run: did a change of the code change its speed?

    git worktree add /tmp/before <commit>
    python benchmarks/compare_trees.py /tmp/before . --rounds 3

Each round runs the loop-overhead benchmark (``benchmarks/core.py``'s measurement: everything
but the UNet, per step, on random:tiny) and one end-to-end generation timing in a fresh
process per tree, alternating trees so that a drift of the machine is shared. Writes
benchmarks/results/compare-trees-<date>.json with the per-tree medians and their ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# run inside each tree's own sdrt (PYTHONPATH): prints one JSON line
PROBE = r"""
import json, statistics, time, sdrt
from sdrt.bench import Settings, run_benchmark
steps, out = STEPS, {"version": sdrt.__version__, "overhead_ms": {}, "total_s": {}}
for sampler in ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "Heun", "DDIM"]:
    s = Settings(model="random:tiny", backends=("torch",), references=(), steps=steps, height=64, width=64,
                 repeat=REPEAT, warmup=1, sampler=sampler, schedule="Automatic")
    row = run_benchmark(s, log=lambda m: None)["rows"][0]
    out["overhead_ms"][sampler] = 1e3 * statistics.median(r["loop_overhead"] / steps for r in row["runs"])
    out["total_s"][sampler] = statistics.median(r["total"] for r in row["runs"])
print(json.dumps(out))
"""


def run_tree(tree: Path, steps: int, repeat: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    code = PROBE.replace("STEPS", str(steps)).replace("REPEAT", str(repeat))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tree)
    if proc.returncode:
        raise RuntimeError(f"{tree}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    runs = {"before": [], "after": []}
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for name in order:
            runs[name].append(run_tree(getattr(args, name).resolve(), args.steps, args.repeat))
            print(f"round {r + 1}: {name} ({runs[name][-1]['version']}) done", flush=True)
    samplers = list(runs["before"][0]["overhead_ms"])
    table = {}
    for s in samplers:
        row = {}
        for key in ("overhead_ms", "total_s"):
            b = statistics.median(x[key][s] for x in runs["before"])
            a = statistics.median(x[key][s] for x in runs["after"])
            row[key] = {"before": b, "after": a, "after_over_before": a / b}
        table[s] = row
        print(f"{s:14s} overhead {row['overhead_ms']['before']:.3f} -> {row['overhead_ms']['after']:.3f} ms/step "
              f"({row['overhead_ms']['after_over_before']:.2f}x); total {row['total_s']['before']:.3f} -> "
              f"{row['total_s']['after']:.3f} s ({row['total_s']['after_over_before']:.2f}x)")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from sdrt.bench import write_result
    write_result("compare-trees", {"before": str(args.before), "after": str(args.after), "rounds": args.rounds,
                                   "steps": args.steps, "repeat": args.repeat, "model": "random:tiny, 64x64",
                                   "samplers": table, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
