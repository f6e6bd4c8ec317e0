"""int8 for the ONNX Runtime CPU target (issue 21): the UNet's plain ONNX graph quantized with
ONNX Runtime's dynamic quantization (int8 weights, activations quantized per call), against the
float32 graphs, side by side in one process on the same pipeline (only the UNet session is
swapped): seconds per generation (medians of interleaved runs) and the image's PSNR against the
float32 plain graph's image of the same seed.

    python benchmarks/ort_int8.py [--model random:sd15] [--size 256] [--steps 10] [--repeat 2]

Writes benchmarks/results/ort-int8-<date>.json. On random weights the PSNR says how far int8
moves the image of an untrained network, not of a trained one; the speed is what it is.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:sd15")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--engine-dir", default="engines/sd15-cpu-quick")
    ap.add_argument("--ops", nargs="+", default=["MatMul"], help="operator types to quantize (MatMul, Conv)")
    ap.add_argument("--winograd-int8", action="store_true",
                    help="also quantize sdrt's Winograd-rewritten UNet (its GEMMs are MatMuls too)")
    args = ap.parse_args(argv)
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import sdrt
    from sdrt.bench import machine, versions, write_result
    from sdrt.bench.openvino_peer import export_graphs
    from sdrt.paths import cache_root

    pipe = sdrt.Pipeline.from_pretrained(args.model, backend="onnxruntime", engine_dir=args.engine_dir)
    be = pipe.backend
    plain_dir = cache_root() / "peers" / "openvino" / pipe.components.model_hash    # the same plain graphs
    plain = export_graphs(pipe.components, plain_dir, log=print)["unet"]
    with tempfile.TemporaryDirectory(dir=plain_dir) as tmp:
        int8 = Path(tmp) / "unet-int8.onnx"
        t0 = time.perf_counter()
        quantize_dynamic(str(plain), str(int8), weight_type=QuantType.QInt8, op_types_to_quantize=args.ops,
                         use_external_data_format=True)
        quantize_s = time.perf_counter() - t0
        extra = {}
        if args.winograd_int8:
            wq = Path(tmp) / "unet-winograd-int8.onnx"
            import onnx  # the ORT-optimised graph has contrib operators shape inference cannot type
            quantize_dynamic(be._paths["unet"], str(wq), weight_type=QuantType.QInt8, op_types_to_quantize=args.ops,
                             use_external_data_format=True,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            extra[f"int8 dynamic ({'+'.join(args.ops)}) of the Winograd graph"] = str(wq)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions = {"winograd (sdrt's)": be.sessions["unet"],
                    "float32 plain": ort.InferenceSession(str(plain), opts, providers=["CPUExecutionProvider"]),
                    f"int8 dynamic ({'+'.join(args.ops)})": ort.InferenceSession(str(int8), opts,
                                                                                  providers=["CPUExecutionProvider"])}
        sessions.update({name: ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
                         for name, path in extra.items()})
        gen = dict(prompt="a photo of an astronaut riding a horse on mars", steps=args.steps, seed=1,
                   width=args.size, height=args.size, sampler="Euler", schedule="Karras", rng="cpu")
        runs = {n: [] for n in sessions}
        pixels = {}
        for sess in sessions.values():               # warm-up: one short generation each
            be.sessions["unet"], be._bindings = sess, {}
            pipe(**dict(gen, steps=2))
        for i in range(args.repeat):
            for name, sess in sessions.items():
                be.sessions["unet"], be._bindings = sess, {}
                t0 = time.perf_counter()
                pixels[name] = pipe(**gen).pixels
                runs[name].append(time.perf_counter() - t0)
                print(f"{name}: run {i + 1}/{args.repeat}: {runs[name][-1]:.2f} s", flush=True)
    ref = pixels["float32 plain"].astype(np.float64)
    rows = {}
    for name, ts in runs.items():
        mse = float(np.mean((pixels[name] - ref) ** 2))
        rows[name] = dict(median_s=statistics.median(ts), runs=ts,
                          psnr_db_vs_float32_plain=float("inf") if mse == 0 else 10 * np.log10(1 / mse),
                          max_abs_diff=float(np.abs(pixels[name] - ref).max()))
    base = rows["float32 plain"]["median_s"]
    for name, r in rows.items():
        r["speedup_vs_float32_plain"] = base / r["median_s"]
        print(f"{name:28s} {r['median_s']:7.2f} s  x{r['speedup_vs_float32_plain']:.3f}  "
              f"PSNR {r['psnr_db_vs_float32_plain']:.1f} dB")
    write_result("ort-int8", dict(model=args.model, size=args.size, steps=args.steps, repeat=args.repeat,
                                  ops=args.ops, quantize_seconds=quantize_s, rows=rows, machine=machine(),
                                  versions=versions()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
