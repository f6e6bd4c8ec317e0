"""A fake of the torch.cuda graph API the static loop uses (Stream, current_stream, stream,
CUDAGraph, graph), for CPU tests of the capture and replay logic.

Capture records every aten operation the body runs (through a TorchDispatchMode) with the
very tensors it read and wrote, as a CUDA graph records kernels with their addresses; replay
re-runs them on the same memory, writing each operation's result into the tensor it produced
at capture. So anything the body takes from Python at capture time (a scalar, a tensor that is
replaced later) is baked in exactly as on a GPU, and a replay sees new inputs only through the
buffers it captured. Operations that synchronise with the host (``.item()``, data-dependent
shapes) raise, as they break a real capture. Code outside torch (the fake TensorRT's
execute_async_v3) joins a capture through ``record``.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
HOST_SYNC = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default}
_ACTIVE: list = []          # the recorder of the capture in progress, if any


def record(fn) -> None:
    """Called by fakes of non-torch work (an engine launch) when it is enqueued."""
    if _ACTIVE:
        _ACTIVE[-1].ops.append(fn)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_SYNC:
            raise RuntimeError(f"{func} synchronises with the host: not allowed during CUDA-graph capture")
        out = func(*args, **kwargs)
        # outputs that share memory with an argument (views, in-place and out= ops, and ops such
        # as contiguous() that return their input when nothing is to be done) are written by
        # re-running the op; the others are the op's own result, copied back on replay
        inputs = {t.untyped_storage().data_ptr() for t in _tensors(list(args) + list(kwargs.values()))}
        fresh = [t for t in _tensors(out) if t.untyped_storage().data_ptr() not in inputs]
        self.ops.append((func, args, kwargs, fresh))
        return out


class _Events(list):
    """The event list, copied as ("cuda", event) into ``mirror`` (another fake's call log)."""

    def __init__(self, mirror):
        super().__init__()
        self.mirror = mirror

    def append(self, event) -> None:
        super().append(event)
        if self.mirror is not None:
            self.mirror.append(("cuda", event))


class FakeGraph:
    def __init__(self, cuda: "FakeCuda"):
        self.cuda, self.ops = cuda, None

    def replay(self) -> None:
        self.cuda.events.append("replay")
        for op in self.ops:
            if callable(op):
                op()
                continue
            func, args, kwargs, fresh = op
            new = func(*args, **kwargs)
            if fresh:      # the op's own results, in order, land where the graph's memory is
                inputs = {t.untyped_storage().data_ptr() for t in _tensors(list(args) + list(kwargs.values()))}
                for old, value in zip(fresh, [t for t in _tensors(new) if t.untyped_storage().data_ptr() not in inputs]):
                    old.copy_(value)


class FakeStream:
    def __init__(self, cuda: "FakeCuda", name: str):
        self.cuda, self.name = cuda, name
        # CUDA's handle: 0 is the legacy default stream (torch's current stream on a new thread)
        self.cuda_stream = 0 if name == "current" else 1 + len(cuda.streams)
        if name != "current":
            cuda.streams.append(self)

    def wait_stream(self, other: "FakeStream") -> None:
        self.cuda.events.append(f"{self.name} waits for {other.name}")

    def synchronize(self) -> None:
        self.cuda.events.append(f"{self.name} synchronize")


class FakeCuda:
    """Stands in for ``torch.cuda`` in ``StaticLoop(cuda=...)``; ``events`` lists what happened."""

    def __init__(self, mirror: list | None = None):
        self.events = _Events(mirror)
        self.graphs: list[FakeGraph] = []
        self.streams: list[FakeStream] = []

    def Stream(self, device=None):  # noqa: N802 - torch.cuda's name
        return FakeStream(self, "side")

    def current_stream(self, device=None):
        return FakeStream(self, "current")

    @contextlib.contextmanager
    def stream(self, s: FakeStream):
        self.events.append(f"enter {s.name} stream")
        yield
        self.events.append(f"leave {s.name} stream")

    def CUDAGraph(self):  # noqa: N802
        g = FakeGraph(self)
        self.graphs.append(g)
        return g

    @contextlib.contextmanager
    def graph(self, g: FakeGraph, pool=None, stream=None, capture_error_mode="global"):
        self.events.append(f"capture begin ({capture_error_mode})")
        rec = _Recorder()
        _ACTIVE.append(rec)
        try:
            with rec:
                yield
        finally:
            _ACTIVE.pop()
        g.ops = rec.ops
        self.events.append("capture end")


class FakeEvent:
    """``torch.cuda.Event(enable_timing=True)`` on a CPU: host time (work there is synchronous)."""

    def __init__(self, enable_timing: bool = False):
        self.t = None

    def record(self, stream=None) -> None:
        import time
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "FakeEvent") -> float:
        return 1e3 * (end.t - self.t)


def patch_torch_cuda(monkeypatch, fake: FakeCuda | None = None) -> FakeCuda:
    """Point torch.cuda's graph, stream and event API at the fake (for code that calls torch.cuda
    directly, such as the GPU suite's timing functions), and name the GPU 'Fake GPU'.
    ``torch.cuda.is_available`` stays as it is (False on a CPU): claiming a GPU would send
    torch's own code (dynamo, for one) looking for CUDA."""
    fake = fake or FakeCuda()
    for name in ("Stream", "current_stream", "stream", "CUDAGraph", "graph"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    return fake
