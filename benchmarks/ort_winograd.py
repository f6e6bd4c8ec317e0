"""One 3x3 convolution on ONNX Runtime's CPU provider: direct against the Winograd rewrite
F(2, 3) and F(4, 3) (export/winograd.py), side by side, at Stable Diffusion 1.5's layer shapes
for a 256x256 request (UNet with CFG: batch 2; VAE decoder: batch 1). Timed runs interleaved
round robin after a warm-up; medians. Also reports the max relative error against the direct
convolution and the weight size of each.

    python benchmarks/ort_winograd.py [--repeat 15]
    python benchmarks/ort_winograd.py --engines DIRECT_DIR WINOGRAD_DIR [--repeat 5]

With ``--engines`` (two engine folders of the same model, built with and without
``--no-winograd``) it times whole networks instead: the UNet (CFG batch 2) and the VAE
decoder at 256x256 from both folders, interleaved, with the max abs difference of their outputs.

Writes benchmarks/results/ort-winograd-<date>.json (ort-winograd-networks-<date>.json with
``--engines``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# (network, batch, in channels, out channels, height = width)
SHAPES = [
    ("unet", 2, 320, 320, 32), ("unet", 2, 640, 640, 16), ("unet", 2, 1280, 1280, 8), ("unet", 2, 1280, 1280, 4),
    ("unet", 2, 2560, 1280, 8), ("unet", 2, 960, 320, 32),
    ("vae_decoder", 1, 512, 512, 32), ("vae_decoder", 1, 512, 512, 64), ("vae_decoder", 1, 256, 256, 128),
    ("vae_decoder", 1, 128, 128, 256),
]


def _session_options():
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # sessions run in turn: without this, each one's idle threads spin on the cores the next one
    # needs (the direct convolution measured 3x slower that way)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def main(argv=None) -> int:
    import onnx
    import onnxruntime as ort
    from test_winograd import conv_model

    from sdrt.bench import write_result
    from sdrt.export import winograd

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--engines", nargs=2, default=None, metavar=("DIRECT_DIR", "WINOGRAD_DIR"))
    args = ap.parse_args(argv)
    if args.engines:
        return whole_networks(args)
    opts = _session_options()
    rows = []
    for net, n, c, k, hw in SHAPES:
        direct = conv_model(c, k, seed=c + k)
        variants = {"direct": direct}
        for m in winograd.TILES:
            rewritten = onnx.ModelProto()
            rewritten.CopyFrom(direct)
            winograd.rewrite_convolutions(rewritten, tile=lambda ci, ko, m=m: m)
            variants[f"F({m},3)"] = rewritten
        x = np.random.default_rng(hw).standard_normal((n, c, hw, hw)).astype(np.float32)
        sessions = {name: ort.InferenceSession(mod.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                    for name, mod in variants.items()}
        outs = {name: s.run(None, {"x": x})[0] for name, s in sessions.items()}
        times = {name: [] for name in sessions}
        for _ in range(args.repeat):
            for name, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {"x": x})
                times[name].append(time.perf_counter() - t)
        ref = outs["direct"]
        row = dict(network=net, batch=n, channels_in=c, channels_out=k, size=hw, default_tile=winograd.default_tile(c, k))
        for name in sessions:
            med = statistics.median(times[name])
            weights = sum(t.ByteSize() for t in variants[name].graph.initializer)
            row[name] = dict(ms=1e3 * med, speedup=statistics.median(times["direct"]) / med,
                             rel_error=float(np.abs(outs[name] - ref).max() / np.abs(ref).max()),
                             weight_mib=weights / 2 ** 20)
        rows.append(row)
        print(f"{net:12s} {n}x{c}->{k} {hw}x{hw}: " + "; ".join(
            f"{name} {r['ms']:.2f} ms x{r['speedup']:.2f} err {r['rel_error']:.1e}"
            for name, r in ((nm, row[nm]) for nm in sessions)), flush=True)
    write_result("ort-winograd", dict(repeat=args.repeat, rows=rows))
    return 0


def whole_networks(args) -> int:
    """The UNet and VAE decoder of two engine folders (direct, Winograd) side by side."""
    import onnxruntime as ort

    from sdrt.bench import write_result
    from sdrt.export import Profile, read_manifest
    from sdrt.export.onnx_export import smallest_inputs
    from sdrt.export.specs import ModelDims

    dirs = dict(zip(("direct", "winograd"), map(Path, args.engines)))
    manifests = {k: read_manifest(d) for k, d in dirs.items()}
    at_256 = Profile(height=(256, 512, 1024), width=(256, 512, 1024))     # SD 1.5's sizes
    feeds = {net: smallest_inputs(ModelDims(latent_factor=8), net, at_256) for net in ("unet", "vae_decoder")}
    opts = _session_options()
    rows = {}
    for net, feed in feeds.items():
        sessions = {k: ort.InferenceSession(str(d / manifests[k]["networks"][net]["file"]), opts,
                                            providers=["CPUExecutionProvider"]) for k, d in dirs.items()}
        outs = {k: s.run(None, feed)[0] for k, s in sessions.items()}
        times = {k: [] for k in sessions}
        for _ in range(args.repeat):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows[net] = dict(seconds=med, runs=times, speedup=med["direct"] / med["winograd"],
                         max_abs_diff=float(np.abs(outs["direct"] - outs["winograd"]).max()),
                         winograd=manifests["winograd"]["networks"][net].get("winograd"),
                         size_mib={k: sum(f["size"] for f in m["networks"][net]["files"]) / 2 ** 20
                                   for k, m in manifests.items()})
        del sessions
        print(f"{net}: direct {med['direct']:.3f} s, Winograd {med['winograd']:.3f} s: x{rows[net]['speedup']:.2f}, "
              f"max|diff| {rows[net]['max_abs_diff']:.1e}, {rows[net]['size_mib']['direct']:.0f} -> "
              f"{rows[net]['size_mib']['winograd']:.0f} MiB", flush=True)
    write_result("ort-winograd-networks", dict(repeat=args.repeat, engines=args.engines, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
