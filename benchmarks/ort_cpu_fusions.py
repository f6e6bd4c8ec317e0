"""ONNX Runtime's transformer-optimizer fusions that have CPU kernels (attention ->
Attention/MultiHeadAttention, LayerNorm, SkipLayerNorm; not GroupNorm, BiasSplitGelu, NhwcConv,
which are CUDA-only) on the SD 1.5 UNet, against sdrt's CPU artifact (ORT extended
optimisations only), one UNet call each, interleaved (issue 4's 1.5x target).

    python benchmarks/ort_cpu_fusions.py [--work DIR] [--repeat 3]

Exports random:sd15's UNet once into DIR (default /tmp/sdrt-ort-fusions, ~10 GB for the three
copies) and writes benchmarks/results/ort-cpu-fusions-<date>.json.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

CUDA_ONLY = ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_bias_add",
             "enable_nhwc_conv", "enable_packed_qkv", "enable_packed_kv", "enable_qordered_matmul")


def main(argv=None) -> int:
    import onnxruntime as ort
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from sdrt.bench import write_result
    from sdrt.export.build import _patch_ort_attention_fusion, ort_offline_optimize
    from sdrt.export.onnx_export import export_onnx, files_of, save_onnx
    from sdrt.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/sdrt-ort-fusions")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    root = Path(args.work)
    plain = root / "plain" / "unet.onnx"
    if not plain.exists():
        export_onnx(load_model("random:sd15"), "unet", plain)

    def variant(name: str, fuse: bool) -> tuple[Path, dict]:
        d = root / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for f in files_of(plain):
            shutil.copy(f, d / f.name)
        p, stats = d / "unet.onnx", {}
        if fuse:                                   # on the exported graph, before ORT's own fusions
            _patch_ort_attention_fusion()
            opts = FusionOptions("unet")
            for k in CUDA_ONLY:
                setattr(opts, k, False)
            m = optimize_model(str(p), model_type="unet", num_heads=0, hidden_size=0, opt_level=0, use_gpu=False,
                               optimization_options=opts)
            stats = {k: int(v) for k, v in m.get_fused_operator_statistics().items() if v}
            save_onnx(m.model, p)
        ort_offline_optimize(p)
        return p, stats

    built = {"ort-extended (sdrt's CPU artifact)": variant("base", False),
             "CPU fusions + ort-extended": variant("fused", True)}
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 32, 32), dtype=np.float32),
             "timestep": np.full((2,), 500.0, dtype=np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}
    sessions = {}
    for name, (p, _) in built.items():
        o = ort.SessionOptions()
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions[name] = ort.InferenceSession(str(p), o, providers=["CPUExecutionProvider"])
    times, outs = {n: [] for n in sessions}, {}
    for i in range(args.repeat + 1):                # the first round warms up
        for name, s in sessions.items():
            t0 = time.perf_counter()
            outs[name] = s.run(None, feeds)[0]
            if i:
                times[name].append(time.perf_counter() - t0)
    a, b = outs.values()
    med = {n: statistics.median(v) for n, v in times.items()}
    base, fused = med.values()
    print(f"UNet call (256x256, CFG batch 2): {', '.join(f'{n} {t:.3f} s' for n, t in med.items())}: "
          f"x{base / fused:.3f}; max|diff| {np.abs(a - b).max():.1e}")
    write_result("ort-cpu-fusions", dict(median_s=med, runs=times, speedup=base / fused,
                                         fused_operators={n: s for n, (_, s) in built.items()},
                                         max_abs_diff=float(np.abs(a - b).max()), repeat=args.repeat))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
