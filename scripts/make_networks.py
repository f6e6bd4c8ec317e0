"""Write a random LoRA (kohya layout) and a random textual-inversion embedding for a model, to try
the extra networks without downloading any:

    python scripts/make_networks.py random:tiny nets
    sdrt generate "a cat <lora:random-lora:0.7> random-emb" --lora-dir nets/loras --embeddings-dir nets/embeddings

The LoRA (rank 4, alpha 2) covers the attention projections of the UNet and the text encoder(s);
the embedding has 2 vectors (SDXL: a clip_l / clip_g pair).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdrt.lora import ModuleNames
from sdrt.models import ModelError, load_model

TARGETS = ("to_q", "to_k", "to_v", "q_proj", "k_proj", "v_proj")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("out", help="a folder: loras/ and embeddings/ are written in it")
    args = ap.parse_args(argv)
    try:
        c = load_model(args.model)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    names = ModuleNames(c)
    lora = {}
    for kohya, (part, module) in names.names.items():
        # kohya's names with diffusers' UNet modules (as it writes SD 1.x LoRAs) and the text
        # encoders' (lora_te_ / lora_te1_ / lora_te2_): one name per module
        if not kohya.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks", "lora_te")):
            continue
        if not module.endswith(TARGETS):
            continue
        w = names.module(part, module).weight
        lora[f"{kohya}.lora_down.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.1
        lora[f"{kohya}.lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.1
        lora[f"{kohya}.alpha"] = torch.tensor(2.0)
    out = Path(args.out)
    (out / "loras").mkdir(parents=True, exist_ok=True)
    (out / "embeddings").mkdir(parents=True, exist_ok=True)
    save_file(lora, str(out / "loras" / "random-lora.safetensors"))
    widths = [int(m.config.hidden_size) for m, _ in c.text_encoders]
    if c.is_sdxl:
        save_file({"clip_l": torch.randn(2, widths[0], generator=g), "clip_g": torch.randn(2, widths[1], generator=g)},
                  str(out / "embeddings" / "random-emb.safetensors"))
    else:
        torch.save({"string_to_param": {"*": torch.randn(2, widths[0], generator=g) * 0.3}},
                   out / "embeddings" / "random-emb.pt")
    print(f"wrote {out}/loras/random-lora.safetensors ({len(lora) // 3} layers) and {out}/embeddings/random-emb.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
