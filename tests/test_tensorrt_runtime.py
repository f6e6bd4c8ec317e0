"""The TensorRT runtime backend against the fake TensorRT API (tests/tensorrt_fake.py), on a CPU:
the fake engines read and write the memory the backend binds by address and compute with the
torch modules, so the images must equal the torch backend's. Checked too: one shared scratch
buffer, user-managed contexts, addresses and shapes bound once, output buffers once per shape,
refusal of engines built for another GPU or TensorRT version. Nothing here runs real TensorRT."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tensorrt_fake as fake
import torch

import sdrt
from sdrt.backends import create_backend
from sdrt.backends.tensorrt_backend import TensorRTBackend

pytestmark = [pytest.mark.slow]

PROFILE = fake.PROFILE


def _backend(components, engine_dir, **kw):
    return TensorRTBackend(components, torch.device("cpu"), torch.float32, engine_dir, trt=kw.pop("trt", fake.module()),
                           arch=kw.pop("arch", "sm_90"), log=kw.pop("log", lambda m: None), **kw)


@pytest.fixture(scope="module")
def trt_pipe(torch_pipe, trt_engines):
    fake.CALLS.clear()
    return sdrt.Pipeline(torch_pipe.components, _backend(torch_pipe.components, trt_engines))


@pytest.mark.parametrize("kw", [
    dict(sampler="Euler a", prompt="a [cat:dog:0.5] photo"),
    dict(sampler="DPM++ 2M", schedule="Karras", batch_size=2, clip_skip=2),
    dict(sampler="Heun", prompt="a photo of " + "a very long prompt " * 20),     # two text windows
])
def test_images_equal_the_torch_backend(torch_pipe, trt_pipe, kw):
    args = dict(prompt="a cat", steps=5, width=64, height=64, seed=9)
    args.update(kw)
    want, got = torch_pipe(**args), trt_pipe(**args)
    assert np.abs(want.pixels - got.pixels).max() <= 1e-5
    assert want.infotexts == got.infotexts


def test_contexts_share_one_scratch_buffer(trt_pipe):
    scratch = {c[1][0]: c[1][1:] for c in fake.CALLS if c[0] == "set_device_memory"}
    assert sorted(scratch) == ["text_encoder", "unet", "vae_decoder"]
    be = trt_pipe.backend
    loop_size = max(fake.SCRATCH["unet"], fake.SCRATCH["vae_decoder"])            # sized for the larger
    assert scratch["unet"] == scratch["vae_decoder"] == (be.scratch.data_ptr(), loop_size)
    # the text encoder may run on another thread while the loop runs: its own buffer
    assert scratch["text_encoder"] == (be.text_scratch.data_ptr(), fake.SCRATCH["text_encoder"])
    assert be.text_scratch.data_ptr() != be.scratch.data_ptr()
    created = [c for c in fake.CALLS if c[0] == "create_execution_context"]
    assert len(created) == 3 and {c[1][1] for c in created} == {"USER_MANAGED"}
    assert len([c for c in fake.CALLS if c[0] == "deserialize_cuda_engine"]) == 3


def test_loop_binds_addresses_and_shapes_once(trt_pipe):
    trt_pipe(prompt="warm", steps=2, width=64, height=64, seed=1, sampler="Euler")
    buffers = dict(trt_pipe.backend.engines["unet"]._out)
    fake.CALLS.clear()
    trt_pipe(prompt="a cat", steps=6, width=64, height=64, seed=1, sampler="Euler")
    unet = [c for c in fake.CALLS if c[1][0] == "unet"]
    assert len([c for c in unet if c[0] == "execute_async_v3"]) == 6
    assert not [c for c in unet if c[0] == "set_input_shape"]                 # same shapes as before
    # the denoiser's persistent buffers: each input's address is given at most once per generation
    by_name = {}
    for c in unet:
        if c[0] == "set_tensor_address":
            by_name.setdefault(c[1][1], []).append(c[1][2])
    assert all(len(v) <= 1 for v in by_name.values()), by_name
    out = trt_pipe.backend.engines["unet"]._out
    assert out.keys() == buffers.keys() and all(out[k] is buffers[k] for k in out)   # once per shape


def test_static_loop_runs_on_the_engines(trt_pipe, torch_pipe):
    args = dict(prompt="a [cat:dog:0.5]", steps=5, width=64, height=64, seed=2, sampler="Euler a", batch_size=2)
    want = torch_pipe(**args)
    trt_pipe.set_fast_path()
    try:
        got = trt_pipe(**args)
        assert len(trt_pipe.loops) == 1
    finally:
        trt_pipe.set_fast_path(False)
    assert np.abs(want.pixels - got.pixels).max() <= 1e-4


def test_request_outside_the_profile_is_refused(trt_pipe):
    with pytest.raises(ValueError, match="outside the engine's profile"):
        trt_pipe(prompt="a cat", steps=2, width=128, height=64, seed=1)
    with pytest.raises(ValueError, match="text windows"):
        trt_pipe(prompt="word " * 200, steps=2, width=64, height=64, seed=1)


def test_engines_for_another_gpu_or_version_are_refused(torch_pipe, trt_engines):
    with pytest.raises(ValueError, match=r"built for sm_90, this GPU is sm_89.*sdrt build"):
        _backend(torch_pipe.components, trt_engines, arch="sm_89")
    with pytest.raises(ValueError, match=r"TensorRT 11\.4\.0\.106, this is TensorRT 10\.13"):
        _backend(torch_pipe.components, trt_engines, trt=fake.module(version="10.13.0.35"))


def test_damaged_engine_is_rebuilt_and_undeserializable_one_refused(torch_pipe, trt_engines, tmp_path):
    import shutil
    d = tmp_path / "copy"
    shutil.copytree(trt_engines, d)
    (d / "unet.plan").write_bytes(b"fake-plan|trunc")
    logs = []
    be = _backend(torch_pipe.components, d, log=logs.append)
    assert any("building TensorRT engines for unet" in m for m in logs)
    assert be.engines["unet"].engine is not None
    # a plan whose hash matches the manifest but that TensorRT cannot deserialize
    (d / "vae_decoder.plan").write_bytes(b"not a plan")
    manifest = json.loads((d / "manifest.json").read_text())
    from sdrt.export.build import file_digest
    entry = manifest["networks"]["vae_decoder"]
    entry["files"][0].update(size=10, sha256=file_digest(d / "vae_decoder.plan"))
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="could not deserialize"):
        _backend(torch_pipe.components, d)


def test_tensorrt_backend_needs_cuda_and_the_package(torch_pipe):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        create_backend("tensorrt", torch_pipe.components, "cpu", "float32")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        sdrt.Pipeline.from_pretrained("random:tiny", backend="tensorrt")


def test_sdrt_info_lists_a_tensorrt_folder(trt_engines, capsys):
    from sdrt.cli import main
    assert main(["info", str(trt_engines)]) == 0
    out = capsys.readouterr().out
    assert "backend tensorrt" in out
    for name in ("text_encoder", "unet", "vae_decoder"):
        assert f"{name}: ok; sm_90, TensorRT 11.4.0.106, trt-fp32-O3" in out


def test_static_loop_captures_and_replays_the_engines(trt_pipe, torch_pipe):
    """With a fake CUDA-graph API (tests/cuda_graph_fake.py): every engine runs once before the
    capture (TensorRT's first enqueue after a shape change may allocate), no shape is set while
    capturing, and replays enqueue nothing from the host yet give the torch backend's images for
    new seeds and prompts."""
    from cuda_graph_fake import FakeCuda
    cuda = FakeCuda(mirror=fake.CALLS)
    trt_pipe.set_fast_path(capture=True, cuda=cuda)
    fake.CALLS.clear()
    runs = [dict(prompt="a [cat:dog:0.5]", seed=2), dict(prompt="a [red:blue:0.5] cube", seed=5, cfg_scale=3.0),
            dict(prompt="a [cat:dog:0.5]", seed=9)]
    try:
        got = [trt_pipe(steps=4, width=64, height=64, sampler="Euler a", batch_size=2, **r) for r in runs]
    finally:
        trt_pipe.set_fast_path(False)
    calls = fake.CALLS
    begin, end = calls.index(("cuda", "capture begin (thread_local)")), calls.index(("cuda", "capture end"))
    unet_runs = [i for i, c in enumerate(calls) if c[0] == "execute_async_v3" and c[1][0] == "unet"]
    assert unet_runs[0] < begin and len([i for i in unet_runs if begin < i < end]) == 4
    assert not [c for c in calls[begin:end] if c[0] == "set_input_shape"]
    after = [c[1][0] for i, c in enumerate(calls) if i > end and c[0] == "execute_async_v3"]
    assert after == ["text_encoder"] * 2        # the next prompts' text; UNet and VAE only replay
    assert [c[1] for c in calls if c[0] == "cuda" and c[1] == "replay"] == ["replay", "replay"]
    for r, g in zip(runs, got):
        want = torch_pipe(steps=4, width=64, height=64, sampler="Euler a", batch_size=2, **r)
        assert np.abs(want.pixels - g.pixels).max() <= 1e-4
