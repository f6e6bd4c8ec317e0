"""The generation arguments, declared once.

``GenerationParams`` is every argument of a text-to-image generation: its type, default and
one-line help, and where the web UI's HTTP API carries it. Everything else is derived from it:

- ``Pipeline.__call__(prompt, **fields)`` builds one (or takes one);
- ``sdrt.Request``, the batcher's one-image request, is this class plus a timeout;
- ``sdrt generate``'s flags come from ``add_arguments`` / ``from_arguments``;
- the web UI's txt2img request model (``sdrt.serving.app.Txt2Img``) takes its fields from the
  ``webui`` names below.

Adding a parameter is one field here (with its metadata) plus its use. ``validate`` turns the
arguments into a ``Job``: normalised values, one entry per image for what may differ between
images, every error a ``ValueError`` naming the argument and its valid range.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import options
from .conditioning import EMPHASIS
from .options import declared, option
from .rng import SOURCES, check_seed
from .samplers import SAMPLERS, SamplerSpec, resolve_sampler
from .schedules import SCHEDULES, normalize_schedule

MAX_SIDE = 8192
MAX_BATCH = 256
MAX_STEPS = 10000


def param(default, help: str, *, per_image: bool = False, webui: str | None = None,
          webui_default=dataclasses.MISSING, webui_option: str | None = None, **cli):
    """A generation argument (``sdrt.options.option`` plus where the web UI carries it).

    Args:
        default: the Python API's default.
        help: one line, shown by ``sdrt generate --help`` and in the docs.
        per_image: a list with one value per image is accepted too; the batcher lets requests
            that differ only in such arguments share a batch.
        webui: the field's name in the web UI's txt2img request (None: not in the request).
        webui_default: the web UI's default where it differs from sdrt's.
        webui_option: the web UI option (``override_settings`` key) that carries it instead.
        cli: ``flags``, ``cli``, ``choices``, ``metavar`` of ``sdrt.options.option``.
    """
    return option(default, help, per_image=per_image, webui=webui,
                  webui_default=default if webui_default is dataclasses.MISSING else webui_default,
                  webui_option=webui_option, **cli)


@dataclass
class GenerationParams:
    """The arguments of one text-to-image generation (see the module docstring).

    ``prompt``, ``negative_prompt``, ``seed``, ``subseed`` and ``cfg_scale`` also take a list
    with one value per image; a list of prompts sets the batch size.
    """

    prompt: str | list[str] = param(
        "", "the prompt, in the web UI's syntax ((word:1.2), [a:b:0.5], [a|b], BREAK, AND)",
        per_image=True, flags=("prompt",), webui="prompt")
    negative_prompt: str | list[str] = param(
        "", "what the image should not show", per_image=True, flags=("-n", "--negative-prompt"),
        webui="negative_prompt")
    steps: int = param(20, f"sampling steps, 1..{MAX_STEPS}", webui="steps", webui_default=50)
    cfg_scale: float | list[float] = param(7.0, "classifier-free guidance scale", per_image=True,
                                           webui="cfg_scale")
    sampler: str = param("Euler a", "a web UI sampler name: " + ", ".join(SAMPLERS))
    schedule: str = param("Automatic", "a web UI schedule type: " + ", ".join(SCHEDULES))
    seed: int | list[int] = param(-1, "the first image's seed (image i gets seed + i); -1: random",
                                  per_image=True, webui="seed")
    width: int = param(512, "image width in pixels, a multiple of the model's latent factor", webui="width")
    height: int = param(512, "image height in pixels, a multiple of the model's latent factor", webui="height")
    batch_size: int = param(1, f"images per batch, 1..{MAX_BATCH}", webui="batch_size")
    clip_skip: int = param(1, "stop the text encoder that many layers before its last (1: the last)",
                           webui_option="CLIP_stop_at_last_layers")
    rng: str = param("gpu", "noise source: gpu (the device's generator), cpu or nv (NVIDIA's Philox)",
                     choices=SOURCES, webui_option="randn_source")
    eta_noise_seed_delta: int = param(0, "ENSD: added to the seed of the samplers' noise", flags=("--ensd",), metavar="N",
                                      webui_option="eta_noise_seed_delta")
    subseed: int | list[int] = param(-1, "variation seed (-1: random)", per_image=True, webui="subseed")
    subseed_strength: float = param(0.0, "how much of the variation seed's noise, 0..1", webui="subseed_strength")
    seed_resize_from: tuple[int, int] | None = param(
        None, "the web UI's 'resize seed from': the size whose noise is placed in this one", metavar="WxH")
    eta: float | None = param(None, "the ancestral samplers' eta (None: the sampler's default)", webui="eta")
    emphasis: str = param("Original", "how token weights apply: " + ", ".join(EMPHASIS), choices=EMPHASIS,
                          webui_option="emphasis")
    vae: str = param("Automatic", "the VAE: Automatic (the model's own), or a VAE file (a path, or a name in the "
                     "VAE folder)", webui_option="sd_vae", metavar="FILE")
    sigmas: Sequence[float] | None = param(None, "explicit decreasing sigmas (overrides schedule and steps)",
                                           cli=False)
    # img2img (sdrt.img2img): with init images the generation starts from them
    init_images: object = param(None, "img2img: the initial image, or one per image (PIL images, paths, bytes, "
                                "base64 or data URLs)", per_image=True, cli=False)
    denoising_strength: float = param(0.75, "img2img: how much of the initial image is noised and denoised again, "
                                      "0..1", flags=("--strength",), webui="denoising_strength")
    resize_mode: int = param(0, "img2img: how the initial image takes the output size: 0 just resize, 1 crop and "
                             "resize, 2 resize and fill, 3 just resize in latent space", choices=(0, 1, 2, 3))
    img2img_fix_steps: bool = param(False, "img2img: run all the steps (the schedule planned for steps / strength) "
                                    "instead of steps x strength", webui_option="img2img_fix_steps")
    initial_noise_multiplier: float = param(1.0, "img2img: scales the noise added to the initial image",
                                            webui_option="initial_noise_multiplier")
    # inpainting (sdrt.inpaint): img2img with a mask; the defaults are the web UI API's
    mask: object = param(None, "inpainting: the mask of the initial image, white = repaint (an image like "
                         "init_images; transparent RGBA: its alpha)", per_image=True, cli=False)
    mask_blur: int = param(4, "inpainting: the mask's Gaussian blur, in pixels")
    inpainting_mask_invert: bool = param(False, "inpainting: repaint what the mask leaves black", flags=("--invert-mask",))
    inpainting_fill: int = param(0, "inpainting: the masked area before denoising: 0 fill (blurred surroundings), "
                                 "1 original, 2 latent noise, 3 latent nothing", choices=(0, 1, 2, 3))
    inpaint_full_res: bool = param(True, "inpainting: process only the masked area (padded) at the output size and "
                                   "paste it back (sdrt generate --whole-picture turns it off)", cli=False)
    inpaint_full_res_padding: int = param(0, "inpainting: pixels around the masked area (with inpaint_full_res)",
                                          flags=("--only-masked-padding",))
    mask_round: bool = param(True, "inpainting: round the latent mask to 0/1", cli=False)
    tiling: bool = param(False, "seamless tiling: circular padding in the UNet's and VAE's convolutions (the web UI's "
                         "Tiling)", webui="tiling")
    # hires fix (sdrt.hires): txt2img, then img2img of the upscaled result at a larger size
    enable_hr: bool = param(False, "hires fix: a second pass at a larger size", flags=("--hires",), webui="enable_hr")
    hr_scale: float = param(2.0, "hires fix: the second pass's size as a multiple of the first's",
                            flags=("--hires-scale",), webui="hr_scale")
    hr_resize_x: int = param(0, "hires fix: the second pass's width instead (0: from hr_scale or the height)",
                             flags=("--hires-width",), webui="hr_resize_x")
    hr_resize_y: int = param(0, "hires fix: the second pass's height instead (0: from hr_scale or the width)",
                             flags=("--hires-height",), webui="hr_resize_y")
    hr_upscaler: str = param("Latent", "hires fix: Latent, Latent (antialiased), Latent (bicubic), Latent (bicubic "
                             "antialiased), Latent (nearest), Latent (nearest-exact), None, Lanczos or Nearest",
                             flags=("--hires-upscaler",), webui="hr_upscaler")
    hr_second_pass_steps: int = param(0, "hires fix: the second pass's steps (0: steps)", flags=("--hires-steps",),
                                      webui="hr_second_pass_steps")
    hr_sampler_name: str | None = param(None, "hires fix: the second pass's sampler (None: sampler)",
                                        flags=("--hires-sampler",), webui="hr_sampler_name")
    hr_scheduler: str | None = param(None, "hires fix: the second pass's schedule type (None: schedule)",
                                     flags=("--hires-schedule",), webui="hr_scheduler")
    hr_prompt: str = param("", "hires fix: the second pass's prompt ('': the prompt)", flags=("--hires-prompt",),
                           webui="hr_prompt")
    hr_negative_prompt: str = param("", "hires fix: the second pass's negative prompt ('': the negative prompt)",
                                    flags=("--hires-negative-prompt",), webui="hr_negative_prompt")

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        return declared(GenerationParams)

    @classmethod
    def per_image_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in cls.fields() if f.metadata["per_image"])

    def replace(self, **changes) -> "GenerationParams":
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------ validation

def int_arg(name, value, lo, hi=None, multiple=None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    if multiple and value % multiple:
        raise ValueError(f"{name} must be a multiple of {multiple}, got {value}")
    return value


def float_arg(name, value, lo=None, hi=None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return float(value)


def _prompt_list(name, value, batch_size) -> list[str]:
    if not isinstance(value, (str, list, tuple)):
        raise ValueError(f"{name} must be a string or a list of {batch_size} strings, got {type(value).__name__}")
    values = [value] * batch_size if isinstance(value, str) else list(value)
    if len(values) != batch_size or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{name} must be a string or a list of {batch_size} strings")
    for v in values:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:    # a lone surrogate: what invalid UTF-8 on a command line becomes
            raise ValueError(f"{name} holds a character that is not valid Unicode at position {e.start} "
                             f"({v[e.start]!r}); pass UTF-8 text") from None
    return values


def image_seeds(seed, subseed, batch_size: int, subseed_strength: float) -> tuple[list[int], list[int]]:
    """Each image's (seed, subseed), the web UI's rule: image i gets seed + i, unless a variation
    is mixed in (subseed_strength > 0), then every image keeps the seed and the subseeds count
    up. -1 picks a random start; a list gives each image its own."""
    def listed(name, value, step):
        if isinstance(value, (list, tuple)):
            if len(value) != batch_size:
                raise ValueError(f"{name} must be an integer or a list of {batch_size} integers, got {len(value)}")
            return [check_seed(v, name) for v in value]
        start = check_seed(value, name)
        return [(start + i * step) % 2 ** 32 for i in range(batch_size)]
    return listed("seed", seed, 1 if subseed_strength == 0 else 0), listed("subseed", subseed, 1)


@dataclass
class Job:
    """Validated arguments of one generation (``Pipeline.validate``), the first stage's output.

    ``params`` holds the normalised scalar arguments (the sampler's canonical name, the schedule's
    label, integer sizes; ``steps`` is the number of sampler steps); the per-image values are
    lists of ``batch_size``. ``sigmas`` is the planned noise schedule (steps + 1 values).
    """

    params: GenerationParams
    sampler: SamplerSpec
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    subseeds: list[int]
    cfg_scales: list[float]
    eta: float | None            # what the sampler uses (its default when the request gave none)
    sigmas: np.ndarray | None = None
    # the prompts without their <lora:...> tags (what is tokenized; None: the prompts themselves),
    # and the LoRAs of the batch (the first prompt's, as in the web UI): sdrt.lora.LoraUse
    text_prompts: list[str] | None = None
    loras: tuple = ()
    embeddings_used: set = dataclasses.field(default_factory=set)   # filled by Pipeline.encode (TI hashes)
    # img2img: one RGB image per image of the batch (resized to the output size, except in resize
    # mode 3), and the step count prompt editing counts against (the requested steps)
    init_images: list | None = None
    edit_steps: int | None = None
    init_latents: object = None          # their latents (Pipeline.encode_images, in stage 3)
    encode_seconds: float = 0.0
    inpainting: list | None = None       # per image: sdrt.inpaint.Inpainting (a mask was given)
    latent_mask: object = None           # (B, C, h, w) 1 = repaint (Pipeline.encode_images)
    image_cond: object = None            # 9-channel models: (B, 1 + C, h, w) mask and masked-image latents
    hires: object = None                 # sdrt.hires.HiresPlan: txt2img with enable_hr
    hires_base: int | None = None        # a hires second pass: the first pass's steps (prompt editing offsets)

    @property
    def img2img(self) -> bool:
        """Starts from given images (or latents: the hires fix's second pass)."""
        return self.init_images is not None or self.init_latents is not None

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    @property
    def steps(self) -> int:
        return self.params.steps

    @property
    def model_calls(self) -> int:
        """Model calls as the web UI counts them for prompt editing (two per step for the
        second-order samplers), over the planned sigmas."""
        steps = self.edit_steps or (self.steps if self.sigmas is None else len(self.sigmas) - 1)
        return steps * 2 if self.sampler.second_order else steps

    def batch_key(self) -> tuple:
        """What requests must share to run in one batch: every argument but the per-image ones."""
        shared = [f.name for f in GenerationParams.fields() if not f.metadata["per_image"]
                  and f.name not in ("batch_size", "sigmas")]
        return tuple(getattr(self.params, n) for n in shared) + (
            None if self.sigmas is None else self.sigmas.tobytes(), self.loras, self.img2img, bool(self.inpainting))

    @classmethod
    def merge(cls, jobs: list["Job"]) -> "Job":
        """One batch's job from one-image jobs that share ``batch_key``."""
        first = jobs[0]
        lists = {k: [v for j in jobs for v in getattr(j, k)]
                 for k in ("prompts", "negative_prompts", "seeds", "subseeds", "cfg_scales")}
        lists["text_prompts"] = [v for j in jobs for v in (j.text_prompts or j.prompts)]
        if first.img2img:
            lists["init_images"] = [v for j in jobs for v in j.init_images]
        if first.inpainting:
            lists["inpainting"] = [v for j in jobs for v in j.inpainting]
        return dataclasses.replace(first, params=first.params.replace(batch_size=len(jobs)), **lists)


def validate(p: GenerationParams, latent_factor: int, text_layers: int) -> Job:
    """Check every argument before any network runs (``ValueError`` naming the argument)."""
    if not isinstance(p, GenerationParams):
        raise ValueError(f"expected GenerationParams, got {type(p).__name__}")
    steps = int_arg("steps", p.steps, 1, MAX_STEPS)
    batch = int_arg("batch_size", p.batch_size, 1, MAX_BATCH)
    width = int_arg("width", p.width, latent_factor, MAX_SIDE, multiple=latent_factor)
    height = int_arg("height", p.height, latent_factor, MAX_SIDE, multiple=latent_factor)
    clip_skip = int_arg("clip_skip", p.clip_skip, 1, text_layers)
    spec, schedule = resolve_sampler(p.sampler, p.schedule)
    schedule = normalize_schedule(schedule)
    if p.emphasis not in EMPHASIS:
        raise ValueError(f"emphasis {p.emphasis!r} is unknown; valid: {', '.join(EMPHASIS)}")
    if not isinstance(p.vae, str):
        raise ValueError(f"vae must be a string (Automatic, None, or a VAE file), got {type(p.vae).__name__}")
    if p.rng not in SOURCES:
        raise ValueError(f"rng {p.rng!r} is unknown; valid: {', '.join(SOURCES)}")
    ensd = int_arg("eta_noise_seed_delta", p.eta_noise_seed_delta, 0, 2 ** 32 - 1)
    strength = float_arg("subseed_strength", p.subseed_strength, 0.0, 1.0)
    eta = None if p.eta is None else float_arg("eta", p.eta, 0.0, 10.0)
    resize = p.seed_resize_from
    if resize is not None:
        if not isinstance(resize, (tuple, list)) or len(resize) != 2:
            raise ValueError(f"seed_resize_from must be (width, height) in pixels, got {resize!r}")
        resize = (int_arg("seed_resize_from width", resize[0], 0, MAX_SIDE),
                  int_arg("seed_resize_from height", resize[1], 0, MAX_SIDE))
    if isinstance(p.prompt, (list, tuple)):      # a list of prompts sets the batch size
        batch = int_arg("number of prompts", len(p.prompt), 1, MAX_BATCH)
    float_arg("denoising_strength", p.denoising_strength, 0.0, 1.0)
    float_arg("initial_noise_multiplier", p.initial_noise_multiplier, 0.0, 10.0)
    images = inpainting = hires = None
    if p.enable_hr and p.init_images is None:
        hires = plan_hires(p, width, height, latent_factor)
    if p.init_images is not None:              # one image serves the batch; several set its size
        images, batch = _init_images(p, batch, width, height)
        if p.mask is not None:
            images, inpainting = _inpainting(p, images, width, height)
    elif p.mask is not None:
        raise ValueError("mask is for inpainting: give init_images too")
    prompts = _prompt_list("prompt", p.prompt, batch)
    negatives = _prompt_list("negative_prompt", p.negative_prompt, batch)
    if isinstance(p.cfg_scale, (list, tuple)):
        if len(p.cfg_scale) != batch:
            raise ValueError(f"cfg_scale must be a number or a list of {batch} numbers")
        scales = [float_arg("cfg_scale", v) for v in p.cfg_scale]
    else:
        scales = [float_arg("cfg_scale", p.cfg_scale)] * batch
    seeds, subseeds = image_seeds(p.seed, p.subseed, batch, strength)
    sigmas = None
    if p.sigmas is not None:
        try:
            sigmas = np.asarray(p.sigmas, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("sigmas must be a decreasing list of at least 2 finite values >= 0") from None
        if (sigmas.ndim != 1 or len(sigmas) < 2 or not np.all(np.isfinite(sigmas)) or np.any(sigmas < 0)
                or np.any(np.diff(sigmas) >= 0)):
            raise ValueError("sigmas must be a decreasing list of at least 2 finite values >= 0")
        steps = len(sigmas) - 1
    params = p.replace(steps=steps, batch_size=batch, width=width, height=height, clip_skip=clip_skip,
                       sampler=spec.name, schedule=schedule, eta_noise_seed_delta=ensd, subseed_strength=strength,
                       eta=eta, seed_resize_from=resize, sigmas=None if sigmas is None else tuple(sigmas),
                       init_images=None, mask=None)
    return Job(params=params, sampler=spec, prompts=prompts, negative_prompts=negatives, seeds=seeds,
               subseeds=subseeds, cfg_scales=scales, eta=spec.eta_default if eta is None else eta, sigmas=sigmas,
               init_images=images, edit_steps=steps if images is not None and sigmas is None else None,
               inpainting=inpainting, hires=hires)


def _init_images(p: GenerationParams, batch: int, width: int, height: int) -> tuple[list, int]:
    """img2img's images, read and resized (``sdrt.images``), one per image of the batch: one image
    serves the whole batch; fewer images than ``batch_size`` make the batch that size (the web
    UI's rule); more are refused."""
    from .images import RESIZE_MODES, load_image, resize_image
    values = list(p.init_images) if isinstance(p.init_images, (list, tuple)) else [p.init_images]
    if not values:
        raise ValueError("init_images is empty; give an image, or leave it out for txt2img")
    if len(values) > batch:
        raise ValueError(f"init_images: {len(values)} images for a batch of {batch}; give one image, or at most "
                         "batch_size (or one per prompt)")
    mode = p.resize_mode
    if isinstance(mode, bool) or mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode {mode!r} is unknown; valid: "
                         + ", ".join(f"{k} ({v})" for k, v in RESIZE_MODES.items()))
    images = [load_image(v, f"init_images[{i}]") for i, v in enumerate(values)]
    if p.mask is None:
        images = [resize_image(mode, im, width, height) for im in images]
    if len(images) == 1:
        return images * batch, batch
    return images, len(images)


def plan_hires(p, width: int, height: int, latent_factor: int) -> "HiresPlan":  # noqa: F821 - sdrt.hires
    """The second pass of a txt2img ``GenerationParams`` with ``enable_hr`` (ValueError naming
    the argument)."""
    from .hires import UPSCALERS, HiresPlan
    f = latent_factor
    rx = int_arg("hr_resize_x", p.hr_resize_x, 0, MAX_SIDE)
    ry = int_arg("hr_resize_y", p.hr_resize_y, 0, MAX_SIDE)
    info: dict = {}
    truncate = (0, 0)
    if rx == 0 and ry == 0:
        scale = float_arg("hr_scale", p.hr_scale, 1.0, 8.0)
        to = (int(width * scale), int(height * scale))
        info["Hires upscale"] = p.hr_scale
    else:
        info["Hires resize"] = f"{rx}x{ry}"
        if ry == 0:
            to = (rx, rx * height // width)
        elif rx == 0:
            to = (ry * width // height, ry)
        else:
            if width / height < rx / ry:
                to = (rx, rx * height // width)
            else:
                to = (ry * width // height, ry)
            truncate = ((to[0] - rx) // f, (to[1] - ry) // f)
    to = (to[0] // f * f, to[1] // f * f)
    size = (to[0] - truncate[0] * f, to[1] - truncate[1] * f)
    if min(size) < f or max(size) > MAX_SIDE:
        raise ValueError(f"hires fix: the second pass would be {size[0]}x{size[1]}; it must be within "
                         f"{f}..{MAX_SIDE} pixels a side")
    if p.hr_upscaler not in UPSCALERS:
        raise ValueError(f"hr_upscaler {p.hr_upscaler!r} is unknown; valid: {', '.join(UPSCALERS)} (ESRGAN-family "
                         "upscalers are not in sdrt)")
    steps = int_arg("hr_second_pass_steps", p.hr_second_pass_steps, 0, MAX_STEPS) or p.steps
    if p.denoising_strength <= 0:        # (its range: validate)
        raise ValueError("hires fix: denoising_strength must be > 0 (the second pass plans steps / strength)")
    sampler = schedule = None
    if p.hr_sampler_name not in (None, "", "Use same sampler"):
        sampler = resolve_sampler(p.hr_sampler_name, p.hr_scheduler or "Automatic")[0].name
    if p.hr_scheduler not in (None, "", "Use same scheduler"):
        schedule = normalize_schedule(resolve_sampler(sampler or p.sampler, p.hr_scheduler)[1])
    if p.hr_second_pass_steps:
        info["Hires steps"] = p.hr_second_pass_steps
    info["Hires upscaler"] = p.hr_upscaler
    if sampler is not None:
        info["Hires sampler"] = sampler
    if schedule is not None:
        info["Hires schedule type"] = schedule
    if p.hr_prompt:
        info["Hires prompt"] = p.hr_prompt
    if p.hr_negative_prompt:
        info["Hires negative prompt"] = p.hr_negative_prompt
    return HiresPlan(upscale_to=to, size=size, truncate=truncate, upscaler=p.hr_upscaler, steps=steps,
                     sampler=sampler, schedule=schedule, infotext=info)


def _inpainting(p: GenerationParams, images: list, width: int, height: int) -> tuple[list, list]:
    """Each image with its mask (one mask for all, or one per image), processed as the web UI
    processes them (``sdrt.inpaint.prepare``): the images to encode, and the inpainting inputs."""
    from .images import load_image
    from .inpaint import FILL_MODES, prepare
    masks = list(p.mask) if isinstance(p.mask, (list, tuple)) else [p.mask]
    if len(masks) not in (1, len(images)):
        raise ValueError(f"mask: {len(masks)} masks for {len(images)} images; give one mask, or one per image")
    blur = int_arg("mask_blur", p.mask_blur, 0, 256)
    pad = int_arg("inpaint_full_res_padding", p.inpaint_full_res_padding, 0, MAX_SIDE)
    if isinstance(p.inpainting_fill, bool) or p.inpainting_fill not in FILL_MODES:
        raise ValueError(f"inpainting_fill {p.inpainting_fill!r} is unknown; valid: "
                         + ", ".join(f"{k} ({v})" for k, v in FILL_MODES.items()))
    loaded = [load_image(m, f"mask[{i}]", mask=True) for i, m in enumerate(masks)]
    items = [prepare(im, loaded[i % len(loaded)], width, height, resize_mode=p.resize_mode, mask_blur=blur,
                     invert=bool(p.inpainting_mask_invert), fill_mode=p.inpainting_fill,
                     full_res=bool(p.inpaint_full_res), padding=pad, round_=bool(p.mask_round))
             for i, im in enumerate(images)]
    return [item.image for item in items], items


# ------------------------------------------------------------------ the command line

def scalar_type(f: dataclasses.Field):
    """int, float or str: the type of one value of a generation argument (None for a pair)."""
    return options.scalar_type(GenerationParams, f)


def add_arguments(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """``sdrt generate``'s generation flags, one per field (a flag left out keeps the default)."""
    options.add_arguments(parser, GenerationParams, defaults)


def from_arguments(args: argparse.Namespace, **defaults) -> GenerationParams:
    """The GenerationParams of parsed flags; ``defaults`` fill what the command line left out."""
    return options.from_arguments(GenerationParams, args, **defaults)
