"""Loading a Stable Diffusion model: a diffusers folder or a built-in random model.

``random:tiny`` and ``random:sd15`` are seeded, randomly initialised models with the Stable
Diffusion 1.x architecture (tiny for tests, the real SD 1.5 sizes for timing) and the real
CLIP tokenizer. Nothing here downloads anything.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .architectures import FAMILIES, SCHEDULER, ModelError, family_tokenizer, text_model  # noqa: F401 - ModelError: its public home
from .checkpoints import SUFFIXES, load_single_file
from .schedules import DiscreteSchedule
from .tokenizer import OPENCLIP_PAD, clip_tokenizer, token_ids

SD1_SCHEDULER = SCHEDULER       # the old name

_TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                 # four blocks: a scale factor of 8, as in the real VAE
                 block_out_channels=(8, 8, 16, 16), norm_num_groups=4, sample_size=64,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
_TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu")

_TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))

RANDOM_MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(seed=0, family="sd1", unet=_TINY_UNET, vae=_TINY_VAE, text=_TINY_TEXT),
    "sd15": dict(seed=0, **FAMILIES["sd1"], family="sd1"),
    # the inpainting variant at test size: the UNet takes latents, mask and masked-image latents
    "tiny-inpaint": dict(seed=0, family="sd1", unet=dict(_TINY_UNET, in_channels=9), vae=_TINY_VAE, text=_TINY_TEXT),
    # SD 2.x's layout at test size: OpenCLIP-style text encoder (gelu, pads with 0), linear projections
    "sd2-tiny": dict(
        seed=0, family="sd2",
        unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
                  attention_head_dim=(2, 4), use_linear_projection=True,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        vae=_TINY_VAE, text=dict(_TINY_TEXT, hidden_act="gelu"),
    ),
    # SDXL's layout at test size: two text encoders (32 + 32 channels), pooled projection, size conditioning
    "sdxl-tiny": dict(
        seed=0, family="sdxl",
        unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=64,
                  attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=32 + 6 * 8,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
        vae=dict(_TINY_VAE, scaling_factor=0.13025), text=_TINY_TEXT, text_2=dict(_TINY_TEXT, hidden_act="gelu"),
    ),
    "sdxl": dict(seed=0, **FAMILIES["sdxl"], family="sdxl"),
}
# SDXL's inpainting variant at test size (9 input channels)
RANDOM_MODELS["sdxl-tiny-inpaint"] = dict(RANDOM_MODELS["sdxl-tiny"],
                                          unet=dict(RANDOM_MODELS["sdxl-tiny"]["unet"], in_channels=9))

REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class Components:
    """The networks and configuration of one Stable Diffusion model."""

    name: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    noise_schedule: DiscreteSchedule   # the training schedule (sigmas, prediction type)
    model_hash: str            # the web UI's "Model hash": a single file's sha256, else one over the weights
    family: str = "sd1"        # "sd1", "sd2" or "sdxl" (sdrt.architectures)
    text_encoder_2: torch.nn.Module | None = None    # SDXL's OpenCLIP ViT-bigG (with its projection)
    tokenizer_2: Any = None

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders, a pooled text embedding and size conditioning (``addition_embed_type``)."""
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    @property
    def inpainting(self) -> bool:
        """An inpainting model: its UNet takes the mask and the masked image's latents too (9 channels)."""
        return int(self.unet.config.in_channels) == 9

    @property
    def text_encoders(self) -> list:
        """(text encoder, tokenizer) pairs: one, or SDXL's two."""
        pairs = [(self.text_encoder, self.tokenizer)]
        if self.text_encoder_2 is not None:
            pairs.append((self.text_encoder_2, self.tokenizer_2))
        return pairs

    @property
    def networks(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def schedule(self) -> DiscreteSchedule:
        """Deprecated name of ``noise_schedule`` (kept for one release)."""
        return self.noise_schedule

    @schedule.setter
    def schedule(self, value: DiscreteSchedule) -> None:
        self.noise_schedule = value

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.out_channels)

    @property
    def size_multiple(self) -> int:
        """Pixel sizes a traced UNet graph accepts are multiples of this: every downsampling
        level halves the latent, and the traced graph has no odd-size fix-up (eager diffusers has)."""
        return self.latent_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The image size the model was trained at (512 for SD 1.5, 64 for random:tiny)."""
        return int(self.unet.config.sample_size) * self.latent_factor


def _weights_hash(*modules: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().to("cpu", torch.float32).contiguous().numpy())   # buffer, no copy
            h.update(str(tuple(v.shape)).encode())
    return h.hexdigest()[:10]


def _randomize_norms(module: torch.nn.Module) -> None:
    """Give every normalisation layer a random affine part. Left at its default (scale 1,
    shift 0), each token's CLIP output has mean 0 exactly, unlike a trained model's, and the
    web UI's emphasis (which rescales by a ratio of means) would divide by about zero."""
    for m in module.modules():
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
            with torch.no_grad():
                m.weight.add_(torch.randn_like(m.weight) * 0.1)
                m.bias.add_(torch.randn_like(m.bias) * 0.1)


def build_random(kind: str) -> Components:
    """A seeded, randomly initialised model (``random:tiny``, ``random:sd15``, ``random:sdxl``, ...)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if kind not in RANDOM_MODELS:
        raise ModelError(f"random model {kind!r} is unknown; valid: "
                         + ", ".join(f"random:{k}" for k in RANDOM_MODELS))
    cfg = RANDOM_MODELS[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text = text_model(cfg["text"], cfg["family"])
        text_2 = text_model(cfg["text_2"], cfg["family"], projection=True) if "text_2" in cfg else None
        networks = [m for m in (unet, vae, text, text_2) if m is not None]
        for m in networks:
            _randomize_norms(m)
    for m in networks:
        m.eval().requires_grad_(False)
    return Components(name=f"random:{kind}", unet=unet, vae=vae, text_encoder=text,
                      tokenizer=family_tokenizer(cfg["family"]), noise_schedule=DiscreteSchedule.from_config(**SCHEDULER),
                      model_hash=_weights_hash(*networks), family=cfg["family"], text_encoder_2=text_2,
                      tokenizer_2=clip_tokenizer(OPENCLIP_PAD) if text_2 is not None else None)


def load_diffusers_folder(path: str | Path) -> Components:
    """A Stable Diffusion 1.x/2.x model saved by diffusers (``save_pretrained``) at ``path``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(path)
    missing = [p for p in REQUIRED_PARTS if not (root / p).is_dir()]
    if missing:
        raise ModelError(f"{str(path)!r} is not a Stable Diffusion model in diffusers format: "
                         f"missing {', '.join(p + '/' for p in missing)} "
                         f"(expected {', '.join(p + '/' for p in REQUIRED_PARTS)})")
    sched_file = root / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise ModelError(f"{str(path)!r}: missing scheduler/scheduler_config.json "
                         "(it gives the beta schedule and the prediction type)")
    configs = {}
    for part, name in (("scheduler", "scheduler_config.json"), ("unet", "config.json"), ("vae", "config.json"),
                       ("text_encoder", "config.json")):
        cfg = root / part / name
        try:
            configs[part] = json.loads(cfg.read_text()) if cfg.is_file() else {}
        except (ValueError, OSError) as e:
            raise ModelError(f"{str(path)!r}: {part}/{name} is not readable JSON: {e}") from None
        if not isinstance(configs[part], dict):
            raise ModelError(f"{str(path)!r}: {part}/{name} must hold a JSON object, got "
                             f"{type(configs[part]).__name__}")
    loaders = {
        "scheduler": lambda: DiscreteSchedule.from_config(
            **{k: configs["scheduler"][k] for k in SCHEDULER if k in configs["scheduler"]}),
        "unet": lambda: UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True),
        "vae": lambda: AutoencoderKL.from_pretrained(root / "vae", local_files_only=True),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
    }
    sdxl = (root / "text_encoder_2").is_dir()
    if sdxl:                # SDXL: the second text encoder (OpenCLIP ViT-bigG with its projection)
        if not (root / "tokenizer_2").is_dir():
            raise ModelError(f"{str(path)!r}: has text_encoder_2/ but no tokenizer_2/ (an SDXL folder has both)")
        loaders["text_encoder_2"] = lambda: CLIPTextModelWithProjection.from_pretrained(
            root / "text_encoder_2", local_files_only=True)
        loaders["tokenizer_2"] = lambda: CLIPTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True)
    loaded = {}
    for part, load in loaders.items():
        try:
            loaded[part] = load()
        except Exception as e:  # noqa: BLE001 - truncated safetensors, refused pickles, bad configs: one message
            raise ModelError(f"{str(path)!r}: could not load {part}/: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from e
    schedule, unet, vae, text, tokenizer = (loaded[k] for k in ("scheduler", "unet", "vae", "text_encoder", "tokenizer"))
    text_2, tokenizer_2 = loaded.get("text_encoder_2"), loaded.get("tokenizer_2")
    if "CrossAttn" not in "".join(unet.config.down_block_types):
        raise ModelError(f"{str(path)!r}: the UNet has no cross-attention blocks; "
                         "it is not a text-to-image Stable Diffusion UNet")
    if sdxl != (getattr(unet.config, "addition_embed_type", None) == "text_time"):
        raise ModelError(f"{str(path)!r}: " + ("text_encoder_2/ is there but the UNet takes no pooled text and size "
                                                "conditioning" if sdxl else "the UNet is SDXL's (addition_embed_type "
                                                "'text_time') but text_encoder_2/ is missing"))
    networks = [m for m in (unet, vae, text, text_2) if m is not None]
    for m in networks:
        m.eval().requires_grad_(False)
    family = "sdxl" if sdxl else ("sd2" if token_ids(tokenizer).pads_after_end else "sd1")
    return Components(name=root.name, unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                      noise_schedule=schedule, model_hash=_weights_hash(*networks), family=family,
                      text_encoder_2=text_2, tokenizer_2=tokenizer_2)


def load_model(model: str | Path) -> Components:
    """Resolve the ``model`` argument of ``Pipeline.from_pretrained``."""
    text = str(model)
    if text.startswith("random:"):
        return build_random(text.split(":", 1)[1])
    path = Path(text)
    if path.is_dir():
        return load_diffusers_folder(path)
    if path.suffix in SUFFIXES:
        if not path.is_file():
            raise ModelError(f"model {text!r} was not found (no such checkpoint file)")
        f = load_single_file(path)
        return Components(name=f.name, unet=f.unet, vae=f.vae, text_encoder=f.text_encoder,
                          tokenizer=family_tokenizer(f.family), noise_schedule=f.noise_schedule,
                          model_hash=f.sha256[:10], family=f.family, text_encoder_2=f.text_encoder_2,
                          tokenizer_2=clip_tokenizer(OPENCLIP_PAD) if f.text_encoder_2 is not None else None)
    raise ModelError(f"model {text!r} was not found: pass a checkpoint file ({', '.join(SUFFIXES)}), a diffusers "
                     "folder, or a random model (" + ", ".join(f"random:{k}" for k in RANDOM_MODELS) + ")")


def save_diffusers_folder(c: Components, path: str | Path) -> None:
    """Write ``c`` as a diffusers folder that ``load_diffusers_folder`` (and diffusers) can read."""
    root = Path(path)
    c.unet.save_pretrained(root / "unet")
    c.vae.save_pretrained(root / "vae")
    c.text_encoder.save_pretrained(root / "text_encoder")
    c.tokenizer.save_pretrained(root / "tokenizer")
    if c.text_encoder_2 is not None:
        c.text_encoder_2.save_pretrained(root / "text_encoder_2")
        c.tokenizer_2.save_pretrained(root / "tokenizer_2")
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    cfg = dict(SCHEDULER, _class_name="PNDMScheduler", prediction_type=c.noise_schedule.prediction_type,
               set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg, indent=2))
