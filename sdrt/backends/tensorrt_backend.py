"""The TensorRT backend: serialized engines (``sdrt build --backend tensorrt``) in the loop.

Written against the TensorRT 10/11 Python API (``Runtime.deserialize_cuda_engine``,
``ICudaEngine`` tensor introspection, ``IExecutionContext`` with user-managed device memory,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``). It has **not run on real
TensorRT** (it cannot be installed where this was written); the tests drive it through a
faithful fake of that API (tests/tensorrt_fake.py) whose every name is checked against the real
11.4 binding.

- Each engine is deserialized once; one execution context per engine. The UNet and VAE contexts
  share one device scratch buffer sized for the larger (``device_memory_size_v2``): they run one
  after the other on one stream. The text encoder has its own, because ``sdrt.Engine`` encodes the
  next batch's text on another thread while a batch denoises.
- Inputs are bound by address, straight from the loop's tensors; outputs go to buffers
  allocated once per shape. Shapes and addresses are set only when they change.
- Everything is enqueued on torch's current CUDA stream, so TensorRT, torch ops and sdrt's
  fused step kernel are ordered on one stream and a CUDA graph captures all of them
  (``graph_safe``). Token ids cross the bus through a pinned host buffer.
- The loader refuses engines built for another GPU architecture or TensorRT version, saying
  which and how to rebuild; missing engines are built on demand.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch

from ..conditioning import added_pooled_dim
from ..paths import default_engine_dir
from ..tokenizer import MAX_LENGTH
from . import (
    ALIGNMENT,
    AddedInputs,
    aligned_empty,
    build_log,
    check_profile_request,
    check_profile_windows,
    check_text_input,
    token_embeddings,
)

NETWORKS = ("text_encoder", "unet", "vae_decoder")      # SD 1.x/2.x; SDXL adds text_encoder_2
LOOP_NETWORKS = ("unet", "vae_decoder")          # run in turn by the denoising stage
MIN_VERSION = (10, 1)           # device_memory_size_v2 and set_device_memory(ptr, size) came in 10.1


def check_runtime_version(trt) -> None:
    """Refuse a TensorRT older than 10.1 at load, naming what it lacks."""
    try:
        version = tuple(int(v) for v in str(trt.__version__).split(".")[:2])
    except ValueError:
        raise ValueError(f"TensorRT version {trt.__version__!r} is not understood") from None
    if version < MIN_VERSION:
        raise ValueError(f"TensorRT {trt.__version__} is too old for sdrt's runtime: it needs 10.1 or newer "
                         "(ICudaEngine.device_memory_size_v2 and IExecutionContext.set_device_memory(memory, size), "
                         "which user-managed scratch memory uses); install tensorrt>=10.1")


def normalize_device(device) -> torch.device:
    """``cuda`` as ``cuda:N`` (the current device), so that it compares equal to a tensor's device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def on_device(device: torch.device):
    """A scope in which TensorRT builds, deserializes and creates contexts on ``device``."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def torch_dtype(trt, data_type) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.BF16: torch.bfloat16, trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64}
    if data_type not in table:
        raise ValueError(f"engine tensor type {data_type} is not supported by sdrt's TensorRT backend")
    return table[data_type]


class _Engine:
    """One deserialized engine, its execution context and its bound buffers."""

    def __init__(self, trt, runtime, name: str, path: Path, device: torch.device, sdxl: bool = False):
        self.name, self.device = name, device
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ValueError(f"TensorRT could not deserialize {path} (see the log above); rebuild it with "
                             f"`sdrt build MODEL --backend tensorrt --out {path.parent} --force`")
        self.inputs, self.outputs, self.dtypes = [], [], {}
        for i in range(self.engine.num_io_tensors):
            tensor = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(tensor)
            self.dtypes[tensor] = torch_dtype(trt, self.engine.get_tensor_dtype(tensor))
        from sdrt.export.specs import network_specs
        spec = network_specs(sdxl)[name]
        want = ([t.name for t in spec.inputs], [t.name for t in spec.outputs])
        if (sorted(self.inputs), sorted(self.outputs)) != (sorted(want[0]), sorted(want[1])):
            raise ValueError(f"{path}: engine tensors {self.inputs} -> {self.outputs} do not match the "
                             f"{name} export spec {want[0]} -> {want[1]}; rebuild the engine")
        self.scratch_bytes = int(self.engine.device_memory_size_v2)
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {path}")
        self.max_shapes = {t: tuple(self.engine.get_tensor_profile_shape(t, 0)[2]) for t in self.inputs}
        self._bound: dict[str, tuple] = {}          # tensor -> (shape, address) last given to TensorRT
        self._out: dict[tuple, torch.Tensor] = {}    # (tensor, shape) -> output buffer
        self._staging: dict[tuple, torch.Tensor] = {}   # (tensor, shape) -> aligned copy of a misaligned input
        # how often the context's input shapes changed: a CUDA graph of this context is only valid
        # with the shapes it was captured with (its addresses are baked into the graph's kernels);
        # StaticLoop compares it before each replay
        self.version = 0

    def close(self) -> None:
        """Release the context before the engine (TensorRT's order), and the output buffers."""
        self._out.clear()
        self._staging.clear()
        self._bound.clear()
        self.context = None
        self.engine = None

    def set_scratch(self, scratch: torch.Tensor) -> None:
        self.context.set_device_memory(scratch.data_ptr(), scratch.numel())

    def _address(self, tensor: str, shape: tuple, addr: int) -> None:
        if not self.context.set_tensor_address(tensor, addr):
            raise RuntimeError(f"{self.name}: TensorRT refused the address {addr:#x} of {tensor} (it must be a "
                               f"device address aligned to {ALIGNMENT} bytes)")
        self._bound[tensor] = (shape, addr)

    def __call__(self, stream: int, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        for tensor in self.inputs:
            t = inputs[tensor]
            if t.dtype != self.dtypes[tensor] or not t.is_contiguous() or t.device != self.device:
                raise ValueError(f"{self.name}.{tensor}: needs a contiguous {self.dtypes[tensor]} tensor on "
                                 f"{self.device}, got {t.dtype} on {t.device}")
            shape = tuple(t.shape)
            if t.data_ptr() % ALIGNMENT:          # a view into a larger tensor: bind an aligned copy
                staged = self._staging.get((tensor, shape))
                if staged is None:
                    staged = self._staging[(tensor, shape)] = aligned_empty(shape, t.dtype, self.device)
                t = staged.copy_(t)
            old = self._bound.get(tensor)
            if old is None or old[0] != shape:
                if not self.context.set_input_shape(tensor, shape):
                    raise ValueError(f"{self.name}: input {tensor} of shape {shape} is outside the engine's profile")
                self.version += 1
            if old is None or old[1] != t.data_ptr():
                self._address(tensor, shape, t.data_ptr())
            self._bound[tensor] = (shape, t.data_ptr())
        result = {}
        for tensor in self.outputs:
            shape = tuple(self.context.get_tensor_shape(tensor))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.name}: TensorRT left the shape of {tensor} unresolved: {shape}")
            buf = self._out.get((tensor, shape))
            if buf is None:                           # once per shape
                buf = self._out[(tensor, shape)] = aligned_empty(shape, self.dtypes[tensor], self.device)
            if self._bound.get(tensor, (None, None))[1] != buf.data_ptr():
                self._address(tensor, shape, buf.data_ptr())
            result[tensor] = buf
        if not self.context.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT failed to enqueue {self.name} (see the log above)")
        return result


class TensorRTBackend:
    """Runs ``engine_dir``'s TensorRT engines, building them first when missing."""

    graph_safe = True

    def __init__(self, components, device: torch.device, dtype: torch.dtype, engine_dir=None, trt=None,
                 arch: str | None = None, log=None, cuda=None):
        from sdrt.export import Profile
        from sdrt.export.build import check_artifact, read_manifest
        from sdrt.export.tensorrt import (
            BuildOptions,
            build_tensorrt,
            check_engine_target,
            device_warning,
            native_arch,
            require_tensorrt,
        )

        self.trt = trt = trt or require_tensorrt()
        check_runtime_version(trt)
        self.device = device = normalize_device(device)
        # the CUDA stream API (tests pass a fake); None on a CPU, where there are no streams
        self.cuda = cuda if cuda is not None else (torch.cuda if device.type == "cuda" else None)
        self._side: dict[str, object] = {}       # "text" / "loop" -> a dedicated stream (created on first use)
        log = log or build_log
        arch = arch or native_arch()
        if arch is None:
            raise ValueError("backend 'tensorrt' needs a CUDA GPU (none is visible)")
        precision = {torch.float16: "fp16", torch.float32: "fp32"}[dtype]
        self.engine_dir = Path(engine_dir) if engine_dir else default_engine_dir(components, "tensorrt", precision, arch)
        manifest = read_manifest(self.engine_dir)
        target = manifest.get("target")
        if target and manifest.get("networks"):
            problem = check_engine_target(target, arch, str(trt.__version__), self.engine_dir)
            if problem:
                raise ValueError(problem)
            warning = device_warning(target, self.engine_dir)
            if warning:
                logging.getLogger("sdrt.backends").warning(warning)
        if manifest.get("networks") and manifest.get("precision") not in (None, precision):
            raise ValueError(f"the engines in {self.engine_dir} are {manifest.get('precision')}, dtype "
                             f"{str(dtype).replace('torch.', '')} asks for {precision}: build another folder "
                             f"(`sdrt build MODEL --backend tensorrt --dtype ... --out DIR`)")
        from sdrt.export.specs import default_networks
        networks = default_networks(components.is_sdxl)
        self.components = components
        self._build = dict(precision=precision, arch=arch, log=log)       # for what is built on first use
        missing = [n for n in networks if not check_artifact(
            self.engine_dir, manifest.get("networks", {}).get(n),
            manifest.get("networks", {}).get(n, {}).get("key", {})).ok]
        self.tiling = bool(manifest.get("tiling", False))      # built with circular padding (--tiling)
        if missing:
            log(f"building TensorRT engines for {', '.join(missing)} in {self.engine_dir}")
            with on_device(device):
                manifest = build_tensorrt(components, self.engine_dir,
                                          options=BuildOptions(precision=precision, tiling=self.tiling),
                                          networks=networks, target=arch, trt=trt, arch=arch, log=log)
        unet_entry = manifest["networks"]["unet"]
        self.profile = Profile.from_json(unet_entry["profile"])
        self.size_multiple = int(unet_entry.get("size_multiple", components.size_multiple))
        self.num_text_layers = int(components.text_encoder.config.num_hidden_layers)
        self.pooled_dim = added_pooled_dim(components.unet.config)      # SDXL: contexts carry pooled text + sizes
        self._added = AddedInputs(self.pooled_dim, device) if self.pooled_dim is not None else None

        # LoRA: engines built refittable (`sdrt build --backend tensorrt --refit`) take merged weights
        self.refittable = {n: "-refit" in str(manifest["networks"][n].get("key", {}).get("optimization", ""))
                           for n in networks}
        self._refitted: dict[str, set] = {}              # network -> modules whose weights a LoRA changed
        self._graphs: dict[str, object] = {}             # network -> GraphWeights of its ONNX graph
        self._synced: dict[str, tuple] = {}              # network -> the LoRA set its engine holds
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with on_device(device):            # engines and contexts live on the device they were loaded on
            self.engines = {n: _Engine(trt, self.runtime, n, self.engine_dir / manifest["networks"][n]["file"],
                                       device, components.is_sdxl) for n in networks}
        # one scratch buffer for the UNet and the VAE, sized for the larger: they run one after the
        # other in the denoising stage. The text encoder gets its own: sdrt.Engine encodes the next
        # batch's text on another thread (and stream) while this one denoises.
        self.scratch_bytes = max(self.engines[n].scratch_bytes for n in LOOP_NETWORKS)
        self.scratch = aligned_empty((max(1, self.scratch_bytes),), torch.uint8, device)
        for n in LOOP_NETWORKS:
            self.engines[n].set_scratch(self.scratch)
        # SDXL's two text encoders run one after the other: they share theirs
        text = [e for n, e in self.engines.items() if n.startswith("text_encoder")]
        self.text_scratch = aligned_empty((max(1, *(e.scratch_bytes for e in text)),), torch.uint8, device)
        for e in text:
            e.set_scratch(self.text_scratch)
        self.dtype = self.engines["unet"].dtypes["sample"]       # the loop's buffers match the engine's I/O
        # per token-id shape: pinned host buffer, device buffer, CUDA event after its last copy
        self._ids: dict[tuple, tuple] = {}

    def graph_state(self) -> tuple:
        """The loop engines' context state: a CUDA graph captured with one set of input shapes must
        not replay after another was set (by an eager call or another loop)."""
        return tuple(self.engines[n].version for n in LOOP_NETWORKS)

    def _enqueue(self, engine: _Engine, group: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run ``engine`` ordered after the work already queued on torch's current stream, and
        before what follows there. On the legacy default stream (what the batcher's threads get)
        TensorRT would add device synchronisations and serialise the text encoding with the
        denoising, so the engines of each group ("text", "loop") get a stream of their own,
        joined to the current one by events; on any other stream (a CUDA-graph capture's among
        them) they run on it."""
        if self.cuda is None:
            return engine(0, **inputs)
        current = self.cuda.current_stream(self.device)
        if current.cuda_stream:
            return engine(current.cuda_stream, **inputs)
        side = self._side.get(group)
        if side is None:
            side = self._side[group] = self.cuda.Stream(self.device)
        side.wait_stream(current)              # the inputs written on the current stream are ready
        with self.cuda.stream(side):           # the engine's own torch work (aligned copies) goes there too
            out = engine(side.cuda_stream, **inputs)
        current.wait_stream(side)              # the outputs are ready for what follows there
        return out

    # ------------------------------------------------------------------ textual inversion

    def _embeds_engine(self, name: str) -> "_Engine":
        """The text encoder that reads token embeddings from an input (``NAME_embeds``), built into
        the engine folder the first time a prompt names an embedding."""
        engine = self._extra_engine(name + "_embeds", "textual-inversion embeddings")
        if engine.scratch_bytes > self.text_scratch.numel():     # the text encoders share one scratch buffer
            self.text_scratch = aligned_empty((engine.scratch_bytes,), torch.uint8, self.device)
            for n, e in self.engines.items():
                if n.startswith("text_encoder"):
                    e.set_scratch(self.text_scratch)
        engine.set_scratch(self.text_scratch)
        return engine

    def _extra_engine(self, graph: str, purpose: str) -> "_Engine":
        """A network the loop does not need, built into the engine folder on first use, with
        scratch memory of its own (the text encoders' variants share theirs instead)."""
        if graph not in self.engines:
            from sdrt.export.build import read_manifest
            from sdrt.export.tensorrt import BuildOptions, build_tensorrt
            manifest = read_manifest(self.engine_dir)
            if graph not in manifest.get("networks", {}):
                self._build["log"](f"building {graph} ({purpose}) in {self.engine_dir}")
                with on_device(self.device):
                    manifest = build_tensorrt(self.components, self.engine_dir, profile=self.profile,
                                              options=BuildOptions(precision=self._build["precision"],
                                                                   tiling=self.tiling),
                                              networks=(graph,), target=self._build["arch"], trt=self.trt,
                                              arch=self._build["arch"], log=self._build["log"])
            with on_device(self.device):
                engine = _Engine(self.trt, self.runtime, graph, self.engine_dir / manifest["networks"][graph]["file"],
                                 self.device, self.components.is_sdxl)
            if not graph.endswith("_embeds"):
                engine.set_scratch(aligned_empty((engine.scratch_bytes,), torch.uint8, self.device))
            self.engines[graph] = engine
        return self.engines[graph]

    # ------------------------------------------------------------------ LoRA by refit

    weight_changes_hint = ("; LoRA needs refittable engines: `sdrt build MODEL --backend tensorrt --refit` (another "
                           "VAE is not supported on TensorRT yet)")

    @property
    def supports_lora(self) -> bool:
        return all(ok for n, ok in self.refittable.items() if n == "unet" or n.startswith("text_encoder"))

    def sync_weights(self, part: str, lora_state) -> None:
        """Refit the engines of ``part`` ("text" or "unet") with the weights ``lora_state`` holds in
        the torch modules: the modules a LoRA changes now, and those it changed before (back to
        the model's own). Nothing happens when the set did not change since the last call; a
        refitted engine's captured CUDA graphs are captured again."""
        from sdrt.export.onnx_export import GraphWeights

        from ..lora import PARTS
        if not self.supports_lora:
            raise ValueError(f"LoRA on TensorRT needs refittable engines; the engines in {self.engine_dir} are not: "
                             "rebuild them with `sdrt build MODEL --backend tensorrt --refit`")
        uses = lora_state.current[part]
        for network in PARTS[part]:
            if network not in self.engines or self._synced.get(network) == uses:
                continue
            changed = set(lora_state.changed(network))
            todo = sorted(changed | self._refitted.get(network, set()))
            if todo:
                onnx_dir = self.engine_dir / "onnx"
                graph = self._graphs.get(network) or self._graphs.setdefault(
                    network, GraphWeights(onnx_dir / f"{network}.onnx"))
                # TensorRT names refittable weights after the ONNX initializers; it reads the
                # arrays until refit_cuda_engine returns
                values = lora_state.graph_values(network, todo, graph, onnx_dir,
                                                 "rebuild with `sdrt build MODEL --backend tensorrt --refit`")
                refitter = self.trt.Refitter(self.engines[network].engine, self.logger)
                for name, array in values.items():
                    if not refitter.set_named_weights(name, self.trt.Weights(array)):
                        raise RuntimeError(f"TensorRT refused the weights {name!r} of {network} "
                                           f"(shape {array.shape}, {array.dtype})")
                # weights TensorRT combined with the changed ones at build time (a fused bias, say):
                # their own values, from the graph they were built from
                for name in list(refitter.get_missing_weights()):
                    if name not in graph.index.by_name:
                        raise RuntimeError(f"TensorRT asks for weights {name!r} to refit {network}, which its "
                                           "graph does not hold")
                    values[name] = np.ascontiguousarray(graph.index.array(graph.index.by_name[name]))
                    if not refitter.set_named_weights(name, self.trt.Weights(values[name])):
                        raise RuntimeError(f"TensorRT refused the graph's own weights {name!r} of {network}")
                with on_device(self.device):
                    if not refitter.refit_cuda_engine():
                        raise RuntimeError(f"TensorRT could not refit the {network} engine (see the log above)")
                self.engines[network].version += 1        # a CUDA graph captured before must not replay
            self._refitted[network] = changed
            self._synced[network] = uses

    def close(self) -> None:
        """Release the execution contexts and engines, then their scratch memory."""
        for engine in self.engines.values():
            engine.close()
        self.engines = {}
        self.scratch = self.text_scratch = None

    def check_tiling(self, enabled: bool) -> None:
        from . import check_folder_tiling
        check_folder_tiling(enabled, self.tiling, self.engine_dir)

    def check_request(self, batch_size: int, height: int, width: int) -> None:
        check_profile_request(self.profile, self.size_multiple, self.engine_dir, batch_size, height, width)

    def encode_text(self, input_ids: torch.Tensor, clip_skip: int = 1, encoder: int = 0, pooled: bool = False,
                    fixes=None):
        """As ``TorchBackend.encode_text`` (SDXL: the penultimate layers, ``pooled`` from the second)."""
        b, n = input_ids.shape
        windows = check_text_input(input_ids, clip_skip, self.num_text_layers)
        check_profile_windows(self.profile, self.engine_dir, windows)
        name = "text_encoder" if encoder == 0 else "text_encoder_2"
        if name not in self.engines:
            raise ValueError(f"text encoder {encoder} does not exist in this model")
        embeds = None
        if fixes and any(fixes):         # textual inversion: the token embeddings come in as an input
            engine = self._embeds_engine(name)
            module = self.components.text_encoder_2 if name == "text_encoder_2" else self.components.text_encoder
            embeds = token_embeddings(module, input_ids.reshape(-1, MAX_LENGTH), fixes, windows).to(
                self.device, engine.dtypes["inputs_embeds"])
        else:
            engine = self.engines[name]
        if pooled and "text_embeds" not in engine.outputs:
            raise ValueError(f"text encoder {encoder} has no pooled projection")
        ids = input_ids.reshape(b * windows, MAX_LENGTH)
        rows = engine.max_shapes["input_ids"][0]           # the profile's most windows per call
        parts, pools = [], []
        for start in range(0, ids.shape[0], rows):
            chunk = ids[start:start + rows]
            shape, dt = tuple(chunk.shape), engine.dtypes["input_ids"]
            if shape not in self._ids:
                cuda = self.device.type == "cuda"
                self._ids[shape] = (torch.empty(shape, dtype=dt, pin_memory=cuda),
                                    torch.empty(shape, dtype=dt, device=self.device),
                                    torch.cuda.Event() if cuda else None)
            host, dev, copied = self._ids[shape]
            if copied is not None:
                copied.synchronize()          # the previous copy out of this pinned buffer is done
            host.copy_(chunk)
            dev.copy_(host, non_blocking=True)             # pinned -> device, asynchronous
            if copied is not None:
                copied.record()
            extra = {} if embeds is None else {"inputs_embeds": embeds[start:start + rows].contiguous()}
            result = self._enqueue(engine, "text", input_ids=dev, **extra)
            hidden = result["hidden_states"]
            if self.pooled_dim is None:       # (L, rows, 77, C): CLIP skip picks a layer
                parts.append(hidden[hidden.shape[0] - clip_skip].clone())
            else:                             # SDXL: (rows, 77, C), the penultimate layer
                parts.append(hidden.clone())
            if pooled:
                pools.append(result["text_embeds"].clone())
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        out = out.reshape(b, n, out.shape[-1])
        if not pooled:
            return out
        return out, torch.cat(pools).reshape(b, windows, -1)[:, 0]

    def unet(self, sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """One UNet call on bound memory; the output buffer is reused for every call of a shape."""
        e = self.engines["unet"]
        args = {"sample": sample, "timestep": t, "encoder_hidden_states": context}
        if self._added is not None:           # SDXL: the pooled text and sizes in buffers of their own
            args.update(self._added(context, e.dtypes["encoder_hidden_states"]))
        args = {k: v.to(e.dtypes[k]).contiguous() for k, v in args.items()}
        return self._enqueue(e, "loop", **args)["out_sample"]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        e = self.engines["vae_decoder"]
        image = self._enqueue(e, "loop", latent=latents.to(e.dtypes["latent"]).contiguous())["image"]
        return image.float()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> the VAE posterior's moments (B, 2C, h, w), float32;
        the encoder engine is built into the engine folder on first use (img2img)."""
        b, _, h, w = images.shape
        self.check_request(b, h, w)
        e = self._extra_engine("vae_encoder", "img2img: the VAE encoder")
        moments = self._enqueue(e, "loop", image=images.to(self.device, e.dtypes["image"]).contiguous())["moments"]
        return moments.float()
