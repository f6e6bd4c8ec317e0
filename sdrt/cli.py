"""The ``sdrt`` command line: ``sdrt generate``, ``sdrt build``, ``sdrt bench``, ``sdrt serve``,
``sdrt interrogate``, ``sdrt info``."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _generate(args) -> int:
    from tqdm import tqdm

    from . import Pipeline
    from .params import from_arguments

    pipe = Pipeline.from_pretrained(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                                    engine_dir=args.engine_dir, fast_path=args.fast_path,
                                    tune=dict(channels_last=args.channels_last, compile=args.compile,
                                              quantize=args.quantize),
                                    lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir, vae_dir=args.vae_dir)
    native = pipe.components.native_size
    params = from_arguments(args, width=native, height=native)    # the model's own size by default
    bar = tqdm(total=params.steps, unit="step", desc="sampling", disable=args.quiet)

    def progress(step, total):
        bar.total = total
        bar.update(step - bar.n)

    try:
        result = pipe(params, callback=progress)
    finally:
        bar.close()
        pipe.close()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i in range(len(result.images)):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i:02d}{out.suffix}")
        result.save(path, i)
        print(f"wrote {path} (seed {result.seeds[i]})")
    t = result.timings
    print(f"text encoder {t['text_encoder']:.3f} s, denoising {t['loop']:.3f} s, "
          f"vae {t['vae']:.3f} s, total {t['total']:.3f} s")
    return 0


def _interrogate(args) -> int:
    import time

    from .interrogator import InterrogateOptions, Interrogator
    from .options import from_arguments

    options = from_arguments(InterrogateOptions, args)
    t0 = time.perf_counter()
    it = Interrogator.from_pretrained(args.model, clip=args.clip, blip=args.blip, backend=args.backend,
                                      device=args.device, engine_dir=args.engine_dir, lists=args.lists,
                                      options=options)
    loaded = time.perf_counter() - t0
    try:
        for image in args.images:
            print(it.interrogate(image, mode=args.mode), flush=True)
    finally:
        it.close()
    if not args.quiet:
        t = it.timings
        print(f"load {loaded:.2f} s, caption {t.get('caption', 0.0):.3f} s, ranking {t['rank']:.3f} s, "
              f"total {t['total']:.3f} s (last image)", file=sys.stderr)
    return 0


def _build(args) -> int:
    import time

    from .export import Profile, build_onnxruntime
    from .export.specs import default_networks, default_profile, network_specs
    from .models import load_model

    if args.backend == "tensorrt":
        from .export.tensorrt import require_tensorrt
        require_tensorrt()         # before loading weights: a clear message naming the package
    elif args.backend != "onnxruntime":
        raise ValueError(f"backend {args.backend!r} cannot be built; valid: onnxruntime, tensorrt")
    print(f"loading {args.model} ...", flush=True)
    components = load_model(args.model)
    if args.networks == "all":
        networks = tuple(network_specs(components.is_sdxl))
    elif args.networks is None:
        networks = default_networks(components.is_sdxl)
    else:
        networks = tuple(n.strip() for n in args.networks.split(","))
    base = default_profile(components.latent_factor, components.native_size)
    windows = (1, 1, args.max_windows) if args.max_windows else None
    profile = Profile.parse(args.min, args.opt, args.max, windows=windows, default=base)
    print(f"profile: {profile.describe()}")
    started = {}

    def on_stage(name, stage):
        now = time.perf_counter()
        started.setdefault(name, now)
        print(f"  {name:12s} {stage} ... ({now - started[name]:.1f} s)", flush=True)

    if args.backend == "tensorrt":
        from .export.tensorrt import BuildOptions, build_tensorrt
        precision = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[args.dtype]
        manifest = build_tensorrt(components, args.out, profile=profile, networks=networks, force=args.force,
                                  options=BuildOptions(precision=precision, refit=args.refit, tiling=args.tiling,
                                                       timing_cache=str(Path(args.out) / "timing.cache")),
                                  target=args.target or "native", log=lambda m: print(f"  {m}", flush=True),
                                  on_progress=lambda phase, i, n: print(f"  {phase}: {i}/{n}", flush=True))
    else:
        manifest = build_onnxruntime(components, args.out, precision=args.dtype, profile=profile, networks=networks,
                                     force=args.force, log=lambda m: print(f"  {m}", flush=True), on_stage=on_stage,
                                     target=args.target or "cpu", winograd=args.winograd, tiling=args.tiling)
    _print_table(manifest, networks)
    return 0


def _print_table(manifest, networks=None):
    from .export.specs import Profile

    rows = [("network", "precision", "size MiB", "build s", "profile")]
    for name, e in manifest["networks"].items():
        if networks and name not in networks:
            continue
        size = sum(f["size"] for f in e["files"]) / 2 ** 20
        rows.append((name, e["key"]["precision"], f"{size:.1f}", f"{sum(e.get('build_seconds', {}).values()):.1f}",
                     Profile.from_json(e["profile"]).describe()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def _info(args) -> int:
    from .export.build import check_artifact, read_manifest

    manifest = read_manifest(Path(args.dir))
    if not manifest["networks"]:
        raise ValueError(f"{args.dir} holds no engines (no readable {Path(args.dir) / 'manifest.json'})")
    print(f"{args.dir}: model {manifest.get('model')} (weights {manifest.get('model_hash')}), "
          f"backend {manifest.get('backend')}")
    _print_table(manifest)
    for name, e in manifest["networks"].items():
        check = check_artifact(Path(args.dir), e, e["key"])
        v = e["key"]["versions"]
        state = 'ok' if check.ok else 'NEEDS REBUILD: ' + check.reason
        if manifest.get("backend") == "tensorrt":
            t = e.get("target", {})
            print(f"{name}: {state}; {t.get('arch')}, TensorRT {t.get('tensorrt')}, {e['key']['optimization']}, "
                  f"{'static' if e.get('static') else 'dynamic'} profile, built {e.get('built_at')}")
            continue
        print(f"{name}: {state}; target {e['key']['target']}, "
              f"opset {e['key']['opset']}, {e['key']['optimization']}, built {e['built_at']} with onnxruntime "
              f"{v.get('onnxruntime')}, torch {v.get('torch')}")
        if e.get("fused_operators"):
            print(f"  fused: {', '.join(f'{k} {v}' for k, v in e['fused_operators'].items())}")
        if e.get("winograd"):
            print(f"  Winograd convolutions: {', '.join(f'{k} {v}' for k, v in e['winograd'].items())}")
    return 0


def _bench(args) -> int:
    from .bench import main_bench
    return main_bench(args)


def _serve(args) -> int:
    from .options import from_arguments
    from .serving.config import ServerConfig
    from .serving.deploy import Scaling, run
    config = from_arguments(ServerConfig, args, channels_last=args.channels_last, compile=args.compile,
                            quantize=args.quantize)
    run(config, host=args.host, port=args.port, scaling=from_arguments(Scaling, args), use_ray=not args.no_ray,
        ray_address=args.ray_address)
    return 0


def _speed_options(p: argparse.ArgumentParser) -> None:
    """The torch backend's speed options (Pipeline.tune), for generate and serve."""
    p.add_argument("--channels-last", action="store_true",
                   help="torch backend: UNet and VAE weights in NHWC (1.17x per UNet call at batch 1 on an H200, "
                        "0.97x at batch 4)")
    p.add_argument("--compile", default=None, metavar="MODE",
                   help="torch backend: the UNet under torch.compile(mode=MODE), e.g. default; compiles on first "
                        "use (45 s for SD 1.5 on a 16-core host); 1.6x per UNet call on an H200")
    p.add_argument("--quantize", default=None, choices=["fp8"],
                   help="torch backend: the UNet's transformer-block linear layers in float8 e4m3 (GPUs of compute "
                        "capability 8.9+: Ada, Hopper; best with --compile); see docs/fastpath.md")


def _model_options(p: argparse.ArgumentParser) -> None:
    """Which model runs where, for generate (serve takes them from ServerConfig)."""
    p.add_argument("--model", default="random:tiny", help="a checkpoint (.safetensors/.ckpt), a diffusers folder, "
                   "or random:tiny, random:sd15, random:sdxl, ...")
    p.add_argument("--lora-dir", default=None, help="the folder of the LoRAs prompts name (<lora:NAME:0.8>)")
    p.add_argument("--embeddings-dir", default=None, help="the folder of the textual-inversion embeddings prompts name")
    p.add_argument("--vae-dir", default=None, help="the folder of the VAE files --vae may name (a path works without it)")
    p.add_argument("--backend", default="torch", help="torch, onnxruntime or tensorrt")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", help="float32 or float16")
    p.add_argument("--engine-dir", default=None, help="the engine folder (compiled backends; default: in the cache)")
    p.add_argument("--fast-path", action="store_true",
                   help="static loop: per-step tables, fused step kernel, one CUDA graph on a GPU")
    _speed_options(p)


def _add_generate(sub) -> None:
    from .params import add_arguments
    g = sub.add_parser("generate", help="generate images from a prompt and write PNGs with infotext")
    # the generation arguments, from sdrt.GenerationParams
    add_arguments(g, defaults=dict(width="the model's size", height="the model's size"))
    _model_options(g)
    g.add_argument("--init-image", dest="init_images", action="append", default=argparse.SUPPRESS, metavar="PATH",
                   help="img2img: start from this image (repeat for one per image of the batch); see --strength, "
                        "--resize-mode")
    g.add_argument("--mask", dest="mask", default=argparse.SUPPRESS, metavar="PATH",
                   help="inpainting: the mask of the init image (white = repaint); see --mask-blur, --inpainting-fill, "
                        "--whole-picture")
    g.add_argument("--whole-picture", dest="inpaint_full_res", action="store_const", const=False,
                   default=argparse.SUPPRESS, help="inpainting: process the whole picture (the web UI's 'Inpaint "
                                                   "area: Whole picture'), not only the masked area")
    g.add_argument("-o", "--output", default="out.png")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_generate)


def _add_build(sub) -> None:
    b = sub.add_parser("build", help="export and compile a model's networks into an engine folder")
    b.add_argument("model", help="a checkpoint (.safetensors/.ckpt), a diffusers folder, or random:tiny, ...")
    b.add_argument("--backend", default="onnxruntime")
    b.add_argument("--out", required=True, help="the engine folder")
    b.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="bfloat16: tensorrt only")
    b.add_argument("--target", default=None,
                   help="onnxruntime: cpu (default) or cuda (adds ONNX Runtime's diffusion fusions); "
                        "tensorrt: native (default) or the GPU architecture, sm_80, sm_86, sm_89, sm_90, ...")
    b.add_argument("--min", default=None, help="smallest request, BxHxW (images x pixel height x width)")
    b.add_argument("--opt", default=None, help="the request to tune for, BxHxW")
    b.add_argument("--max", default=None, help="largest request, BxHxW")
    b.add_argument("--max-windows", type=int, default=None, help="longest prompt, in 75-token windows")
    b.add_argument("--networks", default=None, help="comma list, or 'all' (default: what generation runs: the "
                   "text encoder(s), unet, vae_decoder)")
    b.add_argument("--force", action="store_true", help="rebuild even when up to date")
    b.add_argument("--refit", action="store_true", help="tensorrt: refittable engines (LoRA merged by refit)")
    b.add_argument("--tiling", action="store_true", help="circular padding in the UNet and VAE (seamless tiles; the "
                   "folder then makes only tiling images)")
    b.add_argument("--no-winograd", dest="winograd", action="store_false",
                   help="onnxruntime, cpu, float32: keep every convolution direct (by default the 3x3 ones that run "
                        "at least 8x8 at --min become Winograd GEMMs: faster, larger artifact)")
    b.set_defaults(func=_build)


def _add_bench(sub) -> None:
    be = sub.add_parser("bench", help="time backends against the PyTorch reference and diffusers, side by side")
    be.add_argument("--suite", default=None, help="a named set of settings from sdrt/bench/suites.json")
    be.add_argument("--backends", default=None, help="comma list: torch,onnxruntime,tensorrt")
    be.add_argument("--references", default=None, help="comma list: diffusers, openvino (the CPU peer) ('' for none)")
    for name in ("model", "sampler", "schedule", "dtype", "device", "engine-dir"):
        be.add_argument(f"--{name}", default=None)
    for name in ("steps", "height", "width", "batch", "repeat", "warmup"):
        be.add_argument(f"--{name}", type=int, default=None)
    be.add_argument("--sweep", default=None, help="steps=5,10,20 | batch=1,2,4 | resolution=256,384,512")
    be.add_argument("--json", default=None)
    be.add_argument("--chart", default=None)
    be.set_defaults(func=_bench)


def _add_serve(sub) -> None:
    from .options import add_arguments
    from .serving.config import ServerConfig
    from .serving.deploy import Scaling
    s = sub.add_parser("serve", help="serve the web UI's HTTP API (/sdapi/v1/txt2img, ...) with Ray Serve")
    add_arguments(s, ServerConfig)          # what a replica loads and its limits
    _speed_options(s)
    add_arguments(s, Scaling)               # replicas
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7861)
    s.add_argument("--no-ray", action="store_true", help="one process under uvicorn, without Ray")
    s.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    s.set_defaults(func=_serve)


def _add_interrogate(sub) -> None:
    from .interrogator import MODES, InterrogateOptions
    from .options import add_arguments
    i = sub.add_parser("interrogate", help="an image back to a prompt: BLIP's caption and CLIP's ranked terms")
    i.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s); one prompt per line on stdout")
    i.add_argument("--mode", default="classic", choices=MODES,
                   help="classic: the web UI's Interrogate CLIP (caption, top term per list); fast, best, negative: "
                        "clip-interrogator's modes")
    i.add_argument("--model", default="random:interrogator-tiny",
                   help="a folder with clip/ and blip/ (transformers' layout), or random:interrogator-tiny, "
                        "random:interrogator")
    i.add_argument("--clip", default=None, help="a CLIP folder (overrides the model's): ViT-L/14 for SD 1.x, "
                   "OpenCLIP ViT-H for SD 2.x, ViT-bigG for SDXL")
    i.add_argument("--blip", default=None, help="a BLIP captioning folder (overrides the model's)")
    i.add_argument("--lists", default=None, help="a folder of term lists (*.txt, one term per line; NAME.topN.txt "
                   "takes N terms); default: the clip-interrogator package's")
    i.add_argument("--backend", default="torch", help="torch or onnxruntime")
    i.add_argument("--device", default="cpu")
    i.add_argument("--engine-dir", default=None, help="onnxruntime: the engine folder (default: in the cache)")
    add_arguments(i, InterrogateOptions)        # --beams, --min-length, ..., from the options' declaration
    i.add_argument("-q", "--quiet", action="store_true", help="no timings on stderr")
    i.set_defaults(func=_interrogate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdrt", description="Stable Diffusion inference runtime")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="what the library reports on stderr (on-demand builds, benchmark progress)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_generate, _add_build, _add_bench, _add_serve, _add_interrogate):
        add(sub)
    i = sub.add_parser("info", help="what an engine folder holds")
    i.add_argument("dir")
    i.set_defaults(func=_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="sdrt: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FloatingPointError, OSError) as e:
        print(f"sdrt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
