"""A fake of the TensorRT Python API subset sdrt uses, with the real names and signatures
(TensorRT 10/11: tensorrt.Builder, OnnxParser, IBuilderConfig, IOptimizationProfile, ...).

It checks what the real API would refuse (profile shapes out of order, inputs without a shape,
a timing cache given as something other than bytes), parses the ONNX for its real input names,
records every call, and records every attribute name the code touches so that
``test_tensorrt_names`` can check them against the real 11.4 binding's name table.
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
    FP16 = "FP16"
    BF16 = "BF16"
    REFIT = "REFIT"


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


class ITimingCache(_Recorded):
    def __init__(self, data: bytes):
        self.data = bytes(data) or b"fake-timing-cache:"

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
        return INetworkDefinition()

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
            monitor.phase_start("Building engine", None, 2)
            for i in range(2):
                if not monitor.step_complete("Building engine", i):
                    return None
            monitor.phase_finish("Building engine")
        flags = ",".join(sorted(config.flags))
        return memoryview(f"fake-plan|{flags}|{sorted(config.profiles[0].shapes.items())}".encode())


def module(version: str = "11.4.0.106"):
    """A stand-in for ``import tensorrt``."""
    class Module(_Recorded, types.ModuleType):
        pass
    m = Module("tensorrt")
    for obj in (Logger, MemoryPoolType, BuilderFlag, IProgressMonitor, Builder, OnnxParser):
        setattr(m, obj.__name__, obj)
    m.__version__ = version
    return m


FAKE_CLASSES = (Logger, MemoryPoolType, BuilderFlag, IProgressMonitor, INetworkDefinition, OnnxParser,
                IOptimizationProfile, ITimingCache, IBuilderConfig, Builder)
