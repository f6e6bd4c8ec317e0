"""The term lists CLIP ranks against an image, and their text features, computed once and kept.

The lists are the ``clip-interrogator`` package's data files (artists, flavors, mediums,
movements, negative; installed from PyPI without its dependencies, never imported: only the
files are read) or any folder of ``*.txt`` files, one term per line, as the web UI's
``interrogate/`` folder (``name.topN.txt`` takes N terms of that list).

Features are CLIP text features, normalised, computed in batches and saved under
``cache_root()/interrogator/<CLIP weights hash>/<list content hash>.npz`` (float16, as
clip-interrogator keeps them): a changed list recomputes that list only, two lists of the same
terms share one file, another CLIP model has its own folder, and a damaged file is recomputed,
never used.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACKAGE_LISTS = ("artists", "flavors", "mediums", "movements", "negative")
WEBUI_CATEGORIES = ("artists", "flavors", "mediums", "movements")     # what the web UI downloads into interrogate/
TRENDING_SITES = ("Artstation", "behance", "cg society", "cgsociety", "deviantart", "dribble", "flickr", "instagram",
                  "pexels", "pinterest", "pixabay", "pixiv", "polycount", "reddit", "shutterstock", "tumblr",
                  "unsplash", "zbrush central")
_TOPN = re.compile(r"\.top(\d+)$")
logger = logging.getLogger("sdrt.interrogator")


@dataclass(frozen=True)
class TermList:
    name: str
    items: tuple[str, ...]
    topn: int = 1             # how many of its terms the web UI's classic format appends

    @functools.cached_property
    def digest(self) -> str:
        """The hash of the terms (the features' cache key), computed once per list."""
        return hashlib.sha256("\n".join(self.items).encode()).hexdigest()[:16]


def package_data() -> Path:
    """The folder of the ``clip-interrogator`` package's term lists ($SDRT_INTERROGATOR_LISTS when set)."""
    from ..paths import package_folder
    override = os.environ.get("SDRT_INTERROGATOR_LISTS")
    if override:
        return Path(override)
    folder = package_folder("clip_interrogator")
    if folder is None:
        raise ValueError("the interrogator's term lists were not found: install them with "
                         "`pip install --no-deps clip-interrogator==0.6.0` (only its data files are read), "
                         "or point SDRT_INTERROGATOR_LISTS (or lists=) at a folder of .txt files")
    return folder / "data"


def read_list(path: Path) -> TermList:
    """One list file: one term per line, stripped, blank lines dropped (clip-interrogator keeps
    them; an empty term ranks like any other and would be appended as nothing)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ValueError(f"term list {str(path)!r} cannot be read: {e}") from None
    stem = Path(path).stem
    m = _TOPN.search(stem)
    items = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not items:
        raise ValueError(f"term list {str(path)!r} is empty")
    return TermList(name=stem, items=items, topn=int(m.group(1)) if m else 1)


def read_folder(folder) -> dict[str, TermList]:
    """Every ``*.txt`` of ``folder`` by name (sorted: the order of the web UI's categories)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"term-list folder {str(folder)!r} does not exist")
    lists = {p.stem: read_list(p) for p in sorted(folder.glob("*.txt"))}
    if not lists:
        raise ValueError(f"term-list folder {str(folder)!r} has no .txt files")
    return lists


def clip_interrogator_tables(lists: dict[str, TermList]) -> dict[str, TermList]:
    """clip-interrogator's tables from its lists: artists as "by X" and "inspired by X", the
    trending sites it builds, flavors, mediums, movements and negative as they are."""
    def need(name):
        if name not in lists:
            raise ValueError(f"the clip-interrogator modes need a {name!r} list; the lists are {', '.join(lists)}")
        return lists[name].items
    artists = need("artists")
    trending = list(TRENDING_SITES) + [f"trending on {s}" for s in TRENDING_SITES] + \
        [f"featured on {s}" for s in TRENDING_SITES] + [f"{s} contest winner" for s in TRENDING_SITES]
    tables = {"ci-artists": tuple(f"by {a}" for a in artists) + tuple(f"inspired by {a}" for a in artists),
              "ci-trendings": tuple(trending)}
    for name in ("flavors", "mediums", "movements", "negative"):
        tables[f"ci-{name}"] = need(name)
    return {k: TermList(k, v) for k, v in tables.items()}


class FeatureTable:
    """A list's terms and their normalised CLIP text features (n, D) float32."""

    def __init__(self, terms: TermList, features: np.ndarray):
        if features.shape[0] != len(terms.items):
            raise ValueError(f"{terms.name}: {features.shape[0]} features for {len(terms.items)} terms")
        self.terms, self.features = terms, features

    @property
    def labels(self) -> tuple[str, ...]:
        return self.terms.items


class FeatureCache:
    """Computes and keeps each list's features for one CLIP model (``clip_hash``)."""

    def __init__(self, root, clip_hash: str, encode):
        self.folder = Path(root) / clip_hash
        self.encode = encode             # texts -> (N, D) normalised features
        self.features: dict[str, np.ndarray] = {}      # list content hash -> features
        self.built: list[str] = []           # the lists computed (not read) in this process

    def path(self, terms: TermList) -> Path:
        return self.folder / f"{terms.digest}.npz"

    def _read(self, path: Path, terms: TermList) -> np.ndarray | None:
        try:
            with np.load(path, allow_pickle=False) as data:
                features, digest = data["features"], str(data["digest"])
        except (OSError, ValueError, KeyError, EOFError) as e:
            logger.warning("%s: the cached features %s are unreadable (%s): recomputing", terms.name, path, e)
            return None
        if digest != terms.digest or features.ndim != 2 or features.shape[0] != len(terms.items) \
                or not np.isfinite(features).all():
            logger.warning("%s: the cached features %s do not match the list: recomputing", terms.name, path)
            return None
        return features.astype(np.float32)

    def table(self, terms: TermList) -> FeatureTable:
        features = self.features.get(terms.digest)
        if features is None:
            features = self.features[terms.digest] = self._load_or_compute(terms)
        return FeatureTable(terms, features)

    def _load_or_compute(self, terms: TermList) -> np.ndarray:
        path = self.path(terms)
        features = self._read(path, terms) if path.is_file() else None
        if features is None:
            half = self.encode(terms.items).astype(np.float16)
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, features=half, digest=np.array(terms.digest))
            os.replace(tmp, path)
            features = half.astype(np.float32)          # what a later process reads
            self.built.append(terms.name)
            logger.info("%s: %d term features computed and saved to %s", terms.name, len(terms.items), path)
        return features
