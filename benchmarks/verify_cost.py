"""The cost of verifying an engine folder in full at load (every byte of every artifact hashed,
once per process), beside its size:

    sdrt build random:sd15 --out /tmp/sd15eng
    python benchmarks/verify_cost.py /tmp/sd15eng

Writes benchmarks/results/verify-cost-<date>.json with the machine it ran on.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from sdrt.bench import write_result
from sdrt.export import build as build_module


def measure(folder: Path, repeat: int = 2) -> dict:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name not in ("manifest.json", ".lock"))
    size = sum(p.stat().st_size for p in files)
    runs = []
    for _ in range(repeat):
        build_module._DIGESTS.clear()           # as a new process would
        t = time.perf_counter()
        for p in files:
            build_module.file_digest(p)
        runs.append(time.perf_counter() - t)
    t = time.perf_counter()
    for p in files:
        build_module.file_digest(p)
    cached = time.perf_counter() - t
    row = {"folder": str(folder), "files": len(files), "bytes": size, "seconds": runs,
           "gb_per_s": [size / s / 1e9 for s in runs], "seconds_again_in_process": cached}
    print(f"{len(files)} files, {size / 2**30:.2f} GiB: {', '.join(f'{s:.2f}' for s in runs)} s "
          f"({size / min(runs) / 1e9:.2f} GB/s); again in the same process {cached * 1e3:.2f} ms")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    write_result("verify-cost", measure(args.folder, args.repeat))


if __name__ == "__main__":
    main()
