"""The GPU suite: on a machine with a CUDA GPU, time sdrt's torch backend (float16, eager) and
diffusers on random:sd15 at 512x512, 50 steps, batch 1, and write the JSON and the chart to
benchmarks/results/. Installs nothing; refuses on a machine without a GPU.

    python benchmarks/gpu/run.py [--repeat 3] [--steps 50]
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent.parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu/run.py: refusing to run: no CUDA GPU is visible on this machine "
              "(torch.cuda.is_available() is False); use `sdrt bench --suite cpu-quick` on a CPU", file=sys.stderr)
        return 2
    from sdrt.bench import Settings, chart, format_table, run_benchmark

    t0 = time.perf_counter()
    s = Settings(model="random:sd15", backends=("torch",), references=("diffusers",), steps=args.steps,
                 height=args.size, width=args.size, batch=1, repeat=args.repeat, warmup=1, sampler="Euler",
                 schedule="Karras", dtype="float16", device="cuda")
    record = run_benchmark(s, log=lambda m: print(m, file=sys.stderr, flush=True))
    record["suite"] = "gpu"
    record["wall_seconds"] = time.perf_counter() - t0
    card = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
    stem = Path(args.out) / f"gpu-{card}-{datetime.date.today().isoformat()}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(record, indent=2, default=float))
    chart(record, f"{stem}.png")
    print(format_table(record))
    print(f"wrote {stem}.json and {stem}.png in {record['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
