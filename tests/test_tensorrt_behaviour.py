"""What TensorRT does that a naive fake hides (issue: "TensorRT as it really behaves"): each test
fails against the code before the fix and passes now, against tests/tensorrt_fake.py, which
behaves like TensorRT in these places (see its docstring). Nothing here runs real TensorRT."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import tensorrt_fake as fake
import torch
from cuda_graph_fake import FakeCuda

import sdrt
from sdrt.backends import parse_device
from sdrt.backends import tensorrt_backend as tb
from sdrt.export.specs import ModelDims, profile_shapes
from sdrt.export.tensorrt import BuildOptions, build_engine

pytestmark = [pytest.mark.slow]

ALIGNMENT = 256          # bytes: TensorRT's requirement for every address given to set_tensor_address
ARGS = dict(prompt="a [cat:dog:0.5]", steps=4, width=64, height=64, sampler="Euler a", batch_size=2)


def _pipe(torch_pipe, trt_engines, **kw):
    backend = tb.TensorRTBackend(torch_pipe.components, torch.device("cpu"), torch.float32, trt_engines,
                                 trt=kw.pop("trt", fake.module()), arch="sm_90", log=lambda m: None, **kw)
    return sdrt.Pipeline(torch_pipe.components, backend)


# 1. devices -------------------------------------------------------------------------------------

def test_cuda_without_an_index_names_the_current_device(monkeypatch):
    """torch.device("cuda") != a tensor's cuda:0: every engine call failed the device check."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert parse_device("cuda") == torch.device("cuda", 1) == tb.normalize_device("cuda")
    assert parse_device("cuda:0") == torch.device("cuda", 0) and tb.normalize_device("cpu") == torch.device("cpu")
    assert isinstance(tb.on_device(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(tb.on_device(torch.device("cuda", 1)), torch.cuda.device)


# 9. the device engines load on ------------------------------------------------------------------

def test_engines_are_deserialized_inside_the_device_scope(torch_pipe, trt_engines, monkeypatch):
    @contextlib.contextmanager
    def scope(device):
        fake.CALLS.append(("enter device", device))
        yield
        fake.CALLS.append(("leave device", device))
    monkeypatch.setattr(tb, "on_device", scope)
    fake.CALLS.clear()
    _pipe(torch_pipe, trt_engines)
    names = [c[0] for c in fake.CALLS]
    enter, leave = names.index("enter device"), names.index("leave device")
    loads = [i for i, n in enumerate(names) if n in ("deserialize_cuda_engine", "create_execution_context")]
    assert len(loads) == 6 and all(enter < i < leave for i in loads)


# 2. alignment -----------------------------------------------------------------------------------

def test_misaligned_inputs_are_bound_through_an_aligned_copy(torch_pipe, trt_engines):
    """TensorRT refuses an address not aligned to 256 bytes (set_tensor_address returns False);
    the result used to be ignored and the address recorded as bound."""
    pipe = _pipe(torch_pipe, trt_engines)
    be, ref = pipe.backend, torch_pipe.backend
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, int(torch_pipe.components.text_encoder.config.hidden_size), generator=g)
    table = torch.zeros(3, 2 + 1)                   # a row view one float past an aligned start
    table[1, 1:] = torch.tensor([500.0, 500.0])
    t = table[1, 1:]
    assert t.data_ptr() % ALIGNMENT and t.is_contiguous()
    fake.CALLS.clear()
    out = be.unet(sample, t, ctx)
    bound = [c[1][2] for c in fake.CALLS if c[0] == "set_tensor_address"]
    assert bound and all(a % ALIGNMENT == 0 for a in bound)
    assert torch.allclose(out, ref.unet(sample, t.clone(), ctx), atol=1e-6)
    with pytest.raises(RuntimeError, match="aligned to 256"):
        be.engines["unet"]._address("sample", (2, 4, 8, 8), sample.data_ptr() + 4)


def test_the_static_loop_s_timestep_rows_are_aligned(torch_pipe, trt_engines):
    pipe = _pipe(torch_pipe, trt_engines)
    pipe.set_fast_path()
    pipe(seed=1, **ARGS)
    loop = pipe.loops.values()[0]
    assert all(loop.t[i, :4].data_ptr() % ALIGNMENT == 0 for i in range(loop.steps))


# 3. one graph per context state -----------------------------------------------------------------

def test_a_context_reshaped_after_capture_is_captured_again(torch_pipe, trt_engines):
    """A graph of enqueueV3 is tied to its context's shapes: an eager call at another size
    re-shapes the context, and replaying the old graph then is undefined (the fake raises)."""
    pipe = _pipe(torch_pipe, trt_engines)
    cuda = FakeCuda()
    pipe.set_fast_path(capture=True, cuda=cuda)
    first = pipe(seed=3, **ARGS)
    pipe(**dict(ARGS, sampler="Heun", width=96, seed=4))          # eager: re-shapes the UNet's context
    again = pipe(seed=5, **ARGS)
    assert len(cuda.graphs) == 2                                   # captured again, not replayed
    assert pipe(seed=6, **ARGS).images and cuda.events.count("replay") == 1   # then replayed
    want = torch_pipe(seed=5, **ARGS)
    assert np.abs(want.pixels - again.pixels).max() <= 1e-4 and first.seeds == [3, 4]


# 8. engines that cannot be captured ---------------------------------------------------------------

def test_an_engine_that_refuses_capture_falls_back_to_the_eager_loop_once(torch_pipe, trt_engines, caplog):
    pipe = _pipe(torch_pipe, trt_engines)
    cuda = FakeCuda()
    pipe.set_fast_path(capture=True, cuda=cuda)
    fake.CAPTURE_FORBIDDEN.add("vae_decoder")
    try:
        with caplog.at_level("WARNING"):
            got = [pipe(seed=s, **ARGS) for s in (7, 8)]
    finally:
        fake.CAPTURE_FORBIDDEN.clear()
    assert cuda.events.count("capture begin (thread_local)") == 1          # tried once
    assert len(pipe.loops.refused) == 1 and len(pipe.loops) == 0
    assert sum("eager loop" in r.getMessage() for r in caplog.records) == 1
    for s, g in zip((7, 8), got):
        assert np.abs(torch_pipe(seed=s, **ARGS).pixels - g.pixels).max() <= 1e-5


# 5. TensorRT 10.0 --------------------------------------------------------------------------------

def test_tensorrt_10_0_is_refused_with_what_it_lacks(torch_pipe, trt_engines):
    with pytest.raises(ValueError, match="needs 10.1 or newer.*device_memory_size_v2"):
        _pipe(torch_pipe, trt_engines, trt=fake.module("10.0.1.6"))
    with pytest.raises(ValueError, match="built with TensorRT 11.4"):      # 10.1 passes the version gate
        _pipe(torch_pipe, trt_engines, trt=fake.module("10.1.0.27"))


# 6. enum values ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unet_onnx(tmp_path_factory, torch_pipe):
    from sdrt.export.onnx_export import export_onnx
    path = tmp_path_factory.mktemp("onnx") / "unet.onnx"
    export_onnx(torch_pipe.components, "unet", path)
    c = torch_pipe.components
    dims = ModelDims(c.latent_factor, 4, int(c.text_encoder.config.hidden_size), 2)
    return path, profile_shapes("unet", fake.PROFILE, dims)


@pytest.mark.parametrize("version, flags", [("11.4.0.106", 1), ("10.13.0.35", 2)])
def test_the_strongly_typed_flag_follows_the_version_s_enum(unet_onnx, version, flags):
    """STRONGLY_TYPED is bit 1 in TensorRT 10 (bit 0: EXPLICIT_BATCH) and bit 0 in 11."""
    fake.CALLS.clear()
    build_engine(fake.module(version), unet_onnx[0], "unet", unet_onnx[1], BuildOptions(precision="fp32"))
    network = next(c[1][0] for c in fake.CALLS if c[0] == "build_serialized_network")
    assert network._flags == flags


# 7. a timing cache from another GPU ----------------------------------------------------------------

def test_a_timing_cache_from_another_gpu_is_replaced_not_fatal(unet_onnx, tmp_path, caplog):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"fake-timing-cache:another-gpu:+++")
    with caplog.at_level("WARNING"):
        plan = build_engine(fake.module(), unet_onnx[0], "unet", unet_onnx[1],
                            BuildOptions(precision="fp32", timing_cache=str(cache)))
    assert plan.startswith(b"fake-plan|")
    assert cache.read_bytes() == f"fake-timing-cache:{fake.DEVICE}:+".encode()      # a fresh cache, saved
    assert any("another GPU" in r.getMessage() for r in caplog.records)


# a progress callback that raises cancels the build and names why ----------------------------------

def test_a_failing_progress_callback_cancels_the_build_with_its_reason(unet_onnx):
    def progress(phase, step, steps):
        if step == 1:
            raise OSError("the progress file is full")
    with pytest.raises(RuntimeError, match="cancelled.*OSError: the progress file is full"):
        build_engine(fake.module(), unet_onnx[0], "unet", unet_onnx[1], BuildOptions(precision="fp32"),
                     on_progress=progress)
    assert ("build cancelled by the progress monitor", ()) not in fake.CALLS     # cancelled by returning False


# 4. streams ---------------------------------------------------------------------------------------

def test_engines_never_enqueue_on_the_legacy_default_stream(torch_pipe, trt_engines):
    """On the batcher's threads torch's current stream is the legacy default stream (handle 0):
    the text encoder and the loop get streams of their own, joined to it by events."""
    cuda = FakeCuda()
    fake.STREAMS.append(cuda)
    try:
        pipe = _pipe(torch_pipe, trt_engines, cuda=cuda)
        fake.CALLS.clear()
        got = pipe(seed=2, **ARGS)
    finally:
        fake.STREAMS.clear()
    assert not [c for c in fake.CALLS if c[0] == "legacy default stream"]
    handles = {c[1][0]: c[1][1] for c in fake.CALLS if c[0] == "execute_async_v3"}
    assert handles["unet"] == handles["vae_decoder"] != handles["text_encoder"] and 0 not in handles.values()
    assert len(cuda.streams) == 2 and cuda.events.count("side waits for current") == cuda.events.count(
        "current waits for side") > 0
    # the engine's own torch work (aligned copies of misaligned inputs) runs on its stream too
    enqueues = len([c for c in fake.CALLS if c[0] == "execute_async_v3"])
    assert cuda.events.count("enter side stream") == enqueues
    assert np.abs(torch_pipe(seed=2, **ARGS).pixels - got.pixels).max() <= 1e-5


def test_on_a_stream_of_its_own_the_engines_use_it(torch_pipe, trt_engines):
    class Capturing(FakeCuda):              # e.g. inside a CUDA-graph capture: not the default stream
        def current_stream(self, device=None):
            return self._current

    cuda = Capturing()
    cuda._current = cuda.Stream()
    pipe = _pipe(torch_pipe, trt_engines, cuda=cuda)
    fake.CALLS.clear()
    pipe(seed=2, **ARGS)
    assert {c[1][1] for c in fake.CALLS if c[0] == "execute_async_v3"} == {cuda._current.cuda_stream}
    assert len(cuda.streams) == 1 and not [e for e in cuda.events if "waits" in e]


# 10. float32 islands in float16 graphs -------------------------------------------------------------

def _casts(model, to: int) -> list:
    return [n for n in model.graph.node if n.op_type == "Cast" and any(a.name == "to" and a.i == to for a in n.attribute)]


@pytest.mark.parametrize("network", ["text_encoder", "unet", "vae_decoder"])
def test_float16_graphs_keep_only_the_float32_they_need(torch_pipe, tmp_path, network):
    """Strong typing honours every float32 node: the UNet and text encoder keep none but their
    float32 output; the VAE decoder keeps its normalisations, which used to be converted to
    float16 (the converter ignored the block list without shape inference)."""
    import onnx
    from onnx import TensorProto

    from sdrt.export.onnx_export import export_onnx, to_float16
    path = tmp_path / f"{network}.onnx"
    export_onnx(torch_pipe.components, network, path)
    to_float16(path, network)
    model = onnx.load(str(path), load_external_data=False)
    to_f32 = _casts(model, TensorProto.FLOAT)
    produced = {o: n for n in model.graph.node for o in n.output}
    norms = [n for n in model.graph.node if n.op_type == "InstanceNormalization"]
    fed_f32 = [n for n in norms if produced.get(n.input[0]) in to_f32]
    if network == "vae_decoder":
        assert norms and len(fed_f32) == len(norms)
    else:
        assert [n.output[0] for n in to_f32] == [o.name for o in model.graph.output] and not fed_f32
    assert all(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer if len(i.dims) > 1)


# engines from another board of the same architecture ----------------------------------------------

def test_engines_from_another_board_load_with_a_warning(torch_pipe, trt_engines, monkeypatch, caplog):
    import json

    from sdrt.export import tensorrt as export_trt
    manifest = json.loads((trt_engines / "manifest.json").read_text())
    assert "device" in manifest["target"]                      # recorded at build time
    monkeypatch.setattr(export_trt, "device_name", lambda: "NVIDIA H100 80GB HBM3")
    original = dict(manifest)
    manifest["target"] = dict(manifest["target"], device="NVIDIA H200")
    (trt_engines / "manifest.json").write_text(json.dumps(manifest))
    try:
        with caplog.at_level("WARNING"):
            pipe = _pipe(torch_pipe, trt_engines)
    finally:
        (trt_engines / "manifest.json").write_text(json.dumps(original))
    assert pipe.backend is not None
    assert any("built on a NVIDIA H200, this GPU is a NVIDIA H100" in r.getMessage() for r in caplog.records)
