"""The web UI's "Extras" upscaling (``modules/upscaler.py``, ``scripts/postprocessing_upscale.py``)
with the upscalers sdrt has: ``None``, ``Lanczos`` and ``Nearest``. ESRGAN-family models (local
files) are not in this release; asking for one is a ValueError naming what there is.

An upscaler scales by ``scale`` to a size rounded down to a multiple of 8 (the web UI's
``Upscaler.upscale``): ``Lanczos`` and ``Nearest`` resize by the factor with their filter, then
any difference to that size is made up with Lanczos; ``None`` only does the final Lanczos resize.
``extras`` adds the two modes of the Extras tab (scale by, or scale to a size with an optional
centre crop) and a second upscaler blended in with a visibility, and returns the web UI's
``Postprocess ...`` info.
"""
from __future__ import annotations

from PIL import Image

UPSCALERS = ("None", "Lanczos", "Nearest")
MAX_SIDE = 8192


def check_upscaler(name) -> str:
    if name not in UPSCALERS:
        raise ValueError(f"upscaler {name!r} is not available; sdrt has {', '.join(UPSCALERS)} (ESRGAN-family models "
                         "are not in this release)")
    return name


def upscale(image: Image.Image, scale: float, name: str) -> Image.Image:
    """``image`` scaled by ``scale`` with upscaler ``name``, to a size rounded down to a multiple of 8."""
    check_upscaler(name)
    dest = (int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8))
    if min(dest) < 8 or max(dest) > MAX_SIDE:
        raise ValueError(f"upscaling {image.width}x{image.height} by {scale:g} gives {dest[0]}x{dest[1]}; each side "
                         f"must be within 8..{MAX_SIDE}")
    if name != "None":
        resample = Image.Resampling.LANCZOS if name == "Lanczos" else Image.Resampling.NEAREST
        for _ in range(3):
            if image.width >= dest[0] and image.height >= dest[1]:
                break
            image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
    if image.size != dest:
        image = image.resize(dest, resample=Image.Resampling.LANCZOS)
    return image


def extras(image: Image.Image, resize_mode: int = 0, upscaling_resize: float = 2.0, upscaling_resize_w: int = 512,
           upscaling_resize_h: int = 512, upscaling_crop: bool = True, upscaler_1: str = "None",
           upscaler_2: str = "None", extras_upscaler_2_visibility: float = 0.0) -> tuple[Image.Image, dict]:
    """The Extras tab's upscaling of one image: (the image, the web UI's postprocess info)."""
    check_upscaler(upscaler_1)
    check_upscaler(upscaler_2)
    if resize_mode not in (0, 1):
        raise ValueError(f"resize_mode {resize_mode!r}: 0 scales by upscaling_resize, 1 to upscaling_resize_w/h")
    if not 0.0 <= extras_upscaler_2_visibility <= 1.0:
        raise ValueError(f"extras_upscaler_2_visibility must be in [0, 1], got {extras_upscaler_2_visibility}")
    image = image.convert("RGB")
    info: dict = {}
    if resize_mode == 1:
        if not (8 <= upscaling_resize_w <= MAX_SIDE and 8 <= upscaling_resize_h <= MAX_SIDE):
            raise ValueError(f"upscaling_resize_w/h must be within 8..{MAX_SIDE}, got "
                             f"{upscaling_resize_w}x{upscaling_resize_h}")
        scale = max(upscaling_resize_w / image.width, upscaling_resize_h / image.height)
        info["Postprocess upscale to"] = f"{upscaling_resize_w}x{upscaling_resize_h}"
    else:
        if not 0 < upscaling_resize <= 8:
            raise ValueError(f"upscaling_resize must be in (0, 8], got {upscaling_resize}")
        scale = upscaling_resize
        info["Postprocess upscale by"] = upscaling_resize

    def one(name):
        out = upscale(image, scale, name)
        if resize_mode == 1 and upscaling_crop:
            cropped = Image.new("RGB", (upscaling_resize_w, upscaling_resize_h))
            cropped.paste(out, box=(upscaling_resize_w // 2 - out.width // 2, upscaling_resize_h // 2 - out.height // 2))
            out = cropped
        return out
    result = one(upscaler_1)
    if resize_mode == 1 and upscaling_crop:
        info["Postprocess crop to"] = f"{result.width}x{result.height}"
    info["Postprocess upscaler"] = upscaler_1
    if upscaler_2 != "None" and extras_upscaler_2_visibility > 0:
        second = one(upscaler_2)
        if second.size != result.size:
            second = second.resize(result.size, resample=Image.Resampling.LANCZOS)
        result = Image.blend(result, second, extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = upscaler_2
    return result, info
