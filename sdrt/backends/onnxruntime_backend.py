"""The ONNX Runtime backend: the exported graphs, run with IOBinding on the loop's tensors.

CPU execution provider here (and in CI); CUDA (and TensorRT) execution providers when
``onnxruntime-gpu`` is installed. The UNet's inputs are bound to the denoiser's persistent
buffers by address and its output to a buffer allocated once per shape, so a step copies
nothing through numpy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..conditioning import added_pooled_dim
from ..paths import default_engine_dir
from ..tokenizer import MAX_LENGTH
from . import (
    AddedInputs,
    build_log,
    check_folder_tiling,
    check_profile_request,
    check_profile_windows,
    check_text_input,
    token_embeddings,
)

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def _providers(device: torch.device) -> list:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise ValueError("backend 'onnxruntime' on CUDA needs the onnxruntime-gpu package "
                         f"(this onnxruntime has {', '.join(available)})")
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


class OnnxRuntimeBackend:
    """Runs ``engine_dir``'s graphs, building them first when missing or stale."""

    def __init__(self, components, device: torch.device, dtype: torch.dtype, engine_dir=None, log=None):

        from sdrt.export import Profile, build_onnxruntime
        from sdrt.export.specs import default_networks

        self.device, self.dtype = device, dtype
        self.engine_dir = Path(engine_dir) if engine_dir else default_engine_dir(
            components, "onnxruntime", str(dtype).replace("torch.", ""))
        log = log or build_log
        precision = self._precision = str(dtype).replace("torch.", "")
        providers = _providers(device)          # fail before a possibly long build
        networks = default_networks(components.is_sdxl)
        manifest = build_onnxruntime(components, self.engine_dir, precision=precision, networks=networks,
                                     log=log, target=device.type)
        self.profile = Profile.from_json(manifest["networks"]["unet"]["profile"])
        self.tiling = bool(manifest.get("tiling", False))     # built with circular padding (sdrt build --tiling)
        self.size_multiple = int(manifest["networks"]["unet"].get("size_multiple", components.size_multiple))
        self._paths = {name: str(self.engine_dir / manifest["networks"][name]["file"]) for name in networks}
        self._providers = providers
        self.sessions = {name: self._session(name) for name in networks}
        self._own_sessions = dict(self.sessions)      # the model's own weights (LoRA sessions come and go)
        self._lora_sessions: dict[tuple, object] = {}
        self._graphs: dict[str, object] = {}         # network -> GraphWeights (where its initializers are)
        self._synced: dict[str, tuple] = {}          # network -> the LoRA set its session has
        self.components = components
        self.num_text_layers = int(components.text_encoder.config.num_hidden_layers)
        self.pooled_dim = added_pooled_dim(components.unet.config)      # SDXL: contexts carry pooled text + sizes
        self._added = AddedInputs(self.pooled_dim, device) if self.pooled_dim is not None else None
        self._bindings: dict[tuple, tuple] = {}

    def _session(self, name: str, overrides: dict | None = None, conv: bool = False):
        """An ONNX Runtime session of network ``name``; ``overrides``: {initializer: numpy array}
        that replace the graph's own (the graph on disk is never re-exported). ``conv``: some
        override feeds a convolution: ONNX Runtime's layout optimisations (ORT_ENABLE_ALL: NCHWc
        on the CPU) reorder convolution weights from the graph's own initializer and ignore an
        override (seen with onnxruntime 1.32), so such a session stops at the extended level (the
        graph on disk was optimised to that level already)."""
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if conv
                                         else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        values = []
        for init, array in (overrides or {}).items():
            value = ort.OrtValue.ortvalue_from_numpy(array)       # a view of the array's memory, not a copy
            values.append((array, value))
            opts.add_initializer(init, value)
        session = ort.InferenceSession(self._paths[name], opts, providers=self._providers)
        session._sdrt_overrides = values          # the session reads them: keep arrays and values alive beside it
        return session

    # ------------------------------------------------------------------ textual inversion

    def _embeds_session(self, name: str):
        """The text encoder that reads token embeddings from an input, built into the engine folder
        the first time a prompt names an embedding (the model's own text-encoder graph is kept)."""
        return self._extra_session(name + "_embeds", "textual-inversion embeddings")

    def _extra_session(self, graph: str, purpose: str):
        """A network the loop does not need, built into the engine folder on first use."""
        if graph not in self.sessions:
            from sdrt.export import build_onnxruntime
            build_log(f"building {graph} ({purpose}) in {self.engine_dir}")
            manifest = build_onnxruntime(self.components, self.engine_dir, precision=self._precision,
                                         networks=(graph,), log=build_log, target=self.device.type,
                                         tiling=self.tiling)
            self._paths[graph] = str(self.engine_dir / manifest["networks"][graph]["file"])
            self.sessions[graph] = self._session(graph)
        return self.sessions[graph]

    # ------------------------------------------------------------------ LoRA

    supports_lora = True        # sdrt.lora merges into the torch modules; sync_weights passes them on

    def sync_weights(self, part: str, lora_state) -> None:
        """Give the graphs of ``part`` ("text" or "unet") the LoRA-merged weights ``lora_state``
        holds in the torch modules: a session whose changed initializers are overridden (one per
        LoRA set, the latest kept), or the model's own session again. Nothing happens when the
        set did not change since the last call."""
        from sdrt.export.onnx_export import GraphWeights

        from ..lora import PARTS
        uses = lora_state.current[part]
        for network in PARTS[part]:
            if network not in self.sessions or self._synced.get(network) == uses:
                continue
            if not uses:
                session = self._own_sessions[network]
            else:
                key = (network, uses)
                if key not in self._lora_sessions:
                    graph = self._graphs.get(network) or self._graphs.setdefault(network, GraphWeights(self._paths[network]))
                    overrides = lora_state.graph_values(
                        network, lora_state.changed(network), graph, self.engine_dir,
                        "rewritten at build time, e.g. a Winograd convolution: use backend 'torch' for this LoRA, "
                        "or build with --no-winograd")
                    conv = any(v.ndim == 4 for v in overrides.values())
                    self._lora_sessions = {k: v for k, v in self._lora_sessions.items() if k[0] != network}
                    self._lora_sessions[key] = self._session(network, overrides, conv)
                session = self._lora_sessions[key]
            self.sessions[network] = session
            self._synced[network] = uses
            if network == "unet":
                self._bindings.clear()            # IOBindings belong to a session

    def check_tiling(self, enabled: bool) -> None:
        check_folder_tiling(enabled, self.tiling, self.engine_dir)

    def check_request(self, batch_size: int, height: int, width: int) -> None:
        """Raise before any network runs when the request lies outside the built profile."""
        check_profile_request(self.profile, self.size_multiple, self.engine_dir, batch_size, height, width)

    def encode_text(self, input_ids: torch.Tensor, clip_skip: int = 1, encoder: int = 0, pooled: bool = False,
                    fixes=None):
        """As ``TorchBackend.encode_text`` (SDXL: the penultimate layers, ``pooled`` from the second)."""
        b, n = input_ids.shape
        windows = check_text_input(input_ids, clip_skip, self.num_text_layers)
        check_profile_windows(self.profile, self.engine_dir, windows)
        ids = input_ids.reshape(-1, MAX_LENGTH).cpu().numpy().astype(np.int64)
        name = "text_encoder" if encoder == 0 else "text_encoder_2"
        if name not in self.sessions:
            raise ValueError(f"text encoder {encoder} does not exist in this model")
        if fixes and any(fixes):                 # textual inversion: the token embeddings come in as an input
            module = self.components.text_encoder_2 if name == "text_encoder_2" else self.components.text_encoder
            embeds = token_embeddings(module, torch.from_numpy(ids), fixes, windows).numpy()   # float32 inputs
            outputs = self._embeds_session(name).run(None, {"input_ids": ids, "inputs_embeds": embeds})
        else:
            outputs = self.sessions[name].run(None, {"input_ids": ids})
        if self.pooled_dim is None:
            hidden = outputs[0][outputs[0].shape[0] - clip_skip]            # (L, N, 77, C): CLIP skip picks a layer
        else:
            hidden = outputs[0]                                              # (N, 77, C): the penultimate layer
        out = torch.from_numpy(np.ascontiguousarray(hidden)).reshape(b, n, -1).to(self.device)
        if not pooled:
            return out
        if len(outputs) < 2:
            raise ValueError(f"text encoder {encoder} has no pooled projection")
        return out, torch.from_numpy(outputs[1]).reshape(b, windows, -1)[:, 0].to(self.device)

    def _bind(self, io, name, t: torch.Tensor):
        io.bind_input(name, self.device.type, self.device.index or 0, _NP[t.dtype], tuple(t.shape), t.data_ptr())

    def unet(self, sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """One UNet call on bound memory; the output buffer is reused for every call of a shape."""
        sample = sample.to(torch.float32).contiguous()
        t = t.to(torch.float32).contiguous()
        added = {}
        if self._added is not None:           # SDXL: the pooled text and sizes in buffers of their own
            added = self._added(context, torch.float32)
            context = added.pop("encoder_hidden_states")
        context = context.to(torch.float32).contiguous()
        shape = tuple(sample.shape)
        key = (shape, tuple(context.shape))
        if key not in self._bindings:
            sess = self.sessions["unet"]
            io = sess.io_binding()
            out_shape = (shape[0], self.components.latent_channels, *shape[2:])   # 9 in, 4 out: inpainting models
            out = torch.empty(out_shape, dtype=torch.float32, device=self.device)
            io.bind_output("out_sample", self.device.type, self.device.index or 0, np.float32, out_shape,
                           out.data_ptr())
            self._bindings[key] = (io, out)
        io, out = self._bindings[key]
        self._bind(io, "sample", sample)
        self._bind(io, "timestep", t)
        self._bind(io, "encoder_hidden_states", context)
        for name, value in added.items():
            self._bind(io, name, value)
        self.sessions["unet"].run_with_iobinding(io)
        return out

    def close(self) -> None:
        """Release the ONNX Runtime sessions (and their memory)."""
        self.sessions = {}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        image = self.sessions["vae_decoder"].run(None, {"latent": latents.float().cpu().numpy()})[0]
        return torch.from_numpy(image).to(self.device)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> the VAE posterior's moments (B, 2C, h, w), float32
        (the encoder is built into the engine folder on first use)."""
        b, _, h, w = images.shape
        check_profile_request(self.profile, self.size_multiple, self.engine_dir, b, h, w)
        session = self._extra_session("vae_encoder", "img2img: the VAE encoder")
        moments = session.run(None, {"image": images.float().cpu().numpy()})[0]
        return torch.from_numpy(moments).to(self.device)
