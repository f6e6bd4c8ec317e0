"""Runtime-core benchmark: the denoising loop's own overhead per step (everything but the
UNet) on random:tiny, for several samplers. (Backends against diffusers: ``sdrt bench``.)

    python benchmarks/core.py overhead

Writes benchmarks/results/core-overhead-<date>.json with the machine it ran on.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path


import sdrt
from sdrt.bench import Settings, machine, run_benchmark

RESULTS = Path(__file__).parent / "results"


def overhead(steps=20, repeat=5) -> dict:
    """Per-step time of everything but the UNet (sampler math, CFG, input scaling, noise), as
    ``sdrt bench`` measures it (the loop's time minus the time inside the UNet), per sampler."""
    rows = {}
    for sampler in ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "Heun", "UniPC", "DDIM"]:
        s = Settings(model="random:tiny", backends=("torch",), references=(), steps=steps, height=64, width=64,
                     repeat=repeat, warmup=1, sampler=sampler, schedule="Automatic")
        row = run_benchmark(s, log=lambda m: None)["rows"][0]
        per_run = [r["loop_overhead"] / steps for r in row["runs"]]
        rows[sampler] = {"overhead_ms_per_step_median": 1e3 * statistics.median(per_run),
                         "overhead_ms_per_step_min": 1e3 * min(per_run), "unet_calls_per_run": row["unet_calls"]}
        print(f"{sampler:14s} loop overhead {rows[sampler]['overhead_ms_per_step_median']:.3f} ms/step "
              f"(min {rows[sampler]['overhead_ms_per_step_min']:.3f})")
    return {"model": "random:tiny", "size": "64x64", "steps": steps, "repeat": repeat, "samplers": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["overhead"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    data = overhead(args.steps, args.repeat)
    data.update(machine=machine(), sdrt=sdrt.__version__, date=datetime.datetime.now().isoformat(timespec="seconds"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"core-{args.what}-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(data, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
