"""LoRA files for the tests, written from random weights in the layouts people share: kohya's
(``lora_unet_*`` with diffusers' or the original UNet's module names, ``lora_te_*`` /
``lora_te1_*`` / ``lora_te2_*``, down/up/alpha; LoCon on convolutions) and diffusers/peft's."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from sdrt.checkpoints import unet_ldm_names

UNET_TARGETS = ("attn1.to_q", "attn2.to_k", "attn2.to_v", "attn1.to_out.0", "ff.net.2", "proj_in")
TE_TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.fc1")


def factors(weight: torch.Tensor, rank: int, g: torch.Generator):
    if weight.dim() == 4:      # LoCon: a (rank, in, kh, kw) convolution, then a 1x1 one
        return (torch.randn(rank, weight.shape[1], *weight.shape[2:], generator=g) * 0.1,
                torch.randn(weight.shape[0], rank, 1, 1, generator=g) * 0.1)
    return torch.randn(rank, weight.shape[1], generator=g) * 0.1, torch.randn(weight.shape[0], rank, generator=g) * 0.1


def kohya(components, path, rank=4, seed=0, ldm_names=False, unet=True, text=True, conv=True, alpha=None):
    """A kohya-layout LoRA over some of each network's layers; returns {(part, module): (down, up, alpha)}."""
    g = torch.Generator().manual_seed(seed)
    sd, layers = {}, {}
    alpha = float(rank) / 2 if alpha is None else alpha

    def add(name, part, module_name, module):
        down, up = factors(module.weight, rank, g)
        sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"] = down, up
        sd[name + ".alpha"] = torch.tensor(alpha)
        layers[(part, module_name)] = (down, up, alpha)

    if unet:
        mods = {n: m for n, m in components.unet.named_modules() if n}
        ldm = unet_ldm_names(components.unet.config, [n + ".weight" for n, m in mods.items() if hasattr(m, "weight")])
        for n, m in mods.items():
            if n.endswith(UNET_TARGETS) or (conv and n.endswith("resnets.0.conv1")):
                kname = ldm[n + ".weight"][:-len(".weight")] if ldm_names else n
                add("lora_unet_" + kname.replace(".", "_"), "unet", n, m)
    if text:
        encoders = [("lora_te1_" if components.is_sdxl else "lora_te_", "text_encoder", components.text_encoder)]
        if components.text_encoder_2 is not None:
            encoders.append(("lora_te2_", "text_encoder_2", components.text_encoder_2))
        for prefix, part, enc in encoders:
            for n, m in enc.named_modules():
                if n.endswith(TE_TARGETS):
                    full = n if n.startswith("text_model.") else "text_model." + n
                    add(prefix + full.replace(".", "_"), part, n, m)
    save_file(sd, str(path))
    return layers


def peft(components, path, rank=4, seed=1):
    """The same kind of LoRA in diffusers/peft's layout (``unet.<module>.lora_A.weight``, no alpha)."""
    g = torch.Generator().manual_seed(seed)
    sd, layers = {}, {}
    for n, m in components.unet.named_modules():
        if n.endswith(("attn2.to_q", "attn1.to_v")):
            down, up = factors(m.weight, rank, g)
            sd[f"unet.{n}.lora_A.weight"], sd[f"unet.{n}.lora_B.weight"] = down, up
            layers[("unet", n)] = (down, up, None)
    save_file(sd, str(path))
    return layers
