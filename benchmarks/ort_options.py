"""ONNX Runtime CPU session options on one UNet call (issue 4's 1.5x target): optimisation level,
threads, spinning, denormals. Needs an engine folder from `sdrt build random:sd15 --backend
onnxruntime --out DIR` (256x256 in its profile).

    python benchmarks/ort_options.py DIR [--repeat 3]

Writes benchmarks/results/ort-session-options-<date>.json.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    import onnxruntime as ort

    from sdrt.bench import write_result
    ap = argparse.ArgumentParser()
    ap.add_argument("engine_dir")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    path = str(Path(args.engine_dir) / "unet.onnx")
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 32, 32), dtype=np.float32),
             "timestep": np.full((2,), 500.0, dtype=np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}
    configs = {"ORT_ENABLE_ALL (sdrt's setting)": {}, "ORT_ENABLE_EXTENDED": dict(level="EXTENDED"),
               "2 threads, no spinning": dict(threads=2, spin="0"), "2 threads": dict(threads=2),
               "1 thread": dict(threads=1), "denormals as zero": dict(dnz=True)}

    def make(level="ALL", threads=0, spin=None, dnz=False):
        o = ort.SessionOptions()
        o.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
        o.intra_op_num_threads = threads
        if spin is not None:
            o.add_session_config_entry("session.intra_op.allow_spinning", spin)
        if dnz:
            o.add_session_config_entry("session.set_denormal_as_zero", "1")
        t = time.perf_counter()
        s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
        return s, time.perf_counter() - t

    sessions, load = {}, {}
    for name, c in configs.items():
        sessions[name], load[name] = make(**c)
        sessions[name].run(None, feeds)                          # warm-up
    runs = {name: [] for name in configs}
    for _ in range(args.repeat):                                 # interleaved
        for name, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds)
            runs[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in runs.items()}
    for k in configs:
        print(f"{k:34s} {med[k]:.3f} s  (load {load[k]:.1f} s)")
    write_result("ort-session-options", dict(engine_dir=args.engine_dir, repeat=args.repeat, median_s=med,
                                             runs_s=runs, session_load_s=load))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
