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
