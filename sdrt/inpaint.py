"""Inpainting as the web UI does it (``modules/processing.py`` StableDiffusionProcessingImg2Img.init,
``modules/masking.py``, ``sd_samplers_cfg_denoiser.py``):

- the mask (white = repaint; a transparent RGBA mask is read from its alpha channel) is made
  binary, inverted with ``inpainting_mask_invert``, blurred (``mask_blur``: a Gaussian of that
  sigma across, then down, kernel ``2 * int(2.5 * sigma + 0.5) + 1``, edges reflected);
- ``inpaint_full_res`` ("only masked"): the mask's bounding box, grown by
  ``inpaint_full_res_padding`` and widened to the output's aspect ratio, is cropped from the image
  and the mask, processed at the output size, and pasted back into the full image (the result
  has the init image's size); a blank mask turns it into plain img2img. Otherwise image and mask
  are resized with the request's resize mode;
- ``inpainting_fill``: 0 fills the masked area with blurred colours from around it before
  encoding, 1 keeps the original, 2 replaces its latents with the image's noise, 3 with zeros;
- at every step the denoised prediction keeps the init latents outside the mask (the latent
  mask is the blurred mask resized to the latent size, rounded with ``mask_round``); after the
  last step the latents are blended the same way, and after decoding the original pixels are
  composited back outside the blurred mask (the "overlay");
- 9-channel inpainting models also get, at every call, the latent mask and the VAE latents of
  the image with the masked area removed (``source * (1 - mask)``; the web UI's
  ``inpainting_image_conditioning`` with ``inpainting_mask_weight`` 1).

sdrt computes the blur in numpy (OpenCV's ``GaussianBlur`` in the web UI; the 8-bit results can
differ by one level), and draws the masked-image encoding's sample from the image's seed + 1 +
``sdrt.img2img.ENCODE_SEED_OFFSET`` (the web UI uses torch's global generator).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .images import resize_image

FILL_MODES = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


def binary_mask(mask: Image.Image, round_: bool = True) -> Image.Image:
    """The web UI's ``create_binary_mask``: a transparent RGBA mask is its alpha channel (> 128
    when rounding), anything else its luminance."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        alpha = mask.split()[-1].convert("L")
        return alpha.point(lambda v: 255 if v > 128 else 0) if round_ else alpha
    return mask.convert("L")


def _gauss(sigma: float) -> np.ndarray:
    k = 2 * int(2.5 * sigma + 0.5) + 1
    x = np.arange(k, dtype=np.float64) - (k - 1) / 2
    w = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return w / w.sum()


def blur(mask: Image.Image, sigma_x: float, sigma_y: float) -> Image.Image:
    """A separable Gaussian blur of an L image, across then down, edges reflected (OpenCV's
    BORDER_REFLECT_101), rounded back to 8 bits."""
    a = np.asarray(mask, dtype=np.float64)
    for axis, sigma in ((1, sigma_x), (0, sigma_y)):
        if sigma <= 0:
            continue
        w = _gauss(sigma)
        r = len(w) // 2
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(a, pad, mode="reflect" if a.shape[axis] > 1 else "edge")
        a = sum(w[i] * np.take(p, np.arange(i, i + a.shape[axis]), axis=axis) for i in range(len(w)))
        a = np.clip(np.rint(a), 0, 255)
    return Image.fromarray(a.astype(np.uint8))


def crop_region(mask: Image.Image, pad: int = 0) -> tuple[int, int, int, int] | None:
    """The web UI's ``get_crop_region_v2``: the box around the mask's non-zero pixels, grown by ``pad``."""
    box = mask.getbbox()
    if not box:
        return None
    x1, y1, x2, y2 = box
    return (max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)) if pad else box


def _grow(a1: int, a2: int, diff: int, limit: int) -> tuple[int, int]:
    """One side of ``expand_crop_region``: grow [a1, a2) by ``diff``, centred, then shifted back inside [0, limit]."""
    a1 -= diff // 2
    a2 += diff - diff // 2
    if a2 >= limit:
        a1, a2 = a1 - (a2 - limit), limit
    if a1 < 0:
        a1, a2 = 0, a2 - a1
    return a1, min(a2, limit)


def expand_crop_region(region, width: int, height: int, image_width: int, image_height: int):
    """The web UI's ``expand_crop_region``: widen the box to the output's aspect ratio, inside the image."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The web UI's ``masking.fill``: the masked area painted with ever less blurred copies of the
    unmasked pixels."""
    out = Image.new("RGBA", image.size)
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


@dataclass
class Inpainting:
    """One image's inpainting inputs, at the output size, and what puts the result back."""

    image: Image.Image          # what is encoded (cropped, resized, filled)
    mask: Image.Image           # L, the output's size: white = repaint
    overlay: Image.Image        # RGBA: the original pixels outside the (blurred) mask
    paste_to: tuple[int, int, int, int] | None     # (x, y, w, h) in the original: "only masked"
    crop: bool                  # "only masked" was applied (False: the mask was blank)


def prepare(image: Image.Image, mask: Image.Image, width: int, height: int, *, resize_mode: int = 0,
            mask_blur: int = 4, invert: bool = False, fill_mode: int = 0, full_res: bool = True,
            padding: int = 0, round_: bool = True) -> Inpainting:
    """One init image and its mask, processed as the web UI's img2img init processes them."""
    if mask.size != image.size:
        raise ValueError(f"mask is {mask.width}x{mask.height} but its init image is {image.width}x{image.height}; "
                         "give a mask of the image's size")
    m = binary_mask(mask, round_)
    if invert:
        m = ImageOps.invert(m)
    if mask_blur > 0:
        m = blur(m, mask_blur, mask_blur)
    paste_to, region = None, None
    if full_res:
        overlay_mask = m
        region = crop_region(m, padding)
        if region:
            region = expand_crop_region(region, width, height, m.width, m.height)
            x1, y1, x2, y2 = region
            latent_mask = resize_image(2, m.crop(region), width, height)
            paste_to = (x1, y1, x2 - x1, y2 - y1)
        else:                         # a blank mask: plain img2img (the web UI says so and goes on)
            latent_mask = resize_image(resize_mode if resize_mode != 3 else 0, m, width, height)
    else:
        latent_mask = resize_image(resize_mode if resize_mode != 3 else 0, m, width, height)
        overlay_mask = Image.fromarray(np.clip(np.asarray(latent_mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8))
    if region is None and resize_mode != 3:
        image = resize_image(resize_mode, image, width, height)
    if overlay_mask.size != image.size:
        overlay_mask = resize_image(resize_mode if resize_mode != 3 else 0, overlay_mask, image.width, image.height)
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask.convert("L")))
    overlay = masked.convert("RGBA")
    if region is not None:
        image = resize_image(2, image.crop(region), width, height)
    if fill_mode != 1:                # the web UI fills for the latent modes too (the edges, the 9-channel input)
        image = fill(image, latent_mask)
    return Inpainting(image=image, mask=latent_mask.convert("L"), overlay=overlay, paste_to=paste_to,
                      crop=region is not None)


def latent_mask(mask: Image.Image, size: tuple[int, int], round_: bool = True) -> np.ndarray:
    """(h, w) float32 in [0, 1], 1 = repaint: the mask at the latent size (PIL's default resampling
    of an RGB image, as the web UI resizes it), rounded with ``mask_round``."""
    m = np.asarray(mask.convert("RGB").resize(size), dtype=np.float32)[..., 0] / 255.0
    return np.around(m) if round_ else m


def apply_overlay(image: Image.Image, item: Inpainting) -> Image.Image:
    """The web UI's ``apply_overlay``: the result placed back into the original (``paste_to``), and
    the original pixels composited over it outside the mask."""
    if item.paste_to is not None:
        x, y, w, h = item.paste_to
        base = Image.new("RGBA", item.overlay.size)
        base.paste(resize_image(1, image, w, h), (x, y))
        image = base
    image = image.convert("RGBA")
    image.alpha_composite(item.overlay)
    return image.convert("RGB")
