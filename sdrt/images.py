"""Input images (img2img's init images, and later masks): read from what users pass, checked,
and resized as the web UI resizes them.

``load_image`` accepts a ``PIL.Image``, a path, raw file bytes, base64 text or a data URL
(``data:image/png;base64,...``, what the web UI's clients send) and an ``(H, W, 3|4)`` uint8 array;
anything it cannot use is a ``ValueError`` that says why (not an image, truncated, animated,
too small, too large, a pixel format other than 8-bit grey/RGB/RGBA/palette). A transparent image
is flattened over white, as the web UI flattens over its ``img2img_background_color``.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

LANCZOS = Image.Resampling.LANCZOS
MIN_SIDE = 8                       # smaller images cannot be encoded into even one latent pixel
MAX_PIXELS = 8192 * 8192           # PIL's decompression-bomb guard, at the largest size sdrt generates
RESIZE_MODES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill", 3: "Just resize (latent upscale)"}
_MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "1"}      # 8-bit (or 1-bit) greys and colours


def _decode_text(text: str, name: str) -> bytes:
    head, sep, rest = text.partition(",")
    if text.startswith("data:"):
        if not sep or ";base64" not in head:
            raise ValueError(f"{name}: a data URL must be base64 ('data:image/png;base64,...'), got {head[:40]!r}")
        text = rest
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name}: not base64 (nor a data URL, nor an existing file)") from None


def load_image(value, name: str = "image", mask: bool = False, allow_path: bool = True) -> Image.Image:
    """An RGB ``PIL.Image`` from ``value`` (see the module docstring), or ValueError. ``mask``:
    a transparent image stays RGBA (an inpainting mask is read from its alpha) and a grey one L.
    ``allow_path=False`` (what the HTTP server passes): text is base64 or a data URL, never a path
    on this machine (a client must not make the server read its files)."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim not in (2, 3) or (value.ndim == 3 and value.shape[2] not in (3, 4)):
            raise ValueError(f"{name}: an array must be uint8 (H, W), (H, W, 3) or (H, W, 4); got {value.dtype} "
                             f"{value.shape}")
        image = Image.fromarray(value)
    else:
        is_path = isinstance(value, os.PathLike) or (isinstance(value, str) and len(value) < 4096
                                                     and not value.startswith("data:") and Path(value).is_file())
        if allow_path and is_path:
            data = Path(value).read_bytes()
        elif isinstance(value, str):
            data = _decode_text(value, name)
        elif isinstance(value, (bytes, bytearray)):
            data = bytes(value)
        else:
            raise ValueError(f"{name}: give a PIL image, a path, bytes, base64 text or a data URL; got "
                             f"{type(value).__name__}")
        try:
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                raise ValueError(f"{name}: {image.width}x{image.height} is larger than sdrt takes "
                                 f"({MAX_PIXELS} pixels)")
            image.load()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
            raise ValueError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    if getattr(image, "n_frames", 1) > 1:
        raise ValueError(f"{name}: an animated image ({image.n_frames} frames); give a single frame")
    if image.mode not in _MODES:
        raise ValueError(f"{name}: pixel format {image.mode!r} is not supported; give 8-bit RGB, RGBA or "
                         "greyscale (convert CMYK and 16-bit images first)")
    if min(image.size) < MIN_SIDE:
        raise ValueError(f"{name}: {image.width}x{image.height} is too small (each side at least {MIN_SIDE} px)")
    if image.width * image.height > MAX_PIXELS:
        raise ValueError(f"{name}: {image.width}x{image.height} is larger than sdrt takes ({MAX_PIXELS} pixels)")
    if mask:
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            return image.convert("RGBA")
        return image.convert("L")
    return flatten(image)


def flatten(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """RGB, with any transparency composited over ``background`` (the web UI's ``images.flatten``)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return image.convert("RGB")


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """The web UI's ``images.resize_image`` with no upscaler (Lanczos): 0 stretches to the size,
    1 scales to cover it and crops the centre, 2 scales to fit inside it and fills the two
    margins by stretching the image's edge rows (or columns). Mode 3 resizes in latent space
    (not here: the image is encoded at its own size)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode {mode!r} is unknown; valid: " + ", ".join(f"{k} ({v})" for k, v in
                                                                             RESIZE_MODES.items()))
    if mode == 3:
        return image
    if mode == 0:
        return image.resize((width, height), resample=LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 2 and ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))
    elif mode == 2 and ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))
    return out


def to_tensor_array(image: Image.Image) -> np.ndarray:
    """(3, H, W) float32 in [-1, 1] (the VAE encoder's input), as the web UI scales it."""
    return np.moveaxis(np.asarray(image, dtype=np.float32) / 255.0, 2, 0) * 2.0 - 1.0
