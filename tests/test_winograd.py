"""The Winograd rewrite of 3x3 convolutions (export/winograd.py): each rewritten graph against
ONNX Runtime's direct convolution on fresh random inputs (odd sizes, with and without bias,
both tile sizes), what it must leave alone, the size probe, and the whole tiny UNet and VAE
built with every convolution rewritten against the torch modules."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sdrt.export import Profile, build_onnxruntime, read_manifest, winograd

pytestmark = [pytest.mark.slow]


def conv_model(c, k, bias=True, stride=1, pads=(1, 1, 1, 1), group=1, kernel=3, dilation=1, seed=0, second=False):
    """x [N, C, H, W] -> Conv (-> a second 3x3 Conv C->C when ``second``) -> y, all dims dynamic."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, c // group, kernel, kernel)) / np.sqrt(kernel * kernel * c)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "b"))
        inputs.append("b")
    out = "h" if second else "y"
    nodes = [helper.make_node("Conv", inputs, [out], name="first", kernel_shape=[kernel, kernel], strides=[stride] * 2,
                              pads=list(pads), group=group, dilations=[dilation] * 2)]
    if second:
        w2 = (rng.standard_normal((k, k, 3, 3)) / np.sqrt(9 * k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w2, "w2"))
        nodes.append(helper.make_node("Conv", ["h", "w2"], ["y"], name="second", kernel_shape=[3, 3], pads=[1] * 4))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", k, "H2", "W2"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run(model, x):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


@pytest.mark.parametrize("m", winograd.TILES)
@pytest.mark.parametrize("c,k,bias", [(32, 48, True), (40, 32, False)])
def test_rewrite_matches_direct_convolution(m, c, k, bias):
    direct = conv_model(c, k, bias=bias, seed=m + c)
    rewritten = copy(direct)
    assert winograd.rewrite_convolutions(rewritten, tile=lambda ci, ko: m) == {f"F({m},3)": 1}
    onnx.checker.check_model(rewritten)
    assert not any(n.op_type == "Conv" and n.input[1] == "w" for n in rewritten.graph.node)
    assert "w" not in {t.name for t in rewritten.graph.initializer}          # the old weight is gone
    rng = np.random.default_rng(m * 7 + k)
    # one dynamic graph, many shapes: multiples of m, odd sizes (padded, then cropped), tiny ones
    for shape in [(2, c, 16, 16), (1, c, 13, 7), (3, c, 5, 9), (1, c, 1, 2), (2, c, 8, 12)]:
        x = rng.standard_normal(shape).astype(np.float32)
        ref, got = run(direct, x), run(rewritten, x)
        assert got.shape == ref.shape
        # F(2, 3) rounds like the direct sum; F(4, 3) a little more (its transforms hold 4s and 8s)
        tol = 2e-6 if m == 2 else 5e-5
        assert np.abs(got - ref).max() <= tol * max(1.0, np.abs(ref).max()), (shape, np.abs(got - ref).max())


def test_matrices_are_the_winograd_identity():
    """A^T [(G g) * (B^T d)] equals the 1-D correlation of d with g, for any d and g."""
    rng = np.random.default_rng(5)
    for m in winograd.TILES:
        bt, g, at = winograd.winograd_matrices(m)
        d, w = rng.standard_normal(m + 2), rng.standard_normal(3)
        assert np.allclose(at @ ((g @ w) * (bt @ d)), [d[i:i + 3] @ w for i in range(m)], atol=1e-12)
    with pytest.raises(ValueError, match="F\\(3, 3\\) is not implemented"):
        winograd.winograd_matrices(3)


@pytest.mark.parametrize("kwargs", [dict(stride=2), dict(kernel=1, pads=(0, 0, 0, 0)), dict(group=2),
                                    dict(dilation=2, pads=(2, 2, 2, 2)), dict(pads=(0, 0, 0, 0))])
def test_other_convolutions_are_left_alone(kwargs):
    model = conv_model(32, 32, **kwargs)
    before = model.SerializeToString()
    assert winograd.rewrite_convolutions(model) == {}
    assert model.SerializeToString() == before


def test_thin_convolutions_and_small_inputs_are_left_alone():
    thin = conv_model(16, 64)
    assert winograd.rewrite_convolutions(thin) == {}                      # 16 input channels < 32
    assert winograd.rewrite_convolutions(copy(thin), min_channels=16) == {"F(4,3)": 1}
    two = conv_model(32, 32, second=True)
    counts = winograd.rewrite_convolutions(two, sizes={"first": (16, 16), "second": (4, 4)})
    assert counts == {"F(4,3)": 1, winograd.KEPT: 1}
    assert [n.name for n in two.graph.node if n.op_type == "Conv" and n.input[1] in ("w", "w2")] == ["second"]


def test_the_tile_follows_the_width():
    assert winograd.default_tile(320, 640) == 4 and winograd.default_tile(960, 320) == 4
    assert winograd.default_tile(640, 1280) == 2
    model = conv_model(32, 32)
    u = winograd.transformed_weight(numpy_helper.to_array(model.graph.initializer[0]), 2)
    assert u.shape == (16, 32, 32) and u.dtype == np.float32


def test_probe_reads_each_convolution_input_size(tmp_path):
    model = conv_model(32, 32, stride=2, second=True)
    path = tmp_path / "two.onnx"
    onnx.save(model, str(path))
    sizes = winograd.probe_conv_sizes(path, {"x": np.zeros((1, 32, 20, 12), np.float32)})
    assert sizes == {"first": (20, 12), "second": (10, 6)}


def test_rewrite_file_probes_and_leaves_graphs_without_candidates(tmp_path):
    from sdrt.export.onnx_export import save_onnx
    path = tmp_path / "net.onnx"
    save_onnx(conv_model(32, 32, second=True), path)
    before = path.read_bytes()
    # at the smallest request the first convolution sees 6x6: kept; the second (stride 1) too
    assert winograd.rewrite_file(path, {"x": np.zeros((1, 32, 6, 6), np.float32)}) == {winograd.KEPT: 2}
    assert path.read_bytes() == before
    counts = winograd.rewrite_file(path, {"x": np.zeros((1, 32, 8, 9), np.float32)})
    assert counts == {"F(4,3)": 2}
    x = np.random.default_rng(1).standard_normal((2, 32, 11, 8)).astype(np.float32)
    model = onnx.load(str(path))
    assert np.allclose(run(model, x), run(conv_model(32, 32, second=True), x), atol=1e-4)
    flat = tmp_path / "flat.onnx"
    save_onnx(conv_model(32, 32, kernel=1, pads=(0, 0, 0, 0)), flat)
    assert winograd.rewrite_file(flat, None) == {}


@pytest.fixture(scope="module")
def winograd_everywhere(tiny, tmp_path_factory, request):
    """The tiny model built with every 3x3 convolution rewritten (its channels and sizes are
    below the defaults, which SD 1.5 meets)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(winograd, "MIN_SIZE", 1)
    mp.setattr(winograd, "MIN_CHANNELS", 1)
    request.addfinalizer(mp.undo)
    d = tmp_path_factory.mktemp("winograd-engines")
    profile = Profile(batch=(1, 1, 2), height=(32, 64, 96), width=(32, 64, 96), windows=(1, 1, 2))
    build_onnxruntime(tiny.components, d, profile=profile, log=lambda m: None)
    return d


def test_tiny_networks_rewritten_match_torch(tiny, winograd_everywhere):
    import sdrt
    manifest = read_manifest(winograd_everywhere)
    for name in ("unet", "vae_decoder"):
        entry = manifest["networks"][name]
        assert sum(v for k, v in entry["winograd"].items() if k != winograd.KEPT) > 0, entry["winograd"]
        assert "winograd(" in entry["key"]["optimization"]
    unet = onnx.load(str(winograd_everywhere / "unet.onnx"), load_external_data=False)
    assert sum(n.op_type == "DepthToSpace" for n in unet.graph.node) == sum(
        manifest["networks"]["unet"]["winograd"].values())
    pipe = sdrt.Pipeline.from_pretrained("random:tiny", backend="onnxruntime", engine_dir=str(winograd_everywhere))
    g = torch.Generator().manual_seed(4)
    for rows, h, w in [(2, 8, 8), (4, 6, 10), (2, 12, 4)]:
        x, t, ctx = torch.randn(rows, 4, h, w, generator=g), torch.rand(rows, generator=g) * 999, \
            torch.randn(rows, 77, 32, generator=g)
        assert (pipe.backend.unet(x, t, ctx) - tiny.backend.unet(x, t, ctx)).abs().max().item() < 1e-4
        z = torch.randn(rows // 2, 4, h, w, generator=g)
        assert (pipe.backend.decode(z) - tiny.backend.decode(z)).abs().max().item() < 1e-4
    kw = dict(negative_prompt="blurry", steps=6, seed=3, width=64, height=48, sampler="DPM++ 2M Karras")
    a, b = pipe("a [red:blue:0.5] house", **kw), tiny("a [red:blue:0.5] house", **kw)
    assert np.abs(a.pixels - b.pixels).max() <= 1e-3


def test_no_winograd_builds_direct_convolutions(tiny, tmp_path):
    logs = []
    build_onnxruntime(tiny.components, tmp_path, networks=("vae_decoder",), winograd=False, log=logs.append)
    entry = read_manifest(tmp_path)["networks"]["vae_decoder"]
    assert entry["winograd"] == {} and "winograd" not in entry["key"]["optimization"]
    build_onnxruntime(tiny.components, tmp_path, networks=("vae_decoder",), log=logs.append)
    assert any("rebuilding" in m and "optimization" in m for m in logs), logs


def test_cli_build_reports_the_rewrite_and_can_skip_it(tmp_path, capsys, monkeypatch):
    from sdrt.cli import main
    monkeypatch.setattr(winograd, "MIN_SIZE", 1)
    d = str(tmp_path / "eng")
    assert main(["build", "random:tiny", "--out", d, "--networks", "unet", "--max", "1x64x64"]) == 0
    assert main(["info", d]) == 0
    out = capsys.readouterr().out
    assert "Winograd convolutions: F(4,3)" in out and "+winograd(" in out
    assert main(["build", "random:tiny", "--out", d, "--networks", "unet", "--max", "1x64x64", "--no-winograd"]) == 0
    assert "optimization differ" in capsys.readouterr().out
    assert main(["info", d]) == 0
    assert "Winograd" not in capsys.readouterr().out
