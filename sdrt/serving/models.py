"""The checkpoints a server offers and the ones it holds loaded (the web UI's ``--ckpt-dir``,
``/sdapi/v1/sd-models`` and the ``sd_model_checkpoint`` option).

``ModelPool`` lists the server's first model and every checkpoint under ``models_dir``
(``.safetensors`` / ``.ckpt``, searched recursively, as the web UI does), each with the web UI's
names: ``title`` ("sub/name.safetensors [hash]"), ``model_name`` (the path without extension)
and ``hash`` (the first 10 digits of the file's sha256; unknown until the file is loaded or its
hash is cached, as in the web UI's list). A request names one in ``override_settings`` (or the
server's ``sd_model_checkpoint`` option does) by title, name, model name or hash; each model
loads once, with its own batcher, and at most ``max_models`` stay loaded: the least recently
used model that no request is using is unloaded first.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoints import SUFFIXES
from ..paths import cache_root, files_under

logger = logging.getLogger("sdrt.serving")
LISTED = tuple(s for s in SUFFIXES if s in (".safetensors", ".ckpt"))


@dataclass
class Checkpoint:
    """One model the server offers, named as the web UI names it."""

    key: str                   # what Pipeline.from_pretrained takes (a path, or random:...)
    name: str                  # the path under models_dir, with extension (the model itself for others)
    model_name: str            # ``name`` without its extension
    sha256: str | None = None
    model_hash: str | None = None      # the loaded model's "Model hash" (a random model's weights hash)

    @property
    def hash(self) -> str | None:
        return self.model_hash or (self.sha256[:10] if self.sha256 else None)

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    def matches(self, text: str) -> bool:
        text = text.strip()
        return text in (self.title, self.name, self.model_name, self.key) or bool(
            self.sha256 and len(text) >= 8 and self.sha256.startswith(text.lower())) or bool(
            self.hash and text.lower() == self.hash)

    def to_json(self) -> dict:
        return {"title": self.title, "model_name": self.model_name, "hash": self.hash, "sha256": self.sha256,
                "filename": self.key, "config": None}


@dataclass
class Loaded:
    pipe: object
    batcher: object
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)


def _cached_sha256(path: Path) -> str | None:
    """The file's sha256 if sdrt hashed it before (``checkpoints.file_sha256``'s cache); listing
    never reads a multi-GB file."""
    try:
        st = path.stat()
        cache = json.loads((cache_root() / "hashes.json").read_text())
        return cache.get(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}") if isinstance(cache, dict) else None
    except (OSError, ValueError):
        return None


class ModelPool:
    """The server's models: what it offers, and what it holds loaded (``max_models`` at most)."""

    def __init__(self, first: str, models_dir: str | None, max_models: int,
                 load: Callable[[str], tuple[object, object]], loaded: tuple[object, object] | None = None):
        if max_models < 1:
            raise ValueError(f"max_models must be at least 1, got {max_models}")
        self.models_dir = Path(models_dir) if models_dir else None
        if self.models_dir is not None and not self.models_dir.is_dir():
            raise ValueError(f"models_dir {models_dir!r} is not a folder")
        self.max_models, self._load = max_models, load
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.loaded: dict[str, Loaded] = {}
        self.first = self._describe(first)
        self.checkpoints = self.scan()
        if loaded is not None:
            self._add(self.first, *loaded)

    def _describe(self, key: str) -> Checkpoint:
        path = Path(key)
        if self.models_dir is not None and path.is_file():
            try:
                rel = path.resolve().relative_to(self.models_dir.resolve())
                return Checkpoint(str(path), rel.as_posix(), rel.with_suffix("").as_posix(), _cached_sha256(path))
            except ValueError:
                pass
        if path.is_file():
            return Checkpoint(key, path.name, path.stem, _cached_sha256(path))
        return Checkpoint(key, path.name if path.is_dir() else key, path.name if path.is_dir() else key)

    def scan(self) -> list[Checkpoint]:
        """The first model, then every checkpoint file under models_dir (sorted by path)."""
        found = [self.first]
        if self.models_dir is not None:
            for p in files_under(self.models_dir, LISTED):
                if self.first.key and Path(self.first.key).is_file() and p.resolve() == Path(self.first.key).resolve():
                    continue
                found.append(self._describe(str(p)))
        return found

    def refresh(self) -> None:
        with self._lock:
            known = {c.key: c for c in self.checkpoints}
            fresh = self.scan()
            self.checkpoints = [known.get(c.key, c) for c in fresh]      # keep hashes learnt by loading

    def resolve(self, text: str) -> Checkpoint:
        """The checkpoint ``text`` names (title, name, model name, hash); ValueError naming the choices."""
        for c in self.checkpoints:
            if c.matches(str(text)):
                return c
        names = ", ".join(repr(c.title) for c in self.checkpoints[:20])
        raise ValueError(f"model {text!r} is not one this server offers: {names}"
                         + (" (GET /sdapi/v1/sd-models lists them)" if len(self.checkpoints) > 20 else ""))

    def _add(self, checkpoint: Checkpoint, pipe, batcher) -> Loaded:
        checkpoint.sha256 = checkpoint.sha256 or _file_sha(checkpoint.key)
        checkpoint.model_hash = pipe.components.model_hash
        entry = self.loaded[checkpoint.key] = Loaded(pipe, batcher)
        return entry

    @contextmanager
    def use(self, checkpoint: Checkpoint):
        """The loaded model of ``checkpoint`` (loading it first), held against unloading while the
        caller uses it."""
        with self._lock:
            gate = self._loading.setdefault(checkpoint.key, threading.Lock())
        with gate:                     # one load per model; other models keep serving meanwhile
            with self._lock:
                entry = self.loaded.get(checkpoint.key)
                if entry is not None:
                    entry.users += 1
            if entry is None:
                logger.info("loading %s", checkpoint.key)
                pipe, batcher = self._load(checkpoint.key)
                with self._lock:
                    entry = self._add(checkpoint, pipe, batcher)
                    entry.users += 1
        self._evict()
        try:
            yield entry
        finally:
            with self._lock:
                entry.users -= 1
                entry.last_used = time.monotonic()
            self._evict()

    def _evict(self) -> None:
        """Unload the least recently used idle models beyond ``max_models``."""
        with self._lock:
            idle = sorted((e.last_used, k) for k, e in self.loaded.items() if e.users == 0)
            extra = len(self.loaded) - self.max_models
            victims = [self.loaded.pop(k) for _, k in idle[:max(0, extra)]]
        for v in victims:
            logger.info("unloading a model (max_models=%d)", self.max_models)
            v.batcher.close(cancel_pending=False)
            v.pipe.close()

    def close(self) -> None:
        with self._lock:
            entries, self.loaded = list(self.loaded.values()), {}
        for e in entries:
            e.batcher.close()
            e.pipe.close()


def _file_sha(key: str) -> str | None:
    from ..checkpoints import file_sha256
    path = Path(key)
    return file_sha256(path) if path.is_file() else None
