"""The ``sdrt`` command line: ``sdrt generate`` (more subcommands come with their backends)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _generate(args) -> int:
    from tqdm import tqdm

    from . import Pipeline

    pipe = Pipeline.from_pretrained(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                                    engine_dir=args.engine_dir)
    bar = tqdm(total=args.steps, unit="step", desc="sampling", disable=args.quiet)

    def progress(step, total):
        bar.total = total
        bar.update(step - bar.n)

    result = pipe(args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, cfg_scale=args.cfg_scale,
                  sampler=args.sampler, schedule=args.schedule, seed=args.seed, width=args.width,
                  height=args.height, batch_size=args.batch_size, clip_skip=args.clip_skip, rng=args.rng,
                  eta_noise_seed_delta=args.ensd, subseed=args.subseed, subseed_strength=args.subseed_strength,
                  eta=args.eta, callback=progress)
    bar.close()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i in range(len(result.images)):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i:02d}{out.suffix}")
        result.save(path, i)
        print(f"wrote {path} (seed {result.seeds[i]})")
    t = result.timings
    print(f"text encoder {t['text_encoder']:.3f} s, denoising {t['unet']:.3f} s, "
          f"vae {t['vae']:.3f} s, total {t['total']:.3f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .samplers import SAMPLERS
    from .schedules import SCHEDULES

    parser = argparse.ArgumentParser(prog="sdrt", description="Stable Diffusion inference runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate images from a prompt and write PNGs with infotext")
    g.add_argument("prompt")
    g.add_argument("-n", "--negative-prompt", default="")
    g.add_argument("--model", default="random:tiny", help="diffusers folder, random:tiny or random:sd15")
    g.add_argument("--backend", default="torch")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32")
    g.add_argument("--engine-dir", default=None)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--cfg-scale", type=float, default=7.0)
    g.add_argument("--sampler", default="Euler a", help="one of: " + ", ".join(SAMPLERS))
    g.add_argument("--schedule", default="Automatic", help="one of: " + ", ".join(SCHEDULES))
    g.add_argument("--seed", type=int, default=-1)
    g.add_argument("--width", type=int, default=None, help="default: 512 (64 for random:tiny)")
    g.add_argument("--height", type=int, default=None, help="default: 512 (64 for random:tiny)")
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--clip-skip", type=int, default=1)
    g.add_argument("--rng", default="gpu", choices=["gpu", "cpu", "nv"])
    g.add_argument("--ensd", type=int, default=0, help="eta noise seed delta")
    g.add_argument("--subseed", type=int, default=-1)
    g.add_argument("--subseed-strength", type=float, default=0.0)
    g.add_argument("--eta", type=float, default=None)
    g.add_argument("-o", "--output", default="out.png")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_generate)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "width", 0) is None:
        args.width = 64 if args.model == "random:tiny" else 512
    if getattr(args, "height", 0) is None:
        args.height = 64 if args.model == "random:tiny" else 512
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FloatingPointError) as e:
        print(f"sdrt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
