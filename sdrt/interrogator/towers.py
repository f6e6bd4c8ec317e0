"""What runs the interrogator's networks: the torch modules, or their ONNX Runtime graphs built
into an engine folder (``sdrt.export.interrogator``). Both take and give numpy arrays:

    clip_image(pixels (B, 3, S, S)) -> (B, D)      projected, not normalised
    clip_text(ids (N, 77) int64)    -> (N, D)
    blip_vision(pixels)             -> (B, P, C)   BLIP's image tokens
    blip_decoder(ids (K, T), image tokens (K, P, C)) -> (K, V) the next token's logits
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

BACKENDS = ("torch", "onnxruntime")


class TorchTowers:
    name = "torch"

    def __init__(self, models, device: torch.device):
        from sdrt.export.interrogator import graph_module
        self.device = device
        self.graphs = {n: graph_module(models, n).to(device) for n in
                       ("clip_image", "clip_text", "blip_vision", "blip_decoder")}

    def _run(self, name, *arrays):
        with torch.inference_mode():
            out = self.graphs[name](*(torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays))
        return out.float().cpu().numpy()

    def clip_image(self, pixels):
        return self._run("clip_image", pixels)

    def clip_text(self, ids):
        return self._run("clip_text", ids)

    def blip_vision(self, pixels):
        return self._run("blip_vision", pixels)

    def blip_decoder(self, ids, image_embeds):
        return self._run("blip_decoder", ids, image_embeds)


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

    def blip_decoder(self, ids, image_embeds):
        return self.sessions["blip_decoder"].run(None, {"input_ids": ids.astype(np.int64),
                                                        "image_embeds": image_embeds.astype(np.float32)})[0]


def create_towers(backend: str, models, device, engine_dir=None):
    from sdrt.backends import parse_device
    dev = parse_device(device)
    if backend == "torch":
        return TorchTowers(models, dev)
    if backend == "onnxruntime":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise ValueError(f"backend 'onnxruntime' needs the packages onnx and onnxruntime "
                             f"(pip install -e '.[onnx]'): {e}") from None
        return OnnxRuntimeTowers(models, dev, engine_dir)
    raise ValueError(f"interrogator backend {backend!r} is unknown; valid: {', '.join(BACKENDS)} "
                     "(TensorRT: the profiles are declared, the runtime is not written yet)")
