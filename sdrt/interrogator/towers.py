"""What runs the interrogator's networks: the torch modules, or their ONNX Runtime graphs built
into an engine folder (``sdrt.export.interrogator``). Both take and give numpy arrays:

    clip_image(pixels (B, 3, S, S)) -> (B, D)      projected, not normalised
    clip_text(ids (N, T) int64)     -> (N, D)      T <= 77: the batch's longest text
    blip_vision(pixels)             -> (B, P, C)   BLIP's image tokens
    blip_cross(image tokens (1, P, C)) -> (L, 2, 1, H, P, E) the decoder's cross-attention keys/values
    blip_step(ids (K, T), past (L, 2, K, H, R, E), cross) -> (logits (K, V), present (L, 2, K, H, R+T, E))

``CachedDecoder`` turns ``blip_step`` into what the searches call (the next token's logits of
whole sequences), keeping each sequence's cache.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

BACKENDS = ("torch", "onnxruntime")


class TorchTowers:
    name = "torch"

    def __init__(self, models, device: torch.device):
        from sdrt.export.interrogator import INTERROGATOR_NETWORKS, graph_module
        self.device = device
        self.graphs = {n: graph_module(models, n).to(device) for n in INTERROGATOR_NETWORKS}
        self._kept: tuple | None = None      # (array, its device copy): the cross keys/values of a caption

    def _tensor(self, a) -> torch.Tensor:
        if isinstance(a, torch.Tensor):
            return a
        t = torch.from_numpy(np.ascontiguousarray(a))       # a view of the array
        return t if self.device.type == "cpu" else t.to(self.device)

    def _run(self, name, *arrays):
        with torch.inference_mode():
            out = self.graphs[name](*(self._tensor(a) for a in arrays))
        if isinstance(out, tuple):
            return tuple(o.float().cpu().numpy() for o in out)
        return out.float().cpu().numpy()

    def clip_image(self, pixels):
        return self._run("clip_image", pixels)

    def clip_text(self, ids):
        return self._run("clip_text", ids)

    def blip_vision(self, pixels):
        return self._run("blip_vision", pixels)

    def blip_cross(self, image_embeds):
        return self._run("blip_cross", image_embeds)

    def blip_step(self, ids, past, cross):
        # a caption passes the same cross keys/values at every step: on a GPU they are copied once
        if self._kept is None or self._kept[0] is not cross:
            self._kept = (cross, self._tensor(cross))
        return self._run("blip_step", ids, past, self._kept[1])


class OnnxRuntimeTowers:
    name = "onnxruntime"

    def __init__(self, models, device: torch.device, engine_dir=None, log=None):
        from sdrt.backends import build_log
        from sdrt.backends.onnxruntime_backend import _providers
        from sdrt.export.interrogator import build_interrogator

        from ..paths import cache_root
        self.engine_dir = Path(engine_dir) if engine_dir else (
            cache_root() / "engines" / f"interrogator-{models.model_hash}-onnxruntime-float32")
        providers = _providers(device)
        manifest = build_interrogator(models, self.engine_dir, target=device.type, log=log or build_log)
        import onnxruntime as ort
        opts = ort.SessionOptions()
        self.sessions = {name: ort.InferenceSession(str(self.engine_dir / entry["file"]), opts, providers=providers)
                         for name, entry in manifest["networks"].items()}

    def clip_image(self, pixels):
        return self.sessions["clip_image"].run(None, {"pixel_values": pixels.astype(np.float32)})[0]

    def clip_text(self, ids):
        return self.sessions["clip_text"].run(None, {"input_ids": ids.astype(np.int64)})[0]

    def blip_vision(self, pixels):
        return self.sessions["blip_vision"].run(None, {"pixel_values": pixels.astype(np.float32)})[0]

    def blip_cross(self, image_embeds):
        return self.sessions["blip_cross"].run(None, {"image_embeds": image_embeds.astype(np.float32)})[0]

    def blip_step(self, ids, past, cross):
        logits, present = self.sessions["blip_step"].run(None, {"input_ids": ids.astype(np.int64),
                                                                "past": past.astype(np.float32),
                                                                "cross": cross.astype(np.float32)})
        return logits, present


class CachedDecoder:
    """The next token's logits of whole sequences (K, T), from one decoder step per call: a row
    whose first T-1 tokens are a row of the previous call (the search extended it) reuses that
    row's cache and runs only its last token; anything else (the first call) runs in full."""

    def __init__(self, towers, cross: np.ndarray, dims: tuple[int, int, int]):
        self.towers, self.cross = towers, cross
        self.layers, self.heads, self.width = dims
        self.rows: np.ndarray | None = None
        self.cache: np.ndarray | None = None

    def _parents(self, ids: np.ndarray) -> list[int] | None:
        if self.rows is None or ids.shape[1] != self.rows.shape[1] + 1:
            return None
        index = {tuple(r): i for i, r in enumerate(self.rows.tolist())}
        parents = [index.get(tuple(r)) for r in ids[:, :-1].tolist()]
        return None if any(p is None for p in parents) else parents

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        parents = self._parents(ids)
        if parents is None:
            past = np.zeros((self.layers, 2, ids.shape[0], self.heads, 0, self.width), np.float32)
            new = ids
        else:
            past, new = self.cache[:, :, parents], ids[:, -1:]
        logits, self.cache = self.towers.blip_step(np.ascontiguousarray(new), np.ascontiguousarray(past), self.cross)
        self.rows = ids.copy()
        return logits


def create_towers(backend: str, models, device, engine_dir=None):
    from sdrt.backends import parse_device, require_onnxruntime
    dev = parse_device(device)
    if backend == "torch":
        return TorchTowers(models, dev)
    if backend == "onnxruntime":
        require_onnxruntime()
        return OnnxRuntimeTowers(models, dev, engine_dir)
    raise ValueError(f"interrogator backend {backend!r} is unknown; valid: {', '.join(BACKENDS)} "
                     "(TensorRT: the profiles are declared, the runtime is not written yet)")
