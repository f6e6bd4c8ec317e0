"""The TensorRT engine builder against a faithful fake of the TensorRT API (tests/tensorrt_fake.py):
profiles from the export specs, precision flags, timing cache, progress, manifest and target
decisions. Nothing here runs real TensorRT (it cannot be installed on these machines)."""
import json
import subprocess
import sys

import pytest
import tensorrt_fake as fake

from sdrt.export.specs import ModelDims, Profile, profile_shapes
from sdrt.export.tensorrt import (
    BuildOptions,
    Precision,
    build_engine,
    build_tensorrt,
    check_arch,
    check_engine_target,
    is_static,
    require_tensorrt,
)

pytestmark = [pytest.mark.slow]

DIMS = ModelDims(latent_factor=8, latent_channels=4, hidden=768, layers=12)


def test_profile_shapes_follow_the_export_specs():
    p = Profile(batch=(1, 2, 4), height=(256, 512, 768), width=(256, 512, 1024), windows=(1, 1, 3))
    unet = profile_shapes("unet", p, DIMS)
    assert unet["sample"] == ((2, 4, 32, 32), (4, 4, 64, 64), (8, 4, 96, 128))        # 2 rows per image (CFG)
    assert unet["timestep"] == ((2,), (4,), (8,))
    assert unet["encoder_hidden_states"] == ((2, 77, 768), (4, 77, 768), (8, 231, 768))
    text = profile_shapes("text_encoder", p, DIMS)
    assert text["input_ids"] == ((1, 77), (4, 77), (24, 77))                            # windows of 2 texts/image
    vae = profile_shapes("vae_decoder", p, DIMS)
    assert vae["latent"] == ((1, 4, 32, 32), (2, 4, 64, 64), (4, 4, 96, 128))
    assert not is_static(unet)
    one = Profile(batch=(1, 1, 1), height=(512, 512, 512), width=(512, 512, 512), windows=(1, 1, 1))
    assert is_static(profile_shapes("unet", one, DIMS))
    with pytest.raises(ValueError, match="unknown"):
        profile_shapes("refiner", p, DIMS)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, tiny):
    from sdrt.export.onnx_export import export_onnx
    d = tmp_path_factory.mktemp("onnx")
    return {n: export_onnx(tiny.components, n, d / f"{n}.onnx") for n in ("unet", "vae_decoder")}


@pytest.mark.parametrize("precision, weak, flag", [("fp32", False, None), ("fp16", False, None), ("bf16", True, "BF16")])
def test_build_engine_sets_profile_precision_and_cache(tiny_onnx, tiny, tmp_path, precision, weak, flag):
    trt = fake.module(weak=weak)
    p = Profile(batch=(1, 1, 2), height=(64, 64, 128), width=(64, 64, 128), windows=(1, 1, 2))
    dims = ModelDims(tiny.components.latent_factor, 4, int(tiny.components.text_encoder.config.hidden_size), 2)
    shapes = profile_shapes("unet", p, dims)
    cache = tmp_path / "timing.cache"
    progress = []
    fake.CALLS.clear()
    opts = BuildOptions(precision=precision, optimization_level=5, workspace_bytes=1 << 30, refit=True,
                        timing_cache=str(cache))
    plan = build_engine(trt, tiny_onnx["unet"], "unet", shapes, opts, on_progress=lambda *a: progress.append(a))
    build = [c for c in fake.CALLS if c[0] == "build_serialized_network"][0]
    network, config = build[1]
    assert config.profiles[0].shapes == shapes
    assert config.pools == {"WORKSPACE": 1 << 30} and config.builder_optimization_level == 5
    assert config.flags == ({flag} if flag else set()) | {"REFIT"}
    # fp32/fp16: a strongly typed network (the graph's types decide); bf16: TensorRT 10's weak typing
    assert network._flags == (0 if weak else 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert plan.startswith(b"fake-plan|")
    assert cache.read_bytes() == f"fake-timing-cache:{fake.DEVICE}:+".encode()
    assert progress[0] == ("Building engine", 0, 2) and progress[-1] == ("Building engine", 2, 2)
    # the second build starts from the saved cache and extends it
    build_engine(trt, tiny_onnx["unet"], "unet", shapes, opts)
    assert cache.read_bytes() == f"fake-timing-cache:{fake.DEVICE}:++".encode()


def test_build_engine_errors_are_clear(tiny_onnx, tmp_path):
    trt = fake.module()
    shapes = profile_shapes("vae_decoder", Profile(), DIMS)
    with pytest.raises(RuntimeError, match="could not parse .*missing.onnx.*not found"):
        build_engine(trt, tmp_path / "missing.onnx", "vae_decoder", shapes, BuildOptions())
    with pytest.raises(ValueError, match="ONNX inputs .* differ"):
        build_engine(trt, tiny_onnx["vae_decoder"], "unet", profile_shapes("unet", Profile(), DIMS), BuildOptions())


def test_build_options_are_typed_and_checked():
    assert BuildOptions(precision="bf16").precision is Precision.BF16
    with pytest.raises(ValueError):
        BuildOptions(precision="int3")
    with pytest.raises(ValueError, match="optimization_level"):
        BuildOptions(optimization_level=9)
    with pytest.raises(ValueError, match="workspace"):
        BuildOptions(workspace_bytes=10)


def test_targets_and_engine_compatibility():
    assert check_arch("native", "sm_89") == "sm_89" and check_arch("sm_89", "sm_89") == "sm_89"
    with pytest.raises(ValueError, match="this machine's GPU is sm_80.*sm_90"):
        check_arch("sm_90", "sm_80")
    with pytest.raises(ValueError, match="unknown"):
        check_arch("sm_1", "sm_80")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        check_arch("native", None)
    rec = {"arch": "sm_86", "tensorrt": "11.4.0.106"}
    assert check_engine_target(rec, "sm_86", "11.4.0.106", "engines/x") is None
    assert "built for sm_86, this GPU is sm_90" in check_engine_target(rec, "sm_90", "11.4.0.106", "engines/x")
    msg = check_engine_target(rec, "sm_86", "10.13.0", "engines/x")
    assert "TensorRT 11.4.0.106" in msg and "--backend tensorrt --out engines/x --target native" in msg


def test_build_tensorrt_writes_a_manifest_and_keeps_up_to_date_engines(tiny, tmp_path):
    trt = fake.module()
    logs = []
    p = Profile(batch=(1, 1, 2), height=(64, 64, 128), width=(64, 64, 128), windows=(1, 1, 2))
    m = build_tensorrt(tiny.components, tmp_path, profile=p, networks=("vae_decoder",), trt=trt, arch="sm_89",
                       log=logs.append)
    entry = m["networks"]["vae_decoder"]
    assert m["target"] == {"arch": "sm_89", "tensorrt": "11.4.0.106", "device": None} and entry["static"] is False
    assert (tmp_path / "vae_decoder.plan").is_file() and (tmp_path / "onnx" / "vae_decoder.onnx").is_file()
    assert json.loads((tmp_path / "manifest.json").read_text())["networks"]["vae_decoder"]["key"]["target"] == \
        "sm_89/trt-11.4.0.106"
    build_tensorrt(tiny.components, tmp_path, profile=p, networks=("vae_decoder",), trt=trt, arch="sm_89",
                   log=logs.append)
    assert logs[-1] == "vae_decoder: up to date"
    # another TensorRT version: the key differs, the engine is rebuilt, never reused
    build_tensorrt(tiny.components, tmp_path, profile=p, networks=("vae_decoder",), trt=fake.module("10.13.0"),
                   arch="sm_89", log=logs.append)
    assert any("rebuilding: the manifest does not match the request (target differ)" in m_ for m_ in logs)
    (tmp_path / "vae_decoder.plan").write_bytes(b"trunc")
    build_tensorrt(tiny.components, tmp_path, profile=p, networks=("vae_decoder",), trt=fake.module("10.13.0"),
                   arch="sm_89", log=logs.append)
    assert any("truncated" in m_ for m_ in logs)


def test_without_tensorrt_the_build_names_the_package_and_the_install_command(monkeypatch):
    import importlib.util
    if importlib.util.find_spec("tensorrt") is None:       # the CLI on this machine, before any weights load
        out = subprocess.run([sys.executable, "-m", "sdrt.cli", "build", "random:tiny", "--backend", "tensorrt",
                              "--out", "unused"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "pip install tensorrt" in out.stderr and "Traceback" not in out.stderr
        assert "loading" not in out.stdout
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(RuntimeError, match=r"TensorRT is not installed \(Python package 'tensorrt'\): pip install"):
        require_tensorrt()


def test_fp16_engines_come_from_a_float16_graph_and_bf16_needs_tensorrt_10(tiny, tmp_path):
    """TensorRT 11 has no precision flags: the fp16 build parses a float16 graph (float32 I/O)
    as a strongly typed network; bf16 is refused before any export, naming why and what to do."""
    import onnx
    p = Profile(batch=(1, 1, 1), height=(64, 64, 64), width=(64, 64, 64), windows=(1, 1, 1))
    fake.CALLS.clear()
    build_tensorrt(tiny.components, tmp_path / "fp16", profile=p, options=BuildOptions(precision="fp16"),
                   networks=("unet",), trt=fake.module(), arch="sm_90", log=lambda m: None)
    network = [c for c in fake.CALLS if c[0] == "build_serialized_network"][0][1][0]
    assert network._weight_types == {"float16"}
    assert network._flags == 1 << fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    graph = onnx.load(str(tmp_path / "fp16" / "onnx" / "unet.onnx"), load_external_data=False).graph
    assert {i.type.tensor_type.elem_type for i in graph.input} == {onnx.TensorProto.FLOAT}     # float32 I/O
    fake.CALLS.clear()
    with pytest.raises(ValueError, match="bf16 engines need a bfloat16 ONNX graph on TensorRT 11.4"):
        build_tensorrt(tiny.components, tmp_path / "bf16", profile=p, options=BuildOptions(precision="bf16"),
                       networks=("unet",), trt=fake.module(), arch="sm_90", log=lambda m: None)
    assert not (tmp_path / "bf16" / "onnx").exists() and not fake.CALLS       # refused before exporting
