"""Float8 linear layers (sdrt.quantize, TorchBackend.tune(quantize="fp8")): the math against a
float64 reference, the shallow copy of the UNet, weight changes, and the backend's wiring. On a
CPU torch emulates ``_scaled_mm``; the speed is the GPU suite's business."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrt.quantize import FP8_MAX, Float8Linear, check_fp8_device, float8_layers, quantize_unet, refresh


def _linear(n_in, n_out, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g) * torch.rand(n_out, 1, generator=g) * 3)
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=g))
    return lin


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float8_linear_is_the_scaled_product_and_close_to_the_linear(seed):
    lin = _linear(64, 48, seed)
    f8 = Float8Linear(lin)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(100 + seed)) * 4
    with torch.no_grad():
        y = f8(x)
        exact = lin(x).double()
    assert y.shape == (3, 5, 48) and y.dtype == x.dtype
    # the float64 product of the dequantized operands: what the float8 units compute, up to the
    # bfloat16 output's rounding
    x2 = x.reshape(-1, 64).double()
    sx = x2.abs().amax(1, keepdim=True) / FP8_MAX
    xq = (x2 / sx).to(torch.float8_e4m3fn).double() * sx
    wq = f8.weight_fp8.double() * f8.weight_scale.double().t()
    ref = (xq @ wq.t() + lin.bias.double()).reshape(3, 5, 48)
    assert torch.linalg.norm(y.double() - ref) / torch.linalg.norm(ref) < 8e-3
    # against the float32 layer: e4m3 keeps 3 mantissa bits (relative error 2^-4 per element)
    rel = (torch.linalg.norm(y.double() - exact) / torch.linalg.norm(exact)).item()
    assert 1e-4 < rel < 0.06                    # quantized (not the float32 product), and close to it
    assert torch.isfinite(f8(torch.zeros(2, 64))).all()     # an all-zero row keeps a finite scale


def test_float8_linear_refuses_sizes_the_units_cannot_take():
    with pytest.raises(ValueError, match="divisible by 16"):
        Float8Linear(torch.nn.Linear(40, 32))


def test_float8_buffers_keep_their_dtype_through_module_to():
    f8 = Float8Linear(_linear(32, 16, 3, bias=False))
    f8.to(torch.float64)
    assert f8.weight_fp8.dtype == torch.float8_e4m3fn and f8.weight_scale.dtype == torch.float32
    assert f8(torch.randn(2, 32, dtype=torch.float64)).dtype == torch.float64


def test_quantized_unet_is_a_shallow_copy(tiny):
    unet = tiny.components.unet
    q = quantize_unet(unet)
    linears = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".transformer_blocks." in n]
    assert len(float8_layers(q)) == len(linears) > 0 and not float8_layers(unet)
    assert q.conv_in is unet.conv_in and q.time_embedding is unet.time_embedding    # shared, not copied
    assert q is not unet and q.down_blocks[0].attentions[0] is not unet.down_blocks[0].attentions[0]
    own = dict(q.named_parameters())
    assert all(own[n] is p for n, p in unet.named_parameters() if n in own)        # the same tensors
    with pytest.raises(ValueError, match="quantize='int4'"):
        quantize_unet(unet, "int4")


def test_refresh_follows_a_changed_weight():
    lin = _linear(32, 32, 5)
    f8 = Float8Linear(lin)
    x = torch.randn(4, 32)
    before = f8(x)
    assert refresh(f8) == 0
    with torch.no_grad():
        lin.weight.mul_(2)
    assert refresh(f8) == 1 and refresh(f8) == 0
    assert torch.allclose(f8(x) - lin.bias, 2 * (before - lin.bias), rtol=0.02, atol=0.05)


def test_device_check_names_the_card(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A10")
    with pytest.raises(ValueError, match="8.9.*NVIDIA A10 is sm_86"):
        check_fp8_device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    check_fp8_device("cuda")
    check_fp8_device("cpu")
    with pytest.raises(ValueError, match="not on 'meta'"):
        check_fp8_device("meta")


def test_backend_runs_float8_on_both_loops_and_undoes_it(torch_pipe):
    pipe, be = torch_pipe, torch_pipe.backend
    args = dict(prompt="a [cat:dog:0.5] photo", steps=6, width=64, height=64, seed=2)
    plain = pipe(**args).pixels
    try:
        pipe.tune(quantize="fp8")
        assert be.options["quantize"] == "fp8" and float8_layers(be.unet_module)
        assert not float8_layers(pipe.components.unet)          # the model's own modules are untouched
        q = pipe(**args).pixels
        be.enable_kv_cache(True)                                 # the K/V cache runs on the float8 copy
        q_kv = pipe(**args).pixels
        pipe.set_fast_path()
        q_static = pipe(**args).pixels
        pipe.tune(quantize="fp8")                               # unchanged: the graphs stay
        assert len(pipe.loops) == 1
    finally:
        pipe.set_fast_path(False)
        be.enable_kv_cache(False)
        pipe.tune(quantize=False)
    psnr = 10 * np.log10(1 / np.mean((q.astype(np.float64) - plain) ** 2))
    assert 30 < psnr < 200, psnr                                 # close, but not the float32 image
    assert np.abs(q_kv - q).max() <= 1e-5 and np.abs(q_static - q).max() <= 1e-4
    assert be.options["quantize"] is None and not float8_layers(be.unet_module)
    assert np.array_equal(pipe(**args).pixels, plain)


def test_backend_requantizes_after_a_weight_change(torch_pipe):
    pipe, be = torch_pipe, torch_pipe.backend
    args = dict(prompt="a lighthouse", steps=3, width=64, height=64, seed=1)
    w = next(m for n, m in pipe.components.unet.named_modules() if n.endswith("attn1.to_out.0")).weight
    try:
        pipe.tune(quantize="fp8")
        before = pipe(**args).pixels
        saved = w.detach().clone()
        with torch.no_grad():
            w.mul_(-3)                                           # as a LoRA merge writes in place
        be.sync_weights("unet")
        changed = pipe(**args).pixels
        with torch.no_grad():
            w.copy_(saved)
        be.sync_weights("unet")
        back = pipe(**args).pixels
    finally:
        pipe.tune(quantize=False)
    assert np.abs(changed - before).max() > 1e-3
    assert np.abs(back - before).max() <= 1e-5


def test_tune_refuses_an_unknown_mode_before_changing_anything(torch_pipe):
    with pytest.raises(ValueError, match="quantize='int8'"):
        torch_pipe.tune(channels_last=True, quantize="int8")
    assert torch_pipe.backend.options["channels_last"] is False


def test_cli_quantize(tmp_path, capsys):
    from sdrt.cli import main
    out = tmp_path / "q.png"
    assert main(["generate", "a lighthouse", "--model", "random:tiny", "--steps", "2", "--quiet",
                 "--quantize", "fp8", "-o", str(out)]) == 0
    assert out.is_file()
    assert main(["generate", "a cat", "--backend", "onnxruntime", "--quantize", "fp8", "-o",
                 str(tmp_path / "x.png")]) != 0
    assert "quantize: speed options of backend 'torch'" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_float8_on_cuda_matches_the_reference_or_is_refused():
    lin = _linear(320, 1280, 7).cuda().half()
    if torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(ValueError, match="8.9"):
            check_fp8_device("cuda")
        return
    f8 = Float8Linear(lin)
    x = torch.randn(2, 4096, 320, device="cuda", dtype=torch.float16)
    out = torch.full((2, 4096, 1280), float("nan"), device="cuda", dtype=torch.float16)
    with torch.no_grad():
        out.copy_(f8(x))
        exact = lin(x).double()
    assert torch.isfinite(out).all()
    assert (torch.linalg.norm(out.double() - exact) / torch.linalg.norm(exact)).item() < 0.06
    compiled = torch.compile(f8)
    with torch.no_grad():
        again = compiled(x).double()
    # inductor may compute the scales in another order: a few inputs round to the next e4m3 value
    assert (torch.linalg.norm(again - out.double()) / torch.linalg.norm(out.double())).item() < 0.01


def test_compiling_raises_dynamos_recompile_limit(torch_pipe, dynamo_only, monkeypatch):
    """Every compiled UNet of one class shares dynamo's per-code-object limit (8 by default):
    batch sizes, resolutions, a float8 copy. Compiling through sdrt raises it."""
    import torch._dynamo.config as cfg

    from sdrt.backends.torch_backend import RECOMPILE_LIMIT
    monkeypatch.setattr(cfg, "recompile_limit", 8)
    be = torch_pipe.backend
    try:
        be.tune(compile="default", quantize="fp8")
        assert be.unet_module is not be._tree and float8_layers(be.unet_module)
        assert cfg.recompile_limit == RECOMPILE_LIMIT
    finally:
        be.tune(compile=False, quantize=False)
