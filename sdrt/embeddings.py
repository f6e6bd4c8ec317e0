"""Textual-inversion embeddings as the web UI uses them: a file's name in a prompt stands for
its vectors.

- **Files** (an embeddings folder, searched recursively; the name is the file's stem): ``.pt`` /
  ``.bin`` with ``string_to_param`` (the web UI's and the original textual inversion's),
  diffusers concepts (one tensor), ``.safetensors`` (``emb_params`` or one tensor), and SDXL's
  ``clip_l`` / ``clip_g`` pairs. Pickles load only with ``torch.load(weights_only=True)``.
- **Which load**: as in the web UI, an embedding whose width is not the model's (768 for SD 1.x,
  1024 for SD 2.x, 768 + 1280 for SDXL) is skipped (listed under "skipped" in
  ``/sdapi/v1/embeddings``) and its name stays plain text.
- **In the prompt** (``sdrt.conditioning``): where the tokens of an embedding's name appear, its
  n vectors take n positions of the 75-token window (moved whole to the next window when they do
  not fit, weighted like the text around them); the text encoder reads them in place of the
  token embeddings there. The infotext gets ``TI hashes`` (name: the file's sha256, 12 digits).
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .paths import files_under, folder_arg

logger = logging.getLogger(__name__)

SUFFIXES = (".pt", ".bin", ".safetensors")
_VERSION = itertools.count(1)


@dataclass
class Embedding:
    name: str
    path: Path
    vectors: list[torch.Tensor]      # per text encoder: (n, width) float32
    hash: str                         # the file's sha256, first 12 digits (the web UI's shorthash)

    @property
    def count(self) -> int:
        return int(self.vectors[0].shape[0])


def read_embedding(path: Path) -> dict[str, torch.Tensor] | torch.Tensor:
    """The tensors of an embedding file: {"clip_l", "clip_g"} for SDXL, else one (n, width) tensor."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        data = load_file(str(path))
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError("string_to_param must hold exactly one tensor")
        return next(iter(params.values())).float()
    if isinstance(data, dict) and "clip_l" in data and "clip_g" in data:
        return {"clip_l": data["clip_l"].float(), "clip_g": data["clip_g"].float()}
    if isinstance(data, dict) and "emb_params" in data:
        return data["emb_params"].float()
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        vec = next(iter(data.values())).float()              # a diffusers concept: {token: vector}
        return vec.unsqueeze(0) if vec.dim() == 1 else vec
    if isinstance(data, torch.Tensor):
        return data.float()
    raise ValueError("neither a textual inversion embedding (string_to_param, emb_params, clip_l/clip_g) nor a "
                     "diffusers concept")


class EmbeddingLibrary:
    """The embeddings of a folder that fit a model (``widths``: each text encoder's width)."""

    def __init__(self, folder: str | Path | None, widths: list[int], tokenizer):
        self.folder = folder_arg("embeddings_dir", folder)
        self.widths, self.tokenizer = list(widths), tokenizer
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        loaded, skipped = {}, {}
        for path in files_under(self.folder, SUFFIXES):
            name = path.stem
            if name in loaded:
                continue
            try:
                data = read_embedding(path)
            except Exception as e:  # noqa: BLE001 - one bad file is reported and skipped, the others load
                skipped[name] = f"{path}: {type(e).__name__}: {e}"
                logger.warning("embedding %s skipped: %s", path, skipped[name])
                continue
            vectors = [data["clip_l"], data["clip_g"]] if isinstance(data, dict) else [data]
            widths = [int(v.shape[-1]) for v in vectors]
            if widths != self.widths or any(v.dim() != 2 for v in vectors) or len({v.shape[0] for v in vectors}) != 1:
                skipped[name] = (f"{path}: vectors of width {'+'.join(map(str, widths))}; this model's text "
                                 f"encoders take {'+'.join(map(str, self.widths))}")
                continue
            if not 1 <= vectors[0].shape[0] <= 75:
                skipped[name] = f"{path}: {vectors[0].shape[0]} vectors; a 75-token window holds 1 to 75"
                continue
            loaded[name] = Embedding(name, path, vectors, hashlib.sha256(path.read_bytes()).hexdigest()[:12])
        lookup: dict[int, list] = {}
        for e in loaded.values():
            ids = self.tokenizer([e.name], add_special_tokens=False).input_ids[0]
            if ids:
                lookup.setdefault(ids[0], []).append((ids, e))
        for matches in lookup.values():
            matches.sort(key=lambda m: len(m[0]), reverse=True)      # the longest name first, as the web UI
        with self._lock:
            self.loaded, self.skipped, self._lookup = loaded, skipped, lookup
            self.version = next(_VERSION)        # tokenizations made before are stale

    def find(self, tokens: list[int], position: int) -> tuple[Embedding, int] | tuple[None, None]:
        """The embedding whose name's tokens start at ``position`` (and how many tokens that is)."""
        for ids, emb in self._lookup.get(tokens[position], ()):
            if tokens[position:position + len(ids)] == ids:
                return emb, len(ids)
        return None, None

    def listing(self) -> dict:
        """The web UI's ``/sdapi/v1/embeddings``."""
        def entry(e):
            return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                    "shape": int(sum(v.shape[-1] for v in e.vectors)), "vectors": e.count}
        return {"loaded": {n: entry(e) for n, e in self.loaded.items()},
                "skipped": {n: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                                "vectors": None} for n in self.skipped}}

    def hashes(self, names) -> str | None:
        """The web UI's ``TI hashes`` value for the embeddings a generation used."""
        table = str.maketrans("", "", ":,")
        used = [n for n in dict.fromkeys(names) if n in self.loaded]
        return ", ".join(f"{n.translate(table)}: {self.loaded[n].hash}" for n in used) or None
