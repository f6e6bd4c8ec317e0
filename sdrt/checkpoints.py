"""Single-file checkpoints: the ``.safetensors`` / ``.ckpt`` files people share for the web UI.

The file holds the original (LDM / SGM) layout: ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.*`` (SD 1.x CLIP),
``cond_stage_model.model.*`` (SD 2.x OpenCLIP) or ``conditioner.embedders.{0,1}.*`` (SDXL).
The family is told from the keys the way the web UI's ``guess_model_config_from_state_dict``
does it; SD 2.x's v-prediction is detected as the web UI does (one UNet call on a constant input:
``mean(out - x) < -1`` means v), unless a ``.yaml`` beside the file says ``parameterization: "v"``.
The architecture comes from ``sdrt.architectures`` (nothing is fetched), and the weights are
converted by diffusers' own single-file functions. ``.ckpt`` pickles load only with
``torch.load(weights_only=True)``: a pickle that would run code is refused, never executed.

``save_single_file`` writes a model in that layout (the inverse of diffusers' conversion), which
is how the tests and ``scripts/make_checkpoint.py`` make checkpoints from random weights. A
file whose architecture differs from its family's (a random test model) records its
configurations in the safetensors metadata (``sdrt.configs``), which the loader prefers.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .architectures import FAMILY_NAMES, SCHEDULER, ModelError, family_config, text_model

logger = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_SD1, OPENCLIP_SD2 = "cond_stage_model.transformer.", "cond_stage_model.model."
CLIP_XL, OPENCLIP_XL = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
CONFIG_KEY = "sdrt.configs"
# the web UI's checkpoint_dict_replacements (SD 1.x files saved by older transformers)
_REPLACEMENTS = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}


class CheckpointError(ModelError):
    """A single-file checkpoint that cannot be loaded (names the file and the problem)."""


# ---------------------------------------------------------------------------- reading

def file_sha256(path: str | Path) -> str:
    """The file's sha256 (hex), the web UI's checkpoint hash; cached on disk under the sdrt cache,
    keyed by path, size and modification time (an SDXL file takes seconds to hash)."""
    from .paths import cache_root
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = cache_root() / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    cache[key] = h.hexdigest()
    try:                   # a read-only cache only costs the hash next time
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return cache[key]


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a checkpoint file, on the CPU in the file's types (each network is
    made float32 as it is built: an SDXL file in float16 is never whole in float32)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{str(path)!r} is not a readable safetensors file (truncated or damaged?): "
                                  f"{e}") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{str(path)!r}: refused: this pickle asks to run code or build objects beyond tensors "
                f"({str(e).splitlines()[0][:200]}); sdrt loads .ckpt files only with torch.load(weights_only=True). "
                "Convert a file you trust to .safetensors (the web UI's checkpoint merger can) and load that") from None
        except (EOFError, RuntimeError, OSError, ValueError) as e:
            raise CheckpointError(f"{str(path)!r} is not a readable checkpoint (truncated or damaged?): "
                                  f"{type(e).__name__}: {e}") from None
        metadata = {}
        if isinstance(obj, dict) and isinstance(obj.get(CONFIG_KEY), str):
            metadata[CONFIG_KEY] = obj[CONFIG_KEY]
        while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):   # the web UI's unwrapping
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict of tensors")
        sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    out = {}
    for k, v in sd.items():
        for old, new in _REPLACEMENTS.items():
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = v
    return out, metadata


def detect(sd: dict, name: str = "checkpoint") -> tuple[str, bool]:
    """(family, inpainting) from the keys and shapes, as the web UI tells them apart; other kinds
    (SDXL refiner, depth, unCLIP, instruct-pix2pix, SD 3, ...) are refused by name."""
    first = sd.get(UNET + "input_blocks.0.0.weight")
    if UNET + "x_embedder.proj.weight" in sd or any(k.startswith(UNET + "joint_blocks.") for k in sd):
        raise CheckpointError(f"{name}: an SD 3 checkpoint; sdrt runs SD 1.x, SD 2.x and SDXL base")
    if first is None:
        if any(k.startswith(("double_blocks.", UNET + "double_blocks.")) for k in sd):
            raise CheckpointError(f"{name}: a Flux checkpoint; sdrt runs SD 1.x, SD 2.x and SDXL base")
        raise CheckpointError(f"{name}: no Stable Diffusion UNet in it (no {UNET}input_blocks.0.0.weight); "
                              "a LoRA, an embedding or a VAE goes elsewhere")
    channels = int(first.shape[1])
    if channels not in (4, 9):
        kind = "an instruct-pix2pix checkpoint" if channels == 8 else f"a UNet with {channels} input channels"
        raise CheckpointError(f"{name}: {kind}; sdrt runs text-to-image (4 channels) and inpainting (9) models")
    if OPENCLIP_XL + "ln_final.weight" in sd:
        return "sdxl", channels == 9
    if "conditioner.embedders.0.model.ln_final.weight" in sd:
        raise CheckpointError(f"{name}: an SDXL refiner checkpoint; sdrt runs SDXL base models")
    if "depth_model.model.pretrained.act_postprocess3.0.project.0.bias" in sd:
        raise CheckpointError(f"{name}: an SD 2 depth model; not supported")
    if "embedder.model.ln_final.weight" in sd:
        raise CheckpointError(f"{name}: an unCLIP (image variations) model; not supported")
    if OPENCLIP_SD2 + "ln_final.weight" in sd:
        return "sd2", channels == 9
    if CLIP_SD1 + "text_model.embeddings.position_embedding.weight" in sd:
        return "sd1", channels == 9
    if "cond_stage_model.roberta.embeddings.word_embeddings.weight" in sd:
        raise CheckpointError(f"{name}: an AltDiffusion checkpoint; not supported")
    raise CheckpointError(f"{name}: a UNet without a text encoder sdrt knows "
                          f"(no {CLIP_SD1}*, {OPENCLIP_SD2}* or conditioner.embedders.*)")


def _yaml_says_v(path: Path) -> bool | None:
    """The web UI's config beside the checkpoint (``NAME.yaml``): its ``parameterization``."""
    yaml_file = path.with_suffix(".yaml")
    if not yaml_file.is_file():
        return None
    m = re.search(r"^\s*parameterization:\s*['\"]?(\w+)", yaml_file.read_text(errors="replace"), re.MULTILINE)
    return bool(m and m.group(1) == "v") if m else False


def uses_v_prediction(unet: torch.nn.Module) -> bool:
    """The web UI's test for SD 2.x (``is_using_v_parameterization_for_sd2``): with x = 0.5
    everywhere, t = 999 and a context of 0.5, a v-prediction UNet gives mean(out - x) < -1."""
    ctx = torch.full((1, 2, int(unet.config.cross_attention_dim)), 0.5)
    x = torch.full((1, int(unet.config.in_channels), 8, 8), 0.5)
    with torch.no_grad():
        out = unet(x, torch.tensor([999.0]), encoder_hidden_states=ctx, return_dict=False)[0]
    return float((out - x).mean()) < -1.0


# ---------------------------------------------------------------------------- loading

@contextlib.contextmanager
def meta_parameters():
    """Modules built inside get their parameters on the meta device (no initialisation is
    computed; the checkpoint's tensors are assigned afterwards) and their buffers on the CPU
    (position ids and the like are not in the file). What accelerate's init_empty_weights does."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


@dataclass
class SingleFile:
    """What a single-file checkpoint holds, as modules (``sdrt.models.load_model`` makes a model of it)."""

    name: str                  # the file's stem: the web UI's "Model"
    sha256: str                # the file's: its first 10 digits are the web UI's "Model hash"
    family: str
    inpainting: bool
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module | None
    noise_schedule: object


def load_single_file(path: str | Path) -> SingleFile:
    """The networks of a single-file SD 1.x / 2.x / SDXL checkpoint."""

    from .schedules import DiscreteSchedule

    path = Path(path)
    name = repr(str(path))
    sd, metadata = read_state_dict(path)
    family, inpainting = detect(sd, name)
    stored = None
    if CONFIG_KEY in metadata:
        try:
            stored = json.loads(metadata[CONFIG_KEY])
        except ValueError as e:
            raise CheckpointError(f"{name}: its {CONFIG_KEY} metadata is not JSON: {e}") from None
    cfg = stored or family_config(family, inpainting)
    unet, vae, text, text_2 = networks(sd, family, cfg, name)
    prediction = cfg.get("scheduler", {}).get("prediction_type") if stored else None
    if prediction is None:
        said = _yaml_says_v(path) if family == "sd2" else None
        v = said if said is not None else (family == "sd2" and not inpainting and uses_v_prediction(unet))
        prediction = "v_prediction" if v else "epsilon"
        if v and not stored:             # the 768-px SD 2.x v models
            unet.register_to_config(sample_size=family_config(family, inpainting, True)["unet"]["sample_size"])
    logger.info("%s: %s%s checkpoint, %s", path.name, FAMILY_NAMES[family], " inpainting" if inpainting else "",
                prediction)
    schedule = DiscreteSchedule.from_config(**dict(SCHEDULER, prediction_type=prediction))
    return SingleFile(name=path.stem, sha256=file_sha256(path), family=family, inpainting=inpainting, unet=unet,
                      vae=vae, text_encoder=text, text_encoder_2=text_2, noise_schedule=schedule)


def networks(sd: dict, family: str, cfg: dict, name: str = "checkpoint") -> tuple:
    """(unet, vae, text encoder, second text encoder or None) of a state dict in the single-file
    layout, built to ``cfg`` (``family_config`` or a file's own) with diffusers' converters."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    def build(part: str, make, convert):
        try:
            converted = {k: v.float() if v.is_floating_point() else v for k, v in convert().items()}
            with meta_parameters():
                module = make()
            problem = _compare(module, converted)
            if problem:
                raise CheckpointError(f"{name}: the {part} does not match the {FAMILY_NAMES[family]} architecture "
                                      f"sdrt builds for it: {problem}")
            module.load_state_dict(converted, strict=True, assign=True)
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{name}: the {part} could not be built: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from None
        return module.eval().requires_grad_(False)

    unet_cfg = dict(cfg["unet"])
    unet = build("UNet", lambda: UNet2DConditionModel(**unet_cfg), lambda: convert_ldm_unet_checkpoint(sd, unet_cfg))
    vae = build("VAE", lambda: AutoencoderKL(**cfg["vae"]),
                lambda: _vae_weights(sd, cfg["vae"], convert_ldm_vae_checkpoint))
    text_2 = None
    if family == "sd1":
        text = build("text encoder", lambda: text_model(cfg["text"], family),
                     lambda: _strip(convert_ldm_clip_checkpoint(sd), "text_model."))
    elif family == "sd2":
        text = build("text encoder", lambda: text_model(cfg["text"], family),
                     lambda: _openclip(sd, cfg["text"], OPENCLIP_SD2, convert_open_clip_checkpoint))
    else:
        text = build("first text encoder (CLIP ViT-L)", lambda: text_model(cfg["text"], family),
                     lambda: _strip(convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(CLIP_XL)}),
                                    "text_model."))
        text_2 = build("second text encoder (OpenCLIP ViT-bigG)",
                       lambda: text_model(cfg["text_2"], family, projection=True),
                       lambda: _openclip(sd, cfg["text_2"], OPENCLIP_XL, convert_open_clip_checkpoint, projection=True))
    return unet, vae, text, text_2


def _compare(module: torch.nn.Module, converted: dict) -> str:
    """What keeps ``converted`` from loading into ``module`` ("" when nothing)."""
    expected = {k: v.shape for k, v in module.state_dict().items() if not k.endswith("position_ids")}
    missing = sorted(set(expected) - set(converted))
    unknown = sorted(set(converted) - set(expected))
    shapes = sorted(k for k in set(expected) & set(converted) if tuple(converted[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
    if unknown:
        problems.append(f"{len(unknown)} weights it does not have (e.g. {unknown[0]})")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} weights of another shape (e.g. {k}: {tuple(converted[k].shape)} in the "
                        f"file, {tuple(expected[k])} expected)")
    return "; ".join(problems)


def _strip(sd: dict, prefix: str) -> dict:
    """transformers 5's CLIPTextModel has no ``text_model.`` level; position ids are not weights."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items() if not k.endswith("position_ids")}


def _vae_weights(sd: dict, vae_cfg: dict, convert) -> dict:
    vae_sd = {k: v for k, v in sd.items() if k.startswith(VAE)}
    if not vae_sd:
        raise ValueError("the checkpoint holds no VAE (no first_stage_model.* weights); a checkpoint without "
                         "its VAE needs a separate VAE file (not supported yet)")
    return convert(vae_sd, vae_cfg)


def _openclip(sd: dict, text_cfg: dict, prefix: str, convert, projection: bool = False) -> dict:
    """An OpenCLIP text tower in diffusers' CLIP layout, through diffusers' converter. SD 2.x's
    files hold 24 blocks of which the model uses 23 (the web UI's "penultimate" layer)."""
    class _Config:                  # what the converter reads of the model: its width
        hidden_size = int(text_cfg["hidden_size"])

    class _Model:
        config = _Config

    tower = {k: v for k, v in sd.items() if k.startswith(prefix)}
    layers = int(text_cfg["num_hidden_layers"])
    tower = {k: v for k, v in tower.items()
             if not (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", k)) or int(m.group(1)) < layers}
    if not projection:
        tower.pop(prefix + "text_projection", None)
    out = convert(_Model, tower, prefix=prefix)
    out = {k: v for k, v in out.items() if not k.endswith("position_ids")}
    if not projection:
        out.pop("text_projection.weight", None)
        return _strip(out, "text_model.")
    return out


# ---------------------------------------------------------------------------- writing

def _unet_to_ldm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """diffusers UNet weights -> ``model.diffusion_model.*`` (the inverse of
    ``convert_ldm_unet_checkpoint``)."""
    sd = unet.state_dict()
    return {UNET + ldm: sd[key] for key, ldm in unet_ldm_names(unet.config, sd).items()}


def unet_ldm_names(cfg, keys) -> dict[str, str]:
    """{diffusers UNet key: its name in the original (LDM) UNet} for a UNet config and its keys
    (parameters or modules: a module name maps like its ``.weight``)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    names = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        names.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    resnet = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
              ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
    prefixes: list[tuple[str, str, bool]] = []     # (diffusers prefix, LDM prefix, is resnet)
    lpb = int(cfg.layers_per_block)
    idx = 1
    for i in range(len(cfg.block_out_channels)):
        for j in range(lpb):
            prefixes += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0.", True),
                         (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1.", False)]
            idx += 1
        prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{idx}.0.op.", False))
        idx += 1
    prefixes += [("mid_block.resnets.0.", "middle_block.0.", True), ("mid_block.attentions.0.", "middle_block.1.", False),
                 ("mid_block.resnets.1.", "middle_block.2.", True)]
    idx = 0
    for i, kind in enumerate(cfg.up_block_types):
        attn = "CrossAttn" in kind
        for j in range(lpb + 1):
            prefixes += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0.", True),
                         (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1.", False)]
            if j == lpb:
                prefixes.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{idx}.{2 if attn else 1}.conv.",
                                 False))
            idx += 1
    out = {}
    for key in keys:
        if key in names:
            out[key] = names[key]
            continue
        for old, new, is_resnet in prefixes:
            if key.startswith(old):
                rest = key[len(old):]
                if is_resnet:
                    for a, b in resnet:
                        if rest.startswith(a + "."):
                            rest = b + rest[len(a):]
                            break
                out[key] = new + rest
                break
        else:
            raise CheckpointError(f"UNet weight {key!r} has no place in the LDM layout")
    return out


def _vae_to_ldm(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """diffusers VAE weights -> ``first_stage_model.*`` (attention projections as 1x1 convolutions)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    names = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n = len(vae.config.block_out_channels)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in vae.state_dict().items():
        if key in names:
            out[VAE + names[key]] = value
            continue
        new = key
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                     lambda m: f"decoder.up.{n - 1 - int(m.group(1))}.block.{m.group(2)}.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{n - 1 - int(m.group(1))}.upsample.", new)
        new = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
                     lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.", new)
        new = new.replace("conv_shortcut", "nin_shortcut")
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", new)
        if m:
            new = f"{m.group(1)}.mid.attn_1.{attn[m.group(2)]}.{m.group(3)}"
            if m.group(3) == "weight" and m.group(2) != "group_norm":
                value = value[:, :, None, None]
        if new == key and not key.startswith(("encoder.", "decoder.")):
            raise CheckpointError(f"VAE weight {key!r} has no place in the LDM layout")
        out[VAE + new] = value
    return out


def _openclip_to_ldm(text: torch.nn.Module, prefix: str, extra_layer: bool) -> dict[str, torch.Tensor]:
    """A diffusers/transformers CLIP text model -> OpenCLIP's layout (fused in_proj, transposed projection).
    ``extra_layer``: SD 2.x files hold one more block than the model uses (a copy of the last here)."""
    sd = {k.removeprefix("text_model."): v for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    out = {prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["final_layer_norm.weight"], prefix + "ln_final.bias": sd["final_layer_norm.bias"]}
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    layers = int(text.config.num_hidden_layers)
    for i in range(layers + (1 if extra_layer else 0)):
        src, dst = f"encoder.layers.{min(i, layers - 1)}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([sd[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[dst + f"{b}.{kind}"] = sd[src + f"{a}.{kind}"]
    if extra_layer:
        out[prefix + "text_projection"] = torch.zeros(int(text.config.hidden_size), int(text.config.projection_dim))
    return out


def _clip_to_ldm(text: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v
            for k, v in text.state_dict().items() if not k.endswith("position_ids")}


def to_state_dict(components) -> dict[str, torch.Tensor]:
    """The model's weights in the single-file (LDM / SGM) layout of its family."""
    c = components
    sd = {**_unet_to_ldm(c.unet), **_vae_to_ldm(c.vae)}
    if c.family == "sdxl":
        sd.update(_clip_to_ldm(c.text_encoder, CLIP_XL))
        sd.update(_openclip_to_ldm(c.text_encoder_2, OPENCLIP_XL, extra_layer=False))
    elif c.family == "sd2":
        sd.update(_openclip_to_ldm(c.text_encoder, OPENCLIP_SD2, extra_layer=True))
    else:
        sd.update(_clip_to_ldm(c.text_encoder, CLIP_SD1))
    return sd


def save_single_file(components, path: str | Path, dtype: torch.dtype = torch.float16,
                     record_config: bool | None = None, extra: dict | None = None) -> Path:
    """Write ``components`` as a web UI checkpoint (``.safetensors``, or a weights-only ``.ckpt``
    pickle). ``record_config``: store the configurations in the file (default: when the
    architecture is not its family's, e.g. a random test model). ``extra``: more tensors (e.g.
    ``model_ema.*`` to make an EMA file)."""
    path = Path(path)
    c = components
    sd = {k: (v.to(dtype, copy=True) if v.is_floating_point() else v.clone()).contiguous()
          for k, v in to_state_dict(c).items()}
    sd.update(extra or {})
    configs = {"unet": dict(c.unet.config), "vae": dict(c.vae.config), "text": _text_config(c.text_encoder),
               "scheduler": dict(SCHEDULER, prediction_type=c.noise_schedule.prediction_type)}
    if c.text_encoder_2 is not None:
        configs["text_2"] = _text_config(c.text_encoder_2)
    standard = family_config(c.family, c.inpainting, c.noise_schedule.prediction_type == "v_prediction")
    if record_config is None:
        record_config = any(_differs(configs[k], standard[k]) for k in ("unet", "vae", "text", "text_2") if k in configs)
    configs = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in configs.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path), metadata={CONFIG_KEY: json.dumps(configs)} if record_config else None)
    else:
        obj = {"state_dict": sd}
        if record_config:
            obj[CONFIG_KEY] = json.dumps(configs)
        torch.save(obj, path)
    return path


def _text_config(text: torch.nn.Module) -> dict:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "projection_dim", "hidden_act")
    return {k: getattr(text.config, k) for k in keys}


def _differs(given: dict, standard: dict) -> bool:
    def norm(v):
        return list(v) if isinstance(v, tuple) else v
    return any(norm(given.get(k)) != norm(v) for k, v in standard.items())
