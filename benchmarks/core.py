"""Runtime-core benchmark: the denoising loop's own overhead per step (everything but the
UNet) on random:tiny, for several samplers. (Backends against diffusers: ``sdrt bench``.)

    python benchmarks/core.py overhead

Writes benchmarks/results/core-overhead-<date>.json with the machine it ran on.
"""
from __future__ import annotations

import argparse
import statistics

from sdrt.bench import Settings, run_benchmark, write_result


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
    write_result(f"core-{args.what}", overhead(args.steps, args.repeat))


if __name__ == "__main__":
    main()
