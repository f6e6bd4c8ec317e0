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

from .schedules import DiscreteSchedule
from .tokenizer import clip_tokenizer

SD1_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     num_train_timesteps=1000, prediction_type="epsilon")

RANDOM_MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        seed=0,
        unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
                  attention_head_dim=4,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        # four blocks: a scale factor of 8, as in the real VAE
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                 block_out_channels=(8, 8, 16, 16), norm_num_groups=4, sample_size=64,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                  hidden_act="quick_gelu"),
    ),
    "sd15": dict(
        seed=0,
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                  attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                 block_out_channels=(128, 256, 512, 512), sample_size=512,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                  hidden_act="quick_gelu"),
    ),
}

REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ModelError(ValueError):
    """The model argument does not name a usable Stable Diffusion model."""


@dataclass
class Components:
    """The networks and configuration of one Stable Diffusion model."""

    name: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    noise_schedule: DiscreteSchedule   # the training schedule (sigmas, prediction type)
    model_hash: str            # first 10 hex digits of a sha256 over the weights (names, shapes, values)

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
        return int(self.unet.config.in_channels)

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
    """A seeded, randomly initialised model (``random:tiny`` or ``random:sd15``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if kind not in RANDOM_MODELS:
        raise ModelError(f"random model {kind!r} is unknown; valid: "
                         + ", ".join(f"random:{k}" for k in RANDOM_MODELS))
    cfg = RANDOM_MODELS[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                            **cfg["text"]))
        for m in (unet, vae, text):
            _randomize_norms(m)
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    return Components(name=f"random:{kind}", unet=unet, vae=vae, text_encoder=text,
                      tokenizer=clip_tokenizer(), noise_schedule=DiscreteSchedule.from_config(**SD1_SCHEDULER),
                      model_hash=_weights_hash(unet, vae, text))


def load_diffusers_folder(path: str | Path) -> Components:
    """A Stable Diffusion 1.x/2.x model saved by diffusers (``save_pretrained``) at ``path``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

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
            **{k: configs["scheduler"][k] for k in SD1_SCHEDULER if k in configs["scheduler"]}),
        "unet": lambda: UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True),
        "vae": lambda: AutoencoderKL.from_pretrained(root / "vae", local_files_only=True),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
    }
    loaded = {}
    for part, load in loaders.items():
        try:
            loaded[part] = load()
        except Exception as e:  # noqa: BLE001 - truncated safetensors, refused pickles, bad configs: one message
            raise ModelError(f"{str(path)!r}: could not load {part}/: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from e
    schedule, unet, vae, text, tokenizer = (loaded[k] for k in loaders)
    if "CrossAttn" not in "".join(unet.config.down_block_types):
        raise ModelError(f"{str(path)!r}: the UNet has no cross-attention blocks; "
                         "it is not a text-to-image Stable Diffusion UNet")
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    return Components(name=root.name, unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                      noise_schedule=schedule, model_hash=_weights_hash(unet, vae, text))


def load_model(model: str | Path) -> Components:
    """Resolve the ``model`` argument of ``Pipeline.from_pretrained``."""
    text = str(model)
    if text.startswith("random:"):
        return build_random(text.split(":", 1)[1])
    path = Path(text)
    if path.is_dir():
        return load_diffusers_folder(path)
    if path.suffix in (".safetensors", ".ckpt"):
        raise ModelError(f"{text!r}: single-file checkpoints are not supported yet; convert it to a "
                         "diffusers folder (diffusers' StableDiffusionPipeline.from_single_file(...)"
                         ".save_pretrained(DIR)) and pass that folder")
    raise ModelError(f"model {text!r} was not found: pass a diffusers folder, random:tiny or random:sd15")


def save_diffusers_folder(c: Components, path: str | Path) -> None:
    """Write ``c`` as a diffusers folder that ``load_diffusers_folder`` (and diffusers) can read."""
    root = Path(path)
    c.unet.save_pretrained(root / "unet")
    c.vae.save_pretrained(root / "vae")
    c.text_encoder.save_pretrained(root / "text_encoder")
    c.tokenizer.save_pretrained(root / "tokenizer")
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    cfg = dict(SD1_SCHEDULER, _class_name="PNDMScheduler", prediction_type=c.noise_schedule.prediction_type,
               set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg, indent=2))
