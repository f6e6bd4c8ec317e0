"""VAE choice as the web UI offers it (``sd_vae``): the model's own ("Automatic", or "None"), or
a VAE file (``--vae FILE``, or a name in the VAE folder: ``vae_dir``).

A VAE file holds the original layout (``encoder.down.*``, with or without a
``first_stage_model.`` / ``vae.`` prefix, as ``vae-ft-mse-840000-ema-pruned.safetensors`` and
``sdxl_vae.safetensors`` do) or diffusers' (``encoder.down_blocks.*``); the original layout is
converted by diffusers' ``convert_ldm_vae_checkpoint``. Its weights are copied into the model's
VAE in place (addresses kept: captured CUDA graphs stay valid); the model's own weights are kept
on the CPU meanwhile and copied back for "Automatic". The infotext gets ``VAE hash`` (the file's
sha256, 10 digits) and ``VAE`` (the file name), as the web UI writes them.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from .paths import files_under, folder_arg

SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
OWN = ("Automatic", "None", "", None)


class VaeError(ValueError):
    """A VAE that cannot be used: not found, unreadable, or not for this model."""


def vae_weights(path: Path, vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A VAE file's weights in ``vae``'s (diffusers') names, checked against its shapes."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from .checkpoints import CheckpointError, _compare, read_state_dict
    try:
        sd, _ = read_state_dict(path)
    except CheckpointError as e:
        raise VaeError(str(e).replace("checkpoint", "VAE file")) from None
    ldm = any(k.startswith(("encoder.down.", "decoder.up.", "first_stage_model.", "vae.encoder.down."))
              for k in sd)
    try:
        weights = convert_ldm_vae_checkpoint(sd, dict(vae.config)) if ldm else sd
    except (KeyError, ValueError, RuntimeError) as e:
        raise VaeError(f"{str(path)!r}: not a VAE in the original layout sdrt can convert "
                       f"({type(e).__name__}: {e})") from None
    own = vae.state_dict()
    weights = {k: v for k, v in weights.items() if k in own}          # a training file's loss.* and the like
    problem = _compare(vae, weights)
    if problem:
        raise VaeError(f"{str(path)!r} does not fit this model's VAE: {problem}")
    return weights


class VaeLibrary:
    """The VAE files of a folder (searched recursively), by file name (``name.safetensors``), stem,
    or path under the folder; a path to a file anywhere is accepted too."""

    def __init__(self, folder: str | Path | None):
        self.folder = folder_arg("vae_dir", folder)
        self.refresh()

    def refresh(self) -> None:
        files: dict[str, Path] = {}
        for p in files_under(self.folder, SUFFIXES):
            for key in (p.name, p.stem, p.relative_to(self.folder).as_posix()):
                files.setdefault(key, p)
        self.files = files

    def listing(self) -> list[dict]:
        """The web UI's ``/sdapi/v1/sd-vae``."""
        seen = dict.fromkeys(self.files.values())
        return [{"model_name": p.name, "filename": str(p)} for p in seen]

    def path_of(self, name: str) -> Path:
        if name in self.files:
            return self.files[name]
        if Path(name).is_file() and Path(name).suffix in SUFFIXES:
            return Path(name)
        where = f"in {self.folder}" if self.folder else "(no VAE folder is set: vae_dir / --vae-dir)"
        known = ", ".join(sorted({p.name for p in self.files.values()})[:20])
        raise VaeError(f"VAE {name!r} was not found {where}" + (f"; available: {known}" if known else ""))


class VaeState:
    """Which VAE's weights the model's VAE module holds."""

    def __init__(self, components, library: VaeLibrary, cache_size: int = 2):
        self.components, self.library = components, library
        self.current: Path | None = None
        self._own: dict[str, torch.Tensor] | None = None
        self._parsed: OrderedDict = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def weights(self, name: str) -> tuple[Path, dict]:
        """The file ``name`` names, read and checked (VaeError before anything changes)."""
        path = self.library.path_of(name).resolve()
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._parsed:
                self._parsed.move_to_end(key)
                return path, self._parsed[key]
        weights = vae_weights(path, self.components.vae)
        with self._lock:
            self._parsed[key] = weights
            while len(self._parsed) > self._cache_size:
                self._parsed.popitem(last=False)
        return path, weights

    def apply(self, name: str | None) -> None:
        own = name in OWN
        path, weights = (None, None) if own else self.weights(name)
        with self._lock:
            if path == self.current:
                return
            params = self.components.vae.state_dict()
            with torch.no_grad():
                if self._own is None:
                    self._own = {k: v.detach().to("cpu", copy=True) for k, v in params.items()}
                source = self._own if own else weights
                for k, v in params.items():
                    v.copy_(source[k])
            self.current = path

    def infotext(self, name: str | None) -> dict:
        """``VAE hash`` and ``VAE`` of the job's VAE (nothing for the model's own)."""
        if name in OWN:
            return {}
        from .checkpoints import file_sha256
        path = self.library.path_of(name)
        return {"VAE hash": file_sha256(path)[:10], "VAE": path.name}
