"""A fake of the TensorRT Python API subset sdrt uses, with the real names and signatures
(TensorRT 10/11: tensorrt.Builder, OnnxParser, IBuilderConfig, IOptimizationProfile, ...).

It checks what the real API would refuse (profile shapes out of order, inputs without a shape,
a timing cache given as something other than bytes), parses the ONNX for its real input names,
records every call, and records every attribute name the code touches so that
``test_tensorrt_names`` can check them against the real 11.4 binding's name table.

It also behaves like TensorRT where the code could go wrong although every name exists:
``set_tensor_address`` returns False for an address not aligned to 256 bytes; a captured
``execute_async_v3`` fails loudly when replayed after its context was re-shaped; an
engine marked ``CAPTURE_FORBIDDEN`` refuses to enqueue under capture (returns False); a timing
cache from another device is refused by ``set_timing_cache`` (False; ``get_timing_cache`` then
gives None); a progress monitor that raises cancels the build (None); ``module("10.0.x")`` lacks
the 10.1 memory APIs and has TensorRT 10's enum values, the default module 11's; with a stream
API in play (``STREAMS``), an enqueue on the legacy default stream (handle 0) is recorded.
"""
from __future__ import annotations

import types
from pathlib import Path

TOUCHED: set[str] = set()        # every attribute name read on a fake object or the module
CALLS: list[tuple] = []          # (method, args) in order


class _Recorded:
    def __getattribute__(self, name):
        if not name.startswith("_"):
            TOUCHED.add(name)
        return object.__getattribute__(self, name)


def _call(name, *args):
    CALLS.append((name, args))


class Logger(_Recorded):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity=1):
        self.min_severity = min_severity


class MemoryPoolType:
    WORKSPACE = "WORKSPACE"


class BuilderFlag:
    """TensorRT 11: the precision flags (FP16, BF16, INT8, ...) are gone with weak typing."""
    REFIT = "REFIT"
    TF32 = "TF32"


class NetworkDefinitionCreationFlag:
    """TensorRT 11's values: EXPLICIT_BATCH is gone, so STRONGLY_TYPED is bit 0 (NvInfer.h)."""
    STRONGLY_TYPED = 0


class NetworkDefinitionCreationFlag10:
    """TensorRT 10's: bit 0 is the deprecated EXPLICIT_BATCH, STRONGLY_TYPED bit 1."""
    STRONGLY_TYPED = 1


class BuilderFlag10(BuilderFlag):
    """TensorRT 10's, which still has the weak-typing precision flags (``module(weak=True)``)."""
    FP16 = "FP16"
    BF16 = "BF16"


class IProgressMonitor:
    def __init__(self):
        pass


class _Tensor(_Recorded):
    def __init__(self, name):
        self.name = name


class INetworkDefinition(_Recorded):
    def __init__(self):
        self._inputs = []

    @property
    def num_inputs(self):
        return len(self._inputs)

    def get_input(self, index):
        return self._inputs[index]


class OnnxParser(_Recorded):
    def __init__(self, network, logger):
        self._network, self._errors = network, []

    def parse_from_file(self, model):
        _call("parse_from_file", model)
        import onnx
        path = Path(model)
        if not path.is_file():
            self._errors = [f"ERROR: file {model} not found"]
            return False
        graph = onnx.load(str(path), load_external_data=False).graph
        inits = {i.name for i in graph.initializer}
        self._network._inputs = [_Tensor(i.name) for i in graph.input if i.name not in inits]
        self._network._outputs = [o.name for o in graph.output]
        self._network._onnx = str(path)
        # the weights' element types: a strongly typed network computes in these
        types = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}
        self._network._weight_types = {types.get(i.data_type, str(i.data_type)) for i in graph.initializer
                                       if len(i.dims) > 1}
        return True

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, index):
        return self._errors[index]


class IOptimizationProfile(_Recorded):
    def __init__(self):
        self.shapes = {}

    def set_shape(self, input, min, opt, max):
        if not (len(min) == len(opt) == len(max)) or any(not (a <= b <= c) for a, b, c in zip(min, opt, max)):
            raise ValueError(f"set_shape({input}): need min <= opt <= max per dimension, got {min}, {opt}, {max}")
        self.shapes[input] = (tuple(min), tuple(opt), tuple(max))


DEVICE = "fake-gpu-0"          # what a timing cache records of the GPU it was made on


class ITimingCache(_Recorded):
    def __init__(self, data: bytes):
        self.data = bytes(data) or f"fake-timing-cache:{DEVICE}:".encode()

    def serialize(self):
        return memoryview(self.data + b"+")      # each build adds measurements


class IBuilderConfig(_Recorded):
    def __init__(self):
        self.flags, self.pools, self.profiles = set(), {}, []
        self.builder_optimization_level = 3
        self.progress_monitor = None
        self._cache = None

    def set_memory_pool_limit(self, pool, pool_size):
        self.pools[pool] = pool_size

    def set_flag(self, flag):
        self.flags.add(flag)

    def create_timing_cache(self, serialized_timing_cache):
        if not isinstance(serialized_timing_cache, (bytes, bytearray, memoryview)):
            raise TypeError("create_timing_cache takes a buffer")
        return ITimingCache(serialized_timing_cache)

    def set_timing_cache(self, cache, ignore_mismatch):
        """False (and no cache) for one made on another device, unless ignore_mismatch."""
        header = f"fake-timing-cache:{DEVICE}:".encode()
        if not ignore_mismatch and not cache.data.startswith(header):
            _call("set_timing_cache refused", cache.data[:40])
            return False
        self._cache = cache
        return True

    def get_timing_cache(self):
        return self._cache

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder(_Recorded):
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags=0):
        _call("create_network", flags)
        network = INetworkDefinition()
        network._flags = flags
        return network

    def create_builder_config(self):
        return IBuilderConfig()

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_serialized_network(self, network, config):
        _call("build_serialized_network", network, config)
        names = {t.name for t in network._inputs}
        for profile in config.profiles:
            missing = names - set(profile.shapes)
            if missing:                 # the real builder fails: dynamic inputs need a profile shape
                return None
        monitor = config.progress_monitor
        if monitor is not None:
            try:
                monitor.phase_start("Building engine", None, 2)
                for i in range(2):
                    if not monitor.step_complete("Building engine", i):
                        return None
                monitor.phase_finish("Building engine")
            except Exception:  # noqa: BLE001 - TensorRT treats an exception in the callback as a cancel
                _call("build cancelled by the progress monitor")
                return None
        flags = ",".join(sorted(config.flags))
        outputs = getattr(network, "_outputs", [])
        onnx_path = getattr(network, "_onnx", "")
        return memoryview(f"fake-plan|{flags}|{sorted(config.profiles[0].shapes.items())}|{outputs}|{onnx_path}".encode())


# ---------------------------------------------------------------- runtime

class TensorIOMode:
    NONE, INPUT, OUTPUT = "NONE", "INPUT", "OUTPUT"


class DataType:
    FLOAT, HALF, BF16, INT32, INT64 = "FLOAT", "HALF", "BF16", "INT32", "INT64"


class ExecutionContextAllocationStrategy:
    STATIC, ON_PROFILE_CHANGE, USER_MANAGED = "STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED"


# what each fake engine computes: network -> (run(**inputs) -> {output: tensor},
# shapes({input: shape}) -> {output: shape}); tests fill it in (compute_with)
EXECUTORS: dict = {}


def _profile():
    from sdrt.export.specs import Profile
    return Profile(batch=(1, 1, 2), height=(64, 64, 96), width=(64, 64, 96), windows=(1, 1, 2))


PROFILE = _profile()               # what the tests' fake engines are built for (conftest: trt_engines)


def compute_with(components, backend, frozen: bool = False) -> None:
    """Make the fake engines compute what a torch backend's modules compute; ``frozen``: with a
    private copy of the modules (weights change only through Refitter)."""
    import copy

    import torch
    if frozen:
        from sdrt.backends.torch_backend import TorchBackend
        components = copy.deepcopy(components)
        backend = TorchBackend(components, torch.device("cpu"), torch.float32)
        FROZEN.clear()
        FROZEN.update({"unet": components.unet, "text_encoder": components.text_encoder,
                       "text_encoder_2": components.text_encoder_2})
    else:
        FROZEN.clear()
    layers, f = backend.num_text_layers, components.latent_factor
    channels = components.latent_channels
    hidden = int(components.text_encoder.config.hidden_size)
    if components.is_sdxl:
        _compute_sdxl(components, backend)
        return _add_embeds_executors(components)

    def text(input_ids):
        ids = input_ids.reshape(1, -1)
        return {"hidden_states": torch.stack([backend.encode_text(ids, k).reshape(input_ids.shape[0], 77, -1)
                                              for k in range(layers, 0, -1)])}
    EXECUTORS.update({
        "text_encoder": (text, lambda s: {"hidden_states": (layers, s["input_ids"][0], 77, hidden)}),
        "unet": (lambda sample, timestep, encoder_hidden_states: {
            "out_sample": backend.unet(sample, timestep, encoder_hidden_states)},
            lambda s: {"out_sample": (s["sample"][0], channels, *s["sample"][2:])}),
        "vae_decoder": (lambda latent: {"image": backend.decode(latent)},
                        lambda s: {"image": (s["latent"][0], 3, s["latent"][2] * f, s["latent"][3] * f)}),
        "vae_encoder": (lambda image: {"moments": backend.encode_image(image)},
                        lambda s: {"moments": (s["image"][0], 2 * channels, -(-s["image"][2] // f),
                                               -(-s["image"][3] // f))}),
    })
    _add_embeds_executors(components)


def _with_embeds(run, text_encoder):
    """An executor of ``NAME_embeds``: the base network's, its token embeddings replaced by the input."""
    def embeds_run(input_ids, inputs_embeds):
        table = getattr(text_encoder, "text_model", text_encoder).embeddings.token_embedding

        def hook(module, args, output):      # the backend encodes each 77-token row as a window
            return inputs_embeds.reshape(output.shape).to(output.dtype)
        handle = table.register_forward_hook(hook)
        try:
            return run(input_ids)
        finally:
            handle.remove()
    return embeds_run


def _add_embeds_executors(components) -> None:
    for name, encoder in (("text_encoder", components.text_encoder), ("text_encoder_2", components.text_encoder_2)):
        if name in EXECUTORS and encoder is not None:
            run, shapes = EXECUTORS[name]
            EXECUTORS[name + "_embeds"] = (_with_embeds(run, encoder), shapes)


def _compute_sdxl(components, backend) -> None:
    import torch
    f, pooled = components.latent_factor, backend.pooled_dim
    channels = components.latent_channels
    widths = [int(m.config.hidden_size) for m in (components.text_encoder, components.text_encoder_2)]

    def text(encoder):
        def run(input_ids):
            if encoder == 0:
                return {"hidden_states": backend.encode_text(input_ids, 1, encoder=0)}
            hidden, pool = backend.encode_text(input_ids, 1, encoder=1, pooled=True)
            return {"hidden_states": hidden, "text_embeds": pool}
        return run

    def unet(sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        row = torch.zeros(sample.shape[0], 1, encoder_hidden_states.shape[-1])
        row[:, 0, :pooled], row[:, 0, pooled:pooled + 6] = text_embeds, time_ids
        return {"out_sample": backend.unet(sample, timestep, torch.cat([encoder_hidden_states, row], dim=1))}

    EXECUTORS.update({
        "text_encoder": (text(0), lambda s: {"hidden_states": (s["input_ids"][0], 77, widths[0])}),
        "text_encoder_2": (text(1), lambda s: {"hidden_states": (s["input_ids"][0], 77, widths[1]),
                                               "text_embeds": (s["input_ids"][0], pooled)}),
        "unet": (unet, lambda s: {"out_sample": (s["sample"][0], channels, *s["sample"][2:])}),
        "vae_decoder": (lambda latent: {"image": backend.decode(latent)},
                        lambda s: {"image": (s["latent"][0], 3, s["latent"][2] * f, s["latent"][3] * f)}),
        "vae_encoder": (lambda image: {"moments": backend.encode_image(image)},
                        lambda s: {"moments": (s["image"][0], 2 * channels, -(-s["image"][2] // f),
                                               -(-s["image"][3] // f))}),
    })


SCRATCH = {"text_encoder": 3 << 20, "text_encoder_2": 4 << 20, "text_encoder_embeds": 6 << 20,
           "text_encoder_2_embeds": 6 << 20, "unet": 7 << 20, "vae_decoder": 5 << 20,
           "vae_encoder": 5 << 20}
ALIGNMENT = 256                  # bytes, for every address given to set_tensor_address
CAPTURE_FORBIDDEN: set = set()   # networks whose engines hold operations not allowed under graph capture
STREAMS: list = []               # non-empty while a test runs the backend with a (fake) CUDA stream API
_TORCH = {DataType.FLOAT: "float32", DataType.HALF: "float16", DataType.INT64: "int64", DataType.INT32: "int32"}


def _view(address: int, shape, dtype: str):
    """The memory at ``address`` as a tensor (host memory: the fake runs on a CPU)."""
    import ctypes

    import torch
    dt = getattr(torch, dtype)
    n = 1
    for d in shape:
        n *= d
    raw = (ctypes.c_char * (n * torch.empty((), dtype=dt).element_size())).from_address(address)
    return torch.frombuffer(raw, dtype=dt).view(tuple(shape))


class ICudaEngine(_Recorded):
    def __init__(self, network: str, profile: dict, outputs: list):
        self._network, self._profile = network, profile        # the plan's inputs and outputs: the ONNX graph's
        self._tensors = [(name, TensorIOMode.INPUT, DataType.INT64 if name == "input_ids" else DataType.FLOAT)
                         for name in profile]
        self._tensors += [(name, TensorIOMode.OUTPUT, DataType.FLOAT) for name in outputs]

    @property
    def num_io_tensors(self):
        return len(self._tensors)

    def get_tensor_name(self, index):
        return self._tensors[index][0]

    def get_tensor_mode(self, name):
        return next((m for n, m, _ in self._tensors if n == name), TensorIOMode.NONE)

    def get_tensor_dtype(self, name):
        return next(d for n, _, d in self._tensors if n == name)

    def get_tensor_profile_shape(self, name, profile_index):
        if profile_index != 0 or name not in self._profile:
            raise ValueError(f"get_tensor_profile_shape({name!r}, {profile_index})")
        return list(self._profile[name])

    @property
    def device_memory_size_v2(self):
        return SCRATCH[self._network]

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        _call("create_execution_context", self._network, strategy)
        return IExecutionContext(self, strategy)


class IExecutionContext(_Recorded):
    def __init__(self, engine: ICudaEngine, strategy):
        self._engine, self._strategy = engine, strategy
        self._shapes, self._addresses, self._memory = {}, {}, None

    def set_device_memory(self, memory, size):
        _call("set_device_memory", self._engine._network, memory, size)
        if size < self._engine.device_memory_size_v2:
            raise ValueError(f"set_device_memory: {size} bytes < device_memory_size_v2 "
                             f"{self._engine.device_memory_size_v2}")
        self._memory = (memory, size)

    def set_input_shape(self, name, shape):
        _call("set_input_shape", self._engine._network, name, tuple(shape))
        lo, _, hi = self._engine._profile[name]
        if len(shape) != len(lo) or any(not (a <= d <= b) for a, d, b in zip(lo, shape, hi)):
            return False
        self._shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        mode = self._engine.get_tensor_mode(name)
        if mode == TensorIOMode.INPUT:
            return self._shapes.get(name, tuple(-1 for _ in self._engine._profile[name][0]))
        inputs = [n for n, m, _ in self._engine._tensors if m == TensorIOMode.INPUT]
        if any(n not in self._shapes for n in inputs):
            return (-1,)
        return tuple(EXECUTORS[self._engine._network][1](self._shapes)[name])

    def set_tensor_address(self, name, memory):
        _call("set_tensor_address", self._engine._network, name, memory)
        if not memory or memory % ALIGNMENT:
            return False
        self._addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle):
        import cuda_graph_fake
        net = self._engine._network
        _call("execute_async_v3", net, stream_handle)
        if stream_handle == 0 and STREAMS:
            _call("legacy default stream", net)     # TensorRT adds device synchronisations there
        if cuda_graph_fake._ACTIVE and net in CAPTURE_FORBIDDEN:
            return False              # "enqueue returns false while capturing" (an op not allowed under capture)
        if self._strategy == ExecutionContextAllocationStrategy.USER_MANAGED and self._memory is None:
            return False              # the real context fails: user-managed memory was never given
        names = {n: (m, d) for n, m, d in self._engine._tensors}
        if any(n not in self._addresses for n in names) or any(
                n not in self._shapes for n, (m, _) in names.items() if m == TensorIOMode.INPUT):
            return False
        # what the enqueued kernels will read and write: the addresses and shapes bound now
        plan = [(n, m, d, self._addresses[n], self._shapes.get(n) or self.get_tensor_shape(n))
                for n, (m, d) in names.items()]
        self._run(plan)
        shapes = dict(self._shapes)

        def replay():     # a graph of this enqueue is tied to the context's shapes at capture (its
            if self._shapes != shapes:        # addresses are baked into the graph's kernels)
                raise RuntimeError(f"{net}: a CUDA graph of execute_async_v3 replayed after its execution context "
                                   "was re-shaped (undefined behaviour on a GPU)")
            self._run(plan)
        cuda_graph_fake.record(replay)      # inside a capture: replayed later
        return True

    def _run(self, plan):
        from torch.utils._python_dispatch import _disable_current_modes
        with _disable_current_modes():      # the engine's own work is not torch's to record
            inputs = {n: _view(a, s, _TORCH[d]) for n, m, d, a, s in plan if m == TensorIOMode.INPUT}
            outputs = EXECUTORS[self._engine._network][0](**{k: v.clone() for k, v in inputs.items()})
            for n, m, d, a, s in plan:
                if m == TensorIOMode.OUTPUT:
                    _view(a, s, _TORCH[d]).copy_(outputs[n])


class Runtime(_Recorded):
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine):
        import ast
        _call("deserialize_cuda_engine", len(serialized_engine))
        text = bytes(serialized_engine).decode(errors="replace")
        if not text.startswith("fake-plan|"):
            return None                                       # the real runtime logs and returns None
        _, flags, shapes, outputs, onnx_path = text.split("|", 4)
        shapes, outputs = dict(ast.literal_eval(shapes)), ast.literal_eval(outputs)
        network = {"input_ids": "text_encoder", "sample": "unet", "latent": "vae_decoder", "image": "vae_encoder"}[
            next(n for n in ("input_ids", "sample", "latent", "image") if n in shapes)]
        if network == "text_encoder" and "text_embeds" in outputs:
            network = "text_encoder_2"          # SDXL's second encoder: the one with a pooled output
        if "inputs_embeds" in shapes:
            network += "_embeds"                # token embeddings as an input (textual inversion)
        engine = ICudaEngine(network, shapes, outputs)
        engine._refittable, engine._onnx = "REFIT" in flags.split(","), onnx_path
        return engine


class Weights(_Recorded):
    """``trt.Weights(array)``: host weights (the fake keeps the numpy array)."""

    def __init__(self, a=None):
        import numpy as np
        self._array = np.asarray(a)


# the weights the fake engines compute with, per network: the modules of a private copy of the
# model (compute_with(frozen=True)); Refitter writes into them, so a LoRA reaches an engine only
# through a refit, as on a GPU
FROZEN: dict = {}
# weights the fake "fused" at build time: refitting the first asks for the second too
COMBINED_WEIGHTS: dict = {}


class Refitter(_Recorded):
    """TensorRT's refitter over one engine: ``set_named_weights`` takes weights named after the ONNX
    initializers (refused, as TensorRT refuses, for an unknown name or another shape or dtype),
    ``refit_cuda_engine`` puts them into the engine (False for an engine not built with REFIT)."""

    def __init__(self, engine, logger):
        _call("Refitter", engine._network)
        self._engine, self._weights = engine, {}
        from sdrt.export.onnx_export import InitializerIndex
        self._index = InitializerIndex(engine._onnx) if engine._onnx else None

    def set_named_weights(self, name, weights):
        _call("set_named_weights", self._engine._network, name)
        init = self._index.by_name.get(name) if self._index is not None else None
        if init is None:
            return False
        original = self._index.array(init)
        if weights._array.shape != original.shape or weights._array.dtype != original.dtype:
            return False
        self._weights[name] = weights
        return True

    def get_missing_weights(self):
        return [other for name in self._weights for other in [COMBINED_WEIGHTS.get(name)]
                if other is not None and other not in self._weights]

    def refit_cuda_engine(self):
        import numpy as np
        import torch
        _call("refit_cuda_engine", self._engine._network, sorted(self._weights))
        if not self._engine._refittable:
            return False
        modules = FROZEN.get(self._engine._network)
        if modules is None:
            raise RuntimeError("the fake engines compute with the live model: compute_with(..., frozen=True)")
        places = self._engine.__dict__.setdefault("_places", {})    # initializer -> (the engine's weight, transposed)
        for name, weights in self._weights.items():
            if name not in places:     # the first refit of a name: the engine still holds the original
                original = self._index.array(self._index.by_name[name]).astype(np.float32)
                for param in modules.parameters():
                    p = param.detach().numpy()
                    if p.shape == original.shape and np.array_equal(p, original):
                        places[name] = (param, False)
                        break
                    if p.ndim == 2 and p.T.shape == original.shape and np.array_equal(p.T, original):
                        places[name] = (param, True)
                        break
                else:
                    raise RuntimeError(f"fake refit: no weight of the engine equals the initializer {name}")
            param, transposed = places[name]
            value = weights._array.astype(np.float32)
            param.data.copy_(torch.from_numpy(value.T.copy() if transposed else value))
        return True


class ICudaEngine100(ICudaEngine):
    """TensorRT 10.0's engine: ``device_memory_size_v2`` came in 10.1."""

    @property
    def device_memory_size_v2(self):
        raise AttributeError("'tensorrt.ICudaEngine' object has no attribute 'device_memory_size_v2'")


class Runtime100(Runtime):
    def deserialize_cuda_engine(self, serialized_engine):
        engine = super().deserialize_cuda_engine(serialized_engine)
        if engine is not None:
            engine.__class__ = ICudaEngine100
        return engine


def module(version: str = "11.4.0.106", weak: bool = False):
    """A stand-in for ``import tensorrt``: TensorRT 11 by default; ``weak=True`` or a version
    10.x: TensorRT 10's precision flags and enum values; 10.0: without the 10.1 memory APIs."""
    class Module(_Recorded, types.ModuleType):
        pass
    m = Module("tensorrt")
    for obj in (Logger, MemoryPoolType, BuilderFlag, IProgressMonitor, Builder, OnnxParser, Runtime, TensorIOMode,
                DataType, ExecutionContextAllocationStrategy, NetworkDefinitionCreationFlag, Refitter, Weights):
        setattr(m, obj.__name__, obj)
    if weak or version.startswith("10."):
        m.BuilderFlag = BuilderFlag10
        m.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag10
    if version.startswith("10.0."):
        m.Runtime = Runtime100
    m.__version__ = version
    return m


FAKE_CLASSES = (Logger, MemoryPoolType, BuilderFlag, NetworkDefinitionCreationFlag, IProgressMonitor, INetworkDefinition, OnnxParser,
                IOptimizationProfile, ITimingCache, IBuilderConfig, Builder, TensorIOMode, DataType,
                ExecutionContextAllocationStrategy, ICudaEngine, IExecutionContext, Runtime, Refitter, Weights)
# enum-like classes: their members must be enum members of the real binding, not just words in it
FAKE_ENUMS = (Logger, MemoryPoolType, BuilderFlag, NetworkDefinitionCreationFlag, TensorIOMode, DataType,
              ExecutionContextAllocationStrategy)
