"""What a generation gives back: ``GenerationResult`` (images, infotexts, seeds, timings), the
decoded batch between the pipeline's stages, and the PNG writer that stores the infotext."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin


@dataclass
class GenerationResult:
    images: list                       # PIL.Image.Image, one per image
    infotexts: list[str]
    seeds: list[int]
    # seconds: text_encoder, loop (the denoising loop), vae, total; "unet" is the old name of
    # "loop" (deprecated). On a replayed CUDA graph the VAE runs inside the loop's replay: there
    # "loop" includes it and "vae" is 0.
    timings: dict[str, float]
    pixels: np.ndarray = field(repr=False, default=None)   # (B, H, W, 3) float32 in [0, 1]

    def save(self, path: str | Path, index: int = 0) -> Path:
        """Write image ``index`` as a PNG with its infotext in a ``parameters`` text chunk."""
        return save_png(self.images[index], path, self.infotexts[index])

    def select(self, i: int, **timings) -> "GenerationResult":
        """Image ``i`` alone, its timings updated with ``timings``."""
        return GenerationResult(images=[self.images[i]], infotexts=[self.infotexts[i]], seeds=[self.seeds[i]],
                                timings={**self.timings, **timings}, pixels=self.pixels[i:i + 1])


@dataclass
class Decoded:
    """The decode stage's output for a batch (``Pipeline.sample``)."""

    pixels: np.ndarray                 # (B, H, W, 3) float32 in [0, 1]; NaN where the model overflowed
    images: np.ndarray                 # (B, H, W, 3) uint8, the web UI's truncation of 255 * pixels
    finite: list[bool]                 # per image: no NaN or Inf
    timings: dict[str, float]          # seconds: vae, and loop once the loop's stage adds it

    @property
    def bad(self) -> list[int]:
        """Indices of the images that hold NaN or Inf."""
        return [i for i, ok in enumerate(self.finite) if not ok]

    @classmethod
    def from_pixels(cls, pixels: np.ndarray, timings: dict) -> "Decoded":
        finite = [bool(np.all(np.isfinite(p))) for p in pixels]
        # the web UI truncates to uint8 rather than rounding
        images = (255.0 * np.nan_to_num(pixels)).astype(np.uint8)
        return cls(pixels=pixels, images=images, finite=finite, timings=timings)


def save_png(image: Image.Image, path, text: str):
    """Write ``image`` as a PNG with ``text`` in its ``parameters`` chunk, to a path or a
    binary file object. Returns the path (or the file object)."""
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text)
    target = Path(path) if isinstance(path, (str, Path)) else path
    image.save(target, format="PNG", pnginfo=meta)
    return target


def nan_error(bad: list[int], dtype: torch.dtype) -> FloatingPointError:
    """The error for decoded images ``bad`` (indices) that hold NaN or Inf."""
    hint = "; try dtype='float32'" if dtype != torch.float32 else ""
    return FloatingPointError(
        f"the decoded image{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} hold NaN or Inf values "
        f"(the model overflowed in {str(dtype).replace('torch.', '')}){hint}")
