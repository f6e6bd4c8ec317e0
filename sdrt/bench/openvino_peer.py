"""The OpenVINO peer on the CPU: diffusers' pipeline with its text encoder, UNet and VAE decoder
run by OpenVINO's runtime, the way optimum-intel's ``OVStableDiffusionPipeline`` runs them.

optimum-intel itself does not install beside sdrt (2.2.0 pins transformers < 5.6 and needs
torchvision, which breaks the CPU torch here), and ONNX Runtime's OpenVINO provider comes as the
``onnxruntime-openvino`` package, which replaces onnxruntime. So the peer is built from the parts
both would use: the networks exported to plain ONNX (sdrt's exporter, before any ONNX Runtime
optimisation or sdrt's Winograd rewrite: OpenVINO optimises the graph itself), compiled by
``openvino.Core`` for the CPU in float32 (``INFERENCE_PRECISION_HINT``: on CPUs with AMX or
AVX-512 BF16 OpenVINO would otherwise run bfloat16, which no other row of the table does), with a
latency hint, and called from diffusers' own denoising loop. The exported graphs are cached per
model under the cache root (``peers/openvino/<model hash>/``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

NETWORKS = ("text_encoder", "unet", "vae_decoder")


def _ov():
    try:
        import openvino
    except ImportError as e:
        raise ImportError("the OpenVINO peer needs the openvino package (pip install 'sdrt[openvino]')") from e
    return openvino


class _OVNetwork(torch.nn.Module):
    """A compiled OpenVINO model in the place of a diffusers/transformers module: the pipeline
    reads ``config``, ``dtype`` and ``device`` and calls it; nothing to move."""

    def __init__(self, compiled, config):
        super().__init__()
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.__dict__["config"] = config

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _run(self, inputs: dict) -> list[np.ndarray]:
        out = self.request.infer({k: np.ascontiguousarray(v) for k, v in inputs.items()})
        return [np.array(out[o]) for o in self.compiled.outputs]       # copies: the request reuses its memory


class OVTextEncoder(_OVNetwork):
    def forward(self, input_ids, attention_mask=None, output_hidden_states=None, **kwargs):
        layers = self._run({"input_ids": input_ids.cpu().numpy().astype(np.int64)})[0]   # (L, N, 77, C)
        return (torch.from_numpy(layers[-1]),)        # last_hidden_state (the final norm applied)


class OVUNet(_OVNetwork):
    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False, **kwargs):
        if kwargs.get("added_cond_kwargs") or kwargs.get("timestep_cond") is not None:
            raise ValueError("the OpenVINO peer runs SD 1.x/2.x UNets (no added conditioning)")
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        out = self._run({"sample": sample.float().numpy(), "timestep": t.numpy(),
                         "encoder_hidden_states": encoder_hidden_states.float().numpy()})[0]
        return (torch.from_numpy(out),)


class OVVaeDecoder(_OVNetwork):
    def __init__(self, compiled, config):
        super().__init__(compiled, config)
        self.scale = float(getattr(config, "scaling_factor", 0.18215))

    def decode(self, z, return_dict=False, **kwargs):
        # diffusers divides by the scaling factor before decode; sdrt's graph divides itself
        image = self._run({"latent": (z.float() * self.scale).numpy()})[0]
        return (torch.from_numpy(image),)


def export_graphs(components, folder: Path, log=print) -> dict[str, Path]:
    """The plain ONNX graphs of the networks (exported once per model into ``folder``)."""
    from ..export.onnx_export import export_onnx
    paths = {}
    for name in NETWORKS:
        path = Path(folder) / f"{name}.onnx"
        if not path.is_file():
            log(f"plain ONNX: exporting {name} to {path}")
            export_onnx(components, name, path)
        paths[name] = path
    return paths


def openvino_components(components, folder: Path | None = None, log=print):
    """``components`` with the text encoder, UNet and VAE replaced by OpenVINO-compiled networks
    (for ``diffusers_pipeline``)."""
    ov = _ov()
    if components.is_sdxl:
        raise ValueError("the OpenVINO peer runs SD 1.x/2.x models; SDXL's two encoders are not wired")
    from ..paths import cache_root
    folder = Path(folder) if folder else cache_root() / "peers" / "openvino" / components.model_hash
    paths = export_graphs(components, folder, log)
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    compiled = {name: core.compile_model(core.read_model(str(p)), "CPU", config) for name, p in paths.items()}
    return dataclasses.replace(
        components, text_encoder=OVTextEncoder(compiled["text_encoder"], components.text_encoder.config),
        unet=OVUNet(compiled["unet"], components.unet.config),
        vae=OVVaeDecoder(compiled["vae_decoder"], components.vae.config))


def version() -> str | None:
    try:
        return _ov().__version__
    except ImportError:
        return None
