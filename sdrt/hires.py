"""The hires fix as the web UI does it (``StableDiffusionProcessingTxt2Img``: ``init``,
``sample``, ``sample_hr_pass``, ``calculate_hr_conds``):

- **Size.** ``hr_scale`` times the first pass's size, or ``hr_resize_x``/``hr_resize_y`` (one
  given: the other keeps the aspect ratio; both: the image is scaled to cover that size and the
  excess cropped from the centre, ``truncate_x/y``). sdrt rounds the second pass's size down to a
  multiple of the latent factor (the web UI's latent path does the same; its pixel path would
  encode an odd size).
- **Upscaling.** The ``Latent*`` upscalers interpolate the first pass's latents
  (bilinear/bicubic/nearest/nearest-exact, with or without antialiasing); ``None`` and
  ``Lanczos`` resize the first pass's 8-bit image with Lanczos and ``Nearest`` with nearest
  neighbours, then encode it (the web UI's pixel upscalers; ESRGAN-family models are not in
  sdrt).
- **Second pass.** img2img of that at the new size with ``denoising_strength``, running exactly
  ``hr_second_pass_steps`` (or ``steps``) steps from a schedule planned for steps / strength
  (the web UI calls ``sample_img2img`` with explicit steps, which takes the fixed-steps rule),
  with ``hr_sampler_name``/``hr_scheduler`` (default: the first pass's), ``hr_prompt`` /
  ``hr_negative_prompt`` (default: the first pass's) and fresh noise from each image's seed at
  the new latent size. Prompt editing spans both passes: in the second pass a fraction ``f``
  switches at ``(f - 1) * steps`` and a step number ``n`` at ``n - first pass steps`` (so
  ``[a:b:1.5]`` switches half way through the second pass; ``prompts.schedules(hires_steps=)``).
- **Infotext.** The first pass's ``Size``, then ``Denoising strength``, ``Hires upscale`` or
  ``Hires resize``, ``Hires steps`` (when set), ``Hires upscaler``, and ``Hires sampler``,
  ``Hires schedule type``, ``Hires prompt``, ``Hires negative prompt`` when they differ.
"""
from __future__ import annotations

from dataclasses import dataclass

LATENT_MODES = {
    "Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")
UPSCALERS = tuple(LATENT_MODES) + PIXEL_UPSCALERS


@dataclass(frozen=True)
class HiresPlan:
    upscale_to: tuple[int, int]       # (w, h) the first pass's image is scaled to
    size: tuple[int, int]             # (w, h) of the second pass (after the centre crop)
    truncate: tuple[int, int]         # latent columns, rows cropped (x, y): both resize sides given
    upscaler: str
    steps: int                        # the second pass's steps
    sampler: str | None
    schedule: str | None
    infotext: dict

    @property
    def latent_mode(self) -> tuple[str, bool] | None:
        return LATENT_MODES.get(self.upscaler)


def plan_hires(p, width: int, height: int, latent_factor: int) -> HiresPlan:
    """The second pass of a txt2img ``GenerationParams`` with ``enable_hr`` (ValueError naming
    the argument)."""
    from .params import MAX_SIDE, MAX_STEPS, float_arg, int_arg
    from .samplers import resolve_sampler
    from .schedules import normalize_schedule
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
    float_arg("denoising_strength", p.denoising_strength, 0.0, 1.0)
    if p.denoising_strength <= 0:
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


def upscale_latents(latents, plan: HiresPlan, latent_factor: int):
    """The first pass's latents at the second pass's latent size (a ``Latent*`` upscaler)."""
    import torch
    mode, antialias = plan.latent_mode
    f = latent_factor
    up = torch.nn.functional.interpolate(latents, size=(plan.upscale_to[1] // f, plan.upscale_to[0] // f),
                                         mode=mode, antialias=antialias)
    tx, ty = plan.truncate
    return up[:, :, ty // 2:up.shape[2] - (ty + 1) // 2, tx // 2:up.shape[3] - (tx + 1) // 2]


def upscale_image(image, plan: HiresPlan, latent_factor: int):
    """A first-pass image at the second pass's size (a pixel upscaler), centre-cropped as the
    latents would be."""
    from PIL import Image
    resample = Image.Resampling.NEAREST if plan.upscaler == "Nearest" else Image.Resampling.LANCZOS
    up = image.resize(plan.upscale_to, resample=resample)
    tx, ty = plan.truncate
    f = latent_factor
    left, top = tx // 2 * f, ty // 2 * f
    return up.crop((left, top, left + plan.size[0], top + plan.size[1]))
