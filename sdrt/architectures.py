"""The architectures of the model families sdrt loads, as diffusers/transformers configurations.

A single-file checkpoint carries weights only; its family (told from its keys, as the web UI
does) picks one of these, so nothing is fetched from a model hub. The same declarations give
the random models (``random:sd15``, ``random:sdxl`` use the real sizes).
"""
from __future__ import annotations

import copy

import torch

from .tokenizer import OPENCLIP_PAD, clip_tokenizer

# the noise schedule every family here was trained with (prediction type aside)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 num_train_timesteps=1000, prediction_type="epsilon")

_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

FAMILIES: dict[str, dict] = {
    # SD 1.x: CLIP ViT-L/14, its last layer
    "sd1": dict(
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        vae=dict(_VAE, scaling_factor=0.18215),
        text=dict(_CLIP_L),
    ),
    # SD 2.x: OpenCLIP ViT-H/14 without its last layer (the web UI's "penultimate"), 64-channel heads
    "sd2": dict(
        unet=dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                  attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        vae=dict(_VAE, scaling_factor=0.18215, sample_size=768),
        text=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, max_position_embeddings=77, projection_dim=512, hidden_act="gelu"),
    ),
    # SDXL base: CLIP ViT-L and OpenCLIP ViT-bigG (penultimate layers, concatenated), bigG's pooled
    # projection and the size conditioning through the UNet's added embedding
    "sdxl": dict(
        unet=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                  attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
        vae=dict(_VAE, scaling_factor=0.13025, sample_size=1024),
        text=dict(_CLIP_L),
        text_2=dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                    num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu"),
    ),
}

class ModelError(ValueError):
    """The model argument does not name a usable Stable Diffusion model."""


FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def family_config(family: str, inpainting: bool = False, v_prediction: bool = False) -> dict:
    """A fresh copy of ``family``'s configurations ({"unet", "vae", "text"[, "text_2"], "scheduler"});
    the inpainting variant's UNet takes 9 input channels (latents, mask, masked-image latents)."""
    cfg = copy.deepcopy(FAMILIES[family])
    if inpainting:
        cfg["unet"]["in_channels"] = 9
    if family == "sd2" and not v_prediction:
        cfg["unet"]["sample_size"] = 64          # the 512-px epsilon models (2.0-base, 2.1-base)
        cfg["vae"]["sample_size"] = 512
    cfg["scheduler"] = dict(SCHEDULER, prediction_type="v_prediction" if v_prediction else "epsilon")
    return cfg


def text_model(config: dict, family: str, projection: bool = False) -> torch.nn.Module:
    """A transformers CLIP text model of ``config`` (with its pooled projection for SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    pad = 0 if projection or family == "sd2" else 49407
    cfg = CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=pad, **config)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def family_tokenizer(family: str):
    """The first (or only) tokenizer of a family: CLIP's, padding with EOS, except SD 2.x's OpenCLIP (0)."""
    return clip_tokenizer(OPENCLIP_PAD) if family == "sd2" else clip_tokenizer()
