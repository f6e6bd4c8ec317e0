"""Where sdrt keeps what it builds (a leaf module: it imports nothing of sdrt's)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where sdrt keeps what it builds (engines, compiled kernels): $SDRT_CACHE, else ~/.cache/sdrt."""
    return Path(os.environ.get("SDRT_CACHE", Path.home() / ".cache" / "sdrt"))


def default_engine_dir(components, *tags: str) -> Path:
    """The engine folder of a model for a backend and its build settings, under ``cache_root()``
    (an engine is one compiled network: an ONNX Runtime graph or a TensorRT plan)."""
    return cache_root() / "engines" / "-".join((components.model_hash, *tags))


def package_folder(package: str) -> Path | None:
    """The folder of an installed package whose data files sdrt reads, found without importing
    it (open_clip's and clip_interrogator's imports would pull torchvision); None when absent."""
    import importlib.util
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def files_under(folder, suffixes) -> list[Path]:
    """The files under ``folder`` (recursively, sorted) whose extension is one of ``suffixes``: what
    the model, LoRA, embedding and VAE folders offer (nothing for no folder)."""
    if folder is None:
        return []
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in suffixes)


def folder_arg(name: str, folder) -> Path | None:
    """``folder`` as a Path (None stays None); ValueError naming the argument when it is not a folder."""
    if folder is None or folder == "":
        return None
    if not Path(folder).is_dir():
        raise ValueError(f"{name} {str(folder)!r} is not a folder")
    return Path(folder)
