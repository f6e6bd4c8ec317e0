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
