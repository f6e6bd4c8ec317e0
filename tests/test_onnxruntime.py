"""The ONNX Runtime backend and the exporters on random:tiny: per-network and end-to-end
parity with the torch backend, profiles, and the artifact cache."""
import json

import numpy as np
import pytest
import torch

import sdrt
from sdrt.export import Profile, build_onnxruntime, read_manifest

pytestmark = [pytest.mark.slow]

PROFILE = Profile(batch=(1, 1, 3), height=(32, 64, 128), width=(32, 64, 128), windows=(1, 1, 3))


@pytest.fixture(scope="session")
def ort_dir(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("engines")
    build_onnxruntime(tiny.components, d, profile=PROFILE, log=lambda m: None)
    return d


@pytest.fixture(scope="session")
def ort_pipe(ort_dir):
    return sdrt.Pipeline.from_pretrained("random:tiny", backend="onnxruntime", engine_dir=str(ort_dir))


def test_text_encoder_matches_torch(tiny, ort_pipe):
    g = torch.Generator().manual_seed(1)
    for n in (1, 3):
        ids = torch.randint(0, 49407, (2, 77 * n), generator=g)
        for skip in (1, 2, 4):
            ref = tiny.backend.encode_text(ids, skip)
            got = ort_pipe.backend.encode_text(ids, skip)
            assert (got - ref).abs().max().item() < 1e-4, (n, skip)


@pytest.mark.parametrize("rows,h,w,windows", [(2, 8, 8, 1), (4, 4, 16, 2), (6, 16, 12, 3), (2, 6, 10, 1)])
def test_unet_matches_torch(tiny, ort_pipe, rows, h, w, windows):
    g = torch.Generator().manual_seed(rows * h + w)
    x = torch.randn(rows, 4, h, w, generator=g)
    t = torch.rand(rows, generator=g) * 999
    ctx = torch.randn(rows, 77 * windows, 32, generator=g)
    ref = tiny.backend.unet(x, t, ctx)
    got = ort_pipe.backend.unet(x, t, ctx)
    assert (got - ref).abs().max().item() < 1e-4


def test_unet_output_buffer_is_reused(ort_pipe):
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.full((2,), 500.0), torch.randn(2, 77, 32)
    a = ort_pipe.backend.unet(x, t, ctx)
    ptr = a.data_ptr()
    b = ort_pipe.backend.unet(x * 2, t, ctx)
    assert b.data_ptr() == ptr                    # bound once per shape, reused every step
    c = ort_pipe.backend.unet(torch.randn(2, 4, 8, 12), t, ctx)
    assert c.shape == (2, 4, 8, 12)


@pytest.mark.parametrize("latent", [(1, 4, 8, 8), (2, 4, 4, 12)])
def test_vae_decoder_matches_torch(tiny, ort_pipe, latent):
    z = torch.randn(*latent, generator=torch.Generator().manual_seed(3))
    assert (ort_pipe.backend.decode(z) - tiny.backend.decode(z)).abs().max().item() < 1e-4


LONG = ", ".join(f"word{i}" for i in range(30))   # > 75 tokens, then a BREAK: 3 windows
LONG = LONG + ", a [castle:fortress:0.5] BREAK (dramatic sky:1.3)"


@pytest.mark.parametrize("sampler,prompt", [("Euler a", "a cat"), ("DPM++ 2M Karras", "a [cat:dog:0.5] on a sofa"),
                                            ("Heun", LONG), ("DDIM", "[red|blue] car"), ("DPM++ SDE", LONG)],
                         ids=["euler-a", "dpm2m-editing", "heun-long", "ddim-alternation", "sde-long"])
def test_images_match_the_torch_backend(tiny, ort_pipe, sampler, prompt):
    if prompt == LONG:
        from sdrt.conditioning import tokenize_weighted
        assert len(tokenize_weighted(tiny.components.tokenizer, prompt)) == 3
    kw = dict(negative_prompt="blurry", steps=6, seed=9, width=64, height=48, sampler=sampler, clip_skip=2,
              batch_size=2)
    a = ort_pipe(prompt, **kw)
    b = tiny(prompt, **kw)
    assert np.abs(a.pixels - b.pixels).max() <= 1e-3


def test_request_outside_the_profile(ort_pipe):
    with pytest.raises(ValueError) as e:
        ort_pipe("x", width=256, height=64, steps=1)
    assert "256" in str(e.value) and "32..128" in str(e.value)
    with pytest.raises(ValueError, match="multiples of 16"):
        ort_pipe("x", width=72, height=64, steps=1)
    with pytest.raises(ValueError, match="batch 4"):
        ort_pipe("x", width=64, height=64, steps=1, batch_size=4)
    with pytest.raises(ValueError, match="4 text windows"):
        ort_pipe(" ".join(["cat"] * 240), width=64, height=64, steps=1)


def test_cache_reuses_rebuilds_and_detects_damage(tiny, tmp_path):
    d = tmp_path / "e"
    logs = []
    build_onnxruntime(tiny.components, d, profile=PROFILE, log=logs.append, networks=("unet",))
    mtime = (d / "unet.onnx.data").stat().st_mtime_ns
    logs.clear()
    build_onnxruntime(tiny.components, d, log=logs.append, networks=("unet",))
    assert logs == ["unet: up to date"] and (d / "unet.onnx.data").stat().st_mtime_ns == mtime

    # a manifest that does not match the request: rebuilt, never used
    m = json.loads((d / "manifest.json").read_text())
    m["networks"]["unet"]["key"]["model_hash"] = "0000000000"
    m["networks"]["unet"]["key_digest"] = "stale"
    (d / "manifest.json").write_text(json.dumps(m))
    logs.clear()
    build_onnxruntime(tiny.components, d, log=logs.append, networks=("unet",))
    assert "does not match the request (model_hash differ)" in logs[0]

    # a truncated graph
    data = d / "unet.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    logs.clear()
    build_onnxruntime(tiny.components, d, log=logs.append, networks=("unet",))
    assert "truncated" in logs[0]

    # a corrupted byte
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    logs.clear()
    build_onnxruntime(tiny.components, d, log=logs.append, networks=("unet",))
    assert "corrupted" in logs[0]

    # a damaged manifest
    (d / "manifest.json").write_text("{not json")
    logs.clear()
    build_onnxruntime(tiny.components, d, log=logs.append, networks=("unet",))
    assert "damaged" in logs[0] and read_manifest(d)["networks"]["unet"]["key"]["model_hash"] == tiny.components.model_hash


def test_manifest_records_what_made_it(ort_dir, tiny):
    m = read_manifest(ort_dir)
    e = m["networks"]["unet"]
    assert e["key"]["model_hash"] == tiny.components.model_hash
    assert e["key"]["opset"] >= 17 and e["key"]["precision"] == "float32"
    assert {"torch", "onnx", "onnxruntime"} <= set(e["key"]["versions"])
    assert Profile.from_json(e["profile"]) == PROFILE
    assert "sample" in e["key"]["spec"] and "encoder_hidden_states" in e["key"]["spec"]


def test_float16_graphs(tiny, tmp_path):
    import onnx
    build_onnxruntime(tiny.components, tmp_path, precision="float16", log=lambda m: None,
                      networks=("unet", "vae_decoder"))
    unet = onnx.load(str(tmp_path / "unet.onnx"), load_external_data=True)
    types = {init.data_type for init in unet.graph.initializer if len(init.dims) > 1}
    assert types == {onnx.TensorProto.FLOAT16}
    assert unet.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT    # float32 I/O kept
    m = read_manifest(tmp_path)
    assert m["networks"]["unet"]["key"]["precision"] == "float16"
    with pytest.raises(ValueError, match="float16"):
        sdrt.Pipeline.from_pretrained("random:tiny", backend="onnxruntime", dtype="float16", engine_dir=str(tmp_path))


def test_build_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="precision"):
        build_onnxruntime(tiny.components, tmp_path, precision="int4")
    with pytest.raises(ValueError, match="unknown"):
        build_onnxruntime(tiny.components, tmp_path, networks=("clip",))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Profile(batch=(2, 1, 4))
    with pytest.raises(ValueError, match="BxHxW"):
        Profile.parse("1x64", None, None)


def test_cli_build_info_generate(tmp_path, capsys):
    from sdrt.cli import main
    d = tmp_path / "eng"
    assert main(["build", "random:tiny", "--out", str(d), "--max", "1x96x96"]) == 0
    out = capsys.readouterr().out
    assert "unet" in out and "export" in out and "size MiB" in out
    assert main(["info", str(d)]) == 0
    out = capsys.readouterr().out
    assert "unet: ok" in out and "32..96" in out
    png = tmp_path / "o.png"
    assert main(["generate", "a cat", "--backend", "onnxruntime", "--engine-dir", str(d), "-o", str(png),
                 "--steps", "3", "-q"]) == 0 and png.is_file()
    assert main(["info", str(tmp_path / "nothing")]) == 2


def test_cuda_target_applies_the_diffusion_fusions(tiny, tmp_path):
    """Built for CUDA, the graphs carry ONNX Runtime's SD fusions (CUDA kernels: not run here);
    the manifest records them, and a CPU request never uses those artifacts."""
    import onnx
    logs = []
    build_onnxruntime(tiny.components, tmp_path, target="cuda", log=logs.append, networks=("unet",))
    entry = read_manifest(tmp_path)["networks"]["unet"]
    assert entry["key"]["target"] == "cuda" and "diffusion-fusions" in entry["key"]["optimization"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "unet.onnx"), load_external_data=False).graph.node}
    assert entry["fused_operators"].get("GroupNorm", 0) > 0 and "GroupNorm" in ops
    # the attention fusion too (it needs the exported graph, before ONNX Runtime's own fusions,
    # and sdrt's fix for NumPy 2.5 on PyTorch 2 graphs)
    assert entry["fused_operators"].get("MultiHeadAttention", 0) > 0 and "MultiHeadAttention" in ops
    logs.clear()
    build_onnxruntime(tiny.components, tmp_path, target="cpu", log=logs.append, networks=("unet",))
    assert "target differ" in logs[0] or "optimization" in logs[0]
    with pytest.raises(ValueError, match="target"):
        build_onnxruntime(tiny.components, tmp_path, target="tpu")


def test_static_loop_on_the_onnxruntime_backend(ort_pipe, tiny):
    """The static loop binds the same buffers every step, so the ONNX Runtime backend's reused
    output buffer and IOBinding work under it; images equal the torch backend's eager ones."""
    args = dict(prompt="a [cat:dog:0.5]", steps=5, width=64, height=64, seed=3, sampler="DPM++ 2M", batch_size=2)
    want = tiny(**args)
    p = sdrt.Pipeline(ort_pipe.components, ort_pipe.backend)
    p.set_fast_path()
    got = p(**args)
    assert len(p.loops) == 1 and not p.loops.values()[0].capture
    assert np.abs(want.pixels - got.pixels).max() <= 1e-3
