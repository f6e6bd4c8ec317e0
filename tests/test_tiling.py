"""Tiling (the web UI's circular padding): the UNet becomes shift-equivariant with wrap-around,
images carry "Tiling: True", both loops agree, and the compiled backends refuse it by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sdrt
from sdrt.params import GenerationParams

ARGS = dict(prompt="a brick wall", steps=4, seed=2, width=64, height=64, sampler="Euler")


def test_circular_padding_makes_the_unet_wrap_around(torch_pipe):
    be = torch_pipe.backend
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 8, 8), generator=g)
    t = torch.full((2,), 500.0)
    ctx = torch.randn((2, 77, 32), generator=g)

    def shifted_gap():
        a = be.unet(torch.roll(x, 2, dims=3), t, ctx)
        b = torch.roll(be.unet(x, t, ctx), 2, dims=3)
        return (a - b).abs().max().item()
    try:
        assert be.set_tiling(True) and not be.set_tiling(True)
        tiled = shifted_gap()
    finally:
        be.set_tiling(False)
    assert tiled < 1e-4 < shifted_gap()          # wraps around with tiling, not without


def test_tiling_in_both_loops_and_the_infotext(torch_pipe):
    plain = torch_pipe(**ARGS)
    torch_pipe.set_fast_path(False)
    tiled = torch_pipe(tiling=True, **ARGS)
    try:
        torch_pipe.set_fast_path()
        fast = torch_pipe(tiling=True, **ARGS)
        fast_plain = torch_pipe(**ARGS)
        assert len(torch_pipe.loops) == 2                   # one graph per padding mode
    finally:
        torch_pipe.set_fast_path(False)
    assert "Tiling: True" in tiled.infotexts[0] and "Tiling" not in plain.infotexts[0]
    assert np.abs(tiled.pixels - fast.pixels).max() < 1e-4 and np.abs(plain.pixels - fast_plain.pixels).max() < 1e-4
    assert np.abs(tiled.pixels - plain.pixels).max() > 1e-3
    assert all(m.padding_mode == "zeros" for m in torch_pipe.components.unet.modules()
               if isinstance(m, torch.nn.Conv2d))           # the next job without tiling put it back


def test_tensorrt_folders_built_with_and_without_circular_padding(torch_pipe, trt_engines, tmp_path):
    """`sdrt build --backend tensorrt --tiling` (fake TensorRT): the UNet and VAE are exported with
    the wrap-around padding in the graph, the folder records it (manifest, artifact keys) and
    accepts only tiling requests; a plain folder refuses tiling by name. (The fake's engines compute
    with the torch modules, so what the real engines compute from the graph is not checked here:
    ONNX Runtime's is, against torch, in the test above.)"""
    import tensorrt_fake as fake

    from sdrt.backends import tensorrt_backend as tb
    from sdrt.export import read_manifest
    from sdrt.export.tensorrt import BuildOptions, build_tensorrt
    backend = tb.TensorRTBackend(torch_pipe.components, torch.device("cpu"), torch.float32, trt_engines,
                                 trt=fake.module(), arch="sm_90", log=lambda m: None)
    pipe = sdrt.Pipeline(torch_pipe.components, backend)
    with pytest.raises(ValueError, match="built without circular padding"):
        pipe.validate(GenerationParams(tiling=True, **ARGS))
    tiled = tmp_path / "tiled"
    build_tensorrt(torch_pipe.components, tiled, profile=fake.PROFILE,
                   options=BuildOptions(precision="fp32", tiling=True), trt=fake.module(), arch="sm_90",
                   log=lambda m: None)
    manifest = read_manifest(tiled)
    assert manifest["tiling"] is True
    assert "-circular-padding" in manifest["networks"]["unet"]["key"]["optimization"]
    assert "-circular-padding" not in manifest["networks"]["text_encoder"]["key"]["optimization"]
    onnx = __import__("onnx").load(str(tiled / "onnx" / "unet.onnx"), load_external_data=False)
    plain = __import__("onnx").load(str(trt_engines / "onnx" / "unet.onnx"), load_external_data=False)
    ops = lambda m: sorted(n.op_type for n in m.graph.node)       # noqa: E731
    assert ops(onnx) != ops(plain)                                # the wrap-around padding is in the graph
    tiled_backend = tb.TensorRTBackend(torch_pipe.components, torch.device("cpu"), torch.float32, tiled,
                                       trt=fake.module(), arch="sm_90", log=lambda m: None)
    tiled_pipe = sdrt.Pipeline(torch_pipe.components, tiled_backend)
    tiled_pipe.validate(GenerationParams(tiling=True, **ARGS))
    with pytest.raises(ValueError, match="built with circular padding"):
        tiled_pipe.validate(GenerationParams(**ARGS))


@pytest.mark.slow
def test_onnxruntime_folder_built_with_circular_padding(torch_pipe, tmp_path):
    """`sdrt build --tiling`: the exported UNet and VAE pad circularly (the same images as the
    torch backend's tiling); such a folder refuses images without tiling, and the others refuse
    tiling, by name."""
    from sdrt.cli import main
    from sdrt.export import read_manifest
    assert main(["build", "random:tiny", "--out", str(tmp_path / "tiled"), "--tiling", "--min", "1x64x64",
                 "--opt", "1x64x64", "--max", "1x64x64", "--max-windows", "1"]) == 0
    assert read_manifest(tmp_path / "tiled")["tiling"] is True
    ort = sdrt.Pipeline.from_pretrained("random:tiny", backend="onnxruntime", engine_dir=str(tmp_path / "tiled"))
    want = torch_pipe(tiling=True, **ARGS).pixels
    assert np.abs(ort(tiling=True, **ARGS).pixels - want).max() < 1e-3
    img2img = dict(ARGS, tiling=True, init_images=torch_pipe(**ARGS).images[0], denoising_strength=0.5)
    assert np.abs(ort(**img2img).pixels - torch_pipe(**img2img).pixels).max() < 1e-3     # the encoder too
    with pytest.raises(ValueError, match="built with circular padding"):
        ort.validate(GenerationParams(**ARGS))

