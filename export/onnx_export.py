"""Trace each network to ONNX (TorchScript exporter, opset 18, dynamic axes from its spec).

Graphs are always written as ``NAME.onnx`` plus ``NAME.onnx.data`` (external data), which
ONNX needs past 2 GB (the SD 1.5 UNet is 3.4 GB in float32).
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .specs import NetworkSpec, model_dims, network_specs

OPSET = 18


class TextEncoderGraph(torch.nn.Module):
    """input_ids (N, 77) -> every layer's hidden state after the final layer norm (L, N, 77, C);
    CLIP skip n is row L-n, and row L-1 equals the model's last_hidden_state."""

    def __init__(self, text_encoder):
        super().__init__()
        self.te = text_encoder
        inner = getattr(text_encoder, "text_model", text_encoder)
        self.norm = inner.final_layer_norm

    def forward(self, input_ids):
        hidden = self.te(input_ids, output_hidden_states=True).hidden_states[1:]
        return torch.stack([self.norm(h) for h in hidden])


class PenultimateGraph(torch.nn.Module):
    """SDXL's text encoders: input_ids (N, 77) -> the penultimate layer's hidden state (N, 77, C),
    without the final norm; with ``pooled``, also the pooled projection (N, P)."""

    def __init__(self, text_encoder, pooled: bool):
        super().__init__()
        self.te, self.pooled = text_encoder, pooled

    def forward(self, input_ids):
        out = self.te(input_ids, output_hidden_states=True)
        if self.pooled:
            return out.hidden_states[-2], out.text_embeds
        return out.hidden_states[-2]


class EmbedsInput(torch.nn.Module):
    """A text-encoder graph that reads its token embeddings from ``inputs_embeds`` (the ids still
    give the end token's position): the text encoder's token-embedding output is replaced by the
    input while it is traced."""

    def __init__(self, graph: torch.nn.Module, text_encoder):
        super().__init__()
        self.graph = graph
        self.table = getattr(text_encoder, "text_model", text_encoder).embeddings.token_embedding

    def forward(self, input_ids, inputs_embeds):
        handle = self.table.register_forward_hook(lambda module, args, output: inputs_embeds)
        try:
            return self.graph(input_ids)
        finally:
            handle.remove()


class UNetGraph(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class UNetXLGraph(torch.nn.Module):
    """SDXL's UNet: the pooled text and the size values as inputs of their own."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})[0]


class VAEDecoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae, self.scale = vae, float(getattr(vae.config, "scaling_factor", 0.18215))

    def forward(self, latent):
        return self.vae.decode(latent / self.scale, return_dict=False)[0]


class VAEEncoderGraph(torch.nn.Module):
    """image (B, 3, IH, IW) in [-1, 1] -> the posterior's moments (B, 2C, H, W): mean, log-variance."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image, return_dict=False)[0].parameters


def graph_module(components, name: str) -> torch.nn.Module:
    sdxl = components.is_sdxl
    if name.endswith("_embeds"):
        base = name[:-len("_embeds")]
        encoder = components.text_encoder_2 if base == "text_encoder_2" else components.text_encoder
        return EmbedsInput(graph_module(components, base), encoder)
    if name == "text_encoder":
        return PenultimateGraph(components.text_encoder, False) if sdxl else TextEncoderGraph(components.text_encoder)
    if name == "text_encoder_2" and sdxl:
        return PenultimateGraph(components.text_encoder_2, True)
    if name == "unet":
        return UNetXLGraph(components.unet) if sdxl else UNetGraph(components.unet)
    if name == "vae_decoder":
        return VAEDecoderGraph(components.vae)
    if name == "vae_encoder":
        return VAEEncoderGraph(components.vae)
    raise ValueError(f"network {name!r} is unknown; valid: {', '.join(network_specs(sdxl))}")


def sample_inputs(components, spec: NetworkSpec) -> tuple:
    """Small example inputs to trace with (shapes are dynamic in the graph)."""
    f, dims = components.latent_factor, model_dims(components)
    g = torch.Generator().manual_seed(0)
    if spec.name.startswith("text_encoder"):
        vocab = int(components.text_encoder.config.vocab_size)
        ids = torch.randint(0, vocab, (2, 77), generator=g)
        if spec.name.endswith("_embeds"):
            encoder = components.text_encoder_2 if spec.name.startswith("text_encoder_2") else components.text_encoder
            return ids, torch.randn(2, 77, int(encoder.config.hidden_size), generator=g)
        return (ids,)
    if spec.name == "unet":
        args = (torch.randn(2, dims.unet_in_channels, 8, 8, generator=g), torch.tensor([999.0, 999.0]),
                torch.randn(2, 77, dims.hidden, generator=g))
        if dims.sdxl:
            args += (torch.randn(2, dims.pooled, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
        return args
    if spec.name == "vae_decoder":
        return (torch.randn(1, 4, 8, 8, generator=g),)
    return (torch.randn(1, 3, 8 * f, 8 * f, generator=g),)


def smallest_inputs(dims, name: str, profile) -> dict:
    """Random numpy inputs of network ``name`` at ``profile``'s smallest request (the shapes of
    ``specs.profile_shapes`` for ``dims``, a ``specs.ModelDims``): what the Winograd rewrite probes."""
    import numpy as np

    from .specs import profile_shapes

    rng = np.random.default_rng(0)
    dtypes = {t.name: t.dtype for t in network_specs(dims.sdxl)[name].inputs}
    return {k: (np.zeros(lo, np.int64) if dtypes[k] == "int64" else rng.standard_normal(lo).astype(np.float32))
            for k, (lo, _, _) in profile_shapes(name, profile, dims).items()}


def export_onnx(components, name: str, path: Path, opset: int = OPSET) -> Path:
    """Export network ``name`` of ``components`` (float32 CPU modules) to ``path``."""
    spec = network_specs(components.is_sdxl)[name]
    return trace_to_onnx(graph_module(components, name).eval(), sample_inputs(components, spec), spec, path, opset)


def trace_to_onnx(module: torch.nn.Module, args: tuple, spec: NetworkSpec, path: Path, opset: int = OPSET) -> Path:
    """Trace ``module`` on ``args`` (TorchScript exporter) into ``path`` with ``spec``'s input and
    output names and dynamic axes, its weights in one external data file."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(raw), input_names=[t.name for t in spec.inputs],
                              output_names=[t.name for t in spec.outputs], dynamic_axes=spec.dynamic_axes(),
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        model = onnx.load(str(raw), load_external_data=True)
        save_onnx(model, path)
    return path


def save_onnx(model, path: Path) -> None:
    """Write ``model`` as ``path`` + ``path.data`` (all initializers in one external file)."""
    import onnx

    data = path.with_name(path.name + ".data")
    for p in (path, data):
        if p.exists():
            p.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    if not data.exists():          # a graph with no large initializer still gets its (empty) file
        data.write_bytes(b"")


# what stays float32 in a float16 graph: the VAE decoder's normalisations and softmax (in
# float16 they overflow); nothing else. A strongly typed TensorRT network computes exactly in the
# graph's types, so every float32 node is a float32 island with casts around it.
FLOAT32_OPS = {"vae_decoder": ("InstanceNormalization", "GroupNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt")}


def to_float16(path: Path, name: str) -> None:
    """Convert a float32 graph to float16 in place, keeping float32 inputs/outputs and only the
    float32 nodes of ``FLOAT32_OPS`` (an explicit list: onnxruntime's default block list would
    keep Range, Min, Max, CumSum, Upsample, ... in float32). The converter needs the graph's
    value types to put casts around a kept node, so shape inference runs when there is one (the
    VAE decoder is far below protobuf's 2 GiB limit); without it the list was silently ignored."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path), load_external_data=True)
    keep = list(FLOAT32_OPS.get(name, ()))
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=not keep, op_block_list=keep)
    save_onnx(model, path)


class InitializerIndex:
    """A graph's initializers by shape, their values read on demand from the external data file
    (memory-mapped): which initializer holds a module's weight, found by value (LoRA on a compiled
    network whose weights the exporter named after nothing stable)."""

    def __init__(self, path: str):
        import onnx
        from onnx import helper
        self.graph = onnx.load(path, load_external_data=False).graph
        data = Path(path + ".data")
        self.data = np.memmap(data, dtype=np.uint8, mode="r") if data.is_file() and data.stat().st_size else None
        self.by_shape: dict[tuple, list] = {}
        self.by_name = {init.name: init for init in self.graph.initializer}
        for init in self.graph.initializer:
            self.by_shape.setdefault(tuple(init.dims), []).append(init)
        self._np = helper.tensor_dtype_to_np_dtype

    def array(self, init) -> np.ndarray:
        import onnx
        from onnx import numpy_helper
        if init.data_location != onnx.TensorProto.EXTERNAL or self.data is None:
            return numpy_helper.to_array(init)
        info = {e.key: e.value for e in init.external_data}
        offset, length = int(info.get("offset", 0)), int(info["length"])
        return np.frombuffer(self.data[offset:offset + length], dtype=self._np(init.data_type)).reshape(tuple(init.dims))

    def find(self, value: np.ndarray) -> tuple[str, np.dtype] | None:
        for init in self.by_shape.get(tuple(value.shape), ()):
            arr = self.array(init)
            if np.array_equal(arr, value.astype(arr.dtype)):
                return init.name, arr.dtype
        return None


class GraphWeights:
    """Where an ONNX graph holds each module's weight: the initializer equal to it or to its
    transpose (the exporter names weights after nothing stable), found by value once per module;
    and the array that takes that initializer's place (its dtype and layout). What LoRA on a
    compiled backend needs: ONNX Runtime's overrides, TensorRT's refit."""

    def __init__(self, path):
        self.index = InitializerIndex(str(path))
        self._places: dict[str, tuple | None] = {}

    def place(self, module: str, original: torch.Tensor) -> tuple[str, bool, np.dtype] | None:
        """(initializer, transposed, dtype) of ``module`` from its original weight; None: no
        initializer holds it (rewritten at build time, e.g. a Winograd convolution)."""
        if module not in self._places:
            w = original.detach().float().cpu().numpy()
            candidates = ((w, False), (w.T, True)) if w.ndim == 2 else ((w, False),)
            self._places[module] = next(((hit[0], transposed, hit[1]) for candidate, transposed in candidates
                                         if (hit := self.index.find(candidate)) is not None), None)
        return self._places[module]

    @staticmethod
    def array(place: tuple, weight: torch.Tensor) -> np.ndarray:
        _, transposed, dtype = place
        w = weight.detach().float().cpu().numpy()
        return np.ascontiguousarray((w.T if transposed else w).astype(dtype))


def files_of(path: Path) -> list[Path]:
    return [p for p in (Path(path), Path(str(path) + ".data")) if os.path.exists(p)]
