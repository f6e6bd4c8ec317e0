"""Write a model as a web UI single-file checkpoint (the original LDM / SGM key layout).

    python scripts/make_checkpoint.py random:tiny tiny.safetensors
    python scripts/make_checkpoint.py random:sdxl-tiny sdxl-tiny.safetensors --dtype float16
    python scripts/make_checkpoint.py path/to/diffusers-folder model.ckpt

Any model sdrt loads (a random model, a diffusers folder, another checkpoint) can be written;
``.ckpt`` files are weights-only pickles. Random test models record their configuration in the
file (their sizes are not their family's); real architectures do not need to.
"""
from __future__ import annotations

import argparse
import sys

import torch

from sdrt.checkpoints import save_single_file
from sdrt.models import ModelError, load_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="random:tiny, random:sdxl-tiny, a diffusers folder, a checkpoint, ...")
    ap.add_argument("output", help="a .safetensors or .ckpt path")
    ap.add_argument("--dtype", choices=DTYPES, default="float16", help="tensor type in the file (default float16, "
                    "as most shared checkpoints)")
    args = ap.parse_args(argv)
    if not args.output.endswith((".safetensors", ".ckpt")):
        print("error: the output must end in .safetensors or .ckpt", file=sys.stderr)
        return 2
    try:
        c = load_model(args.model)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = save_single_file(c, args.output, dtype=DTYPES[args.dtype])
    print(f"wrote {path} ({c.family}, {path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
