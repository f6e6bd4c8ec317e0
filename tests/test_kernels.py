"""The CUDA kernels: they compile for every target architecture (nvcc, on any machine), the
host-side logic and the torch reference are right (CPU), and the kernels equal the reference
(GPU only; skipped without one)."""
from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt import kernels
from sdrt.fastpath import step_table

NVCC = shutil.which("nvcc")
CUDA = torch.cuda.is_available()


def needs_nvcc(test):
    """Compiles with nvcc (seconds): slow, and skipped where nvcc is missing."""
    return pytest.mark.slow(pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (CI has it)")(test))


def needs_gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")(test))


@needs_nvcc
@pytest.mark.parametrize("arch", kernels.ARCHS)
def test_fused_step_compiles_for_arch(arch, tmp_path):
    out = tmp_path / f"step_sm{arch}.cubin"
    proc = subprocess.run([NVCC, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", "-o", str(out),
                           str(kernels.UNIT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data[:4] == b"\x7fELF"
    for name in kernels.KERNEL_NAMES:
        assert name.encode() in data


@needs_nvcc
def test_cmake_builds_the_fatbin(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build = tmp_path / "build"
    for cmd in (["cmake", "-S", str(Path(__file__).resolve().parent.parent), "-B", str(build), "-DCMAKE_CUDA_ARCHITECTURES=80;90"],
                ["cmake", "--build", str(build)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    data = (build / kernels.FATBIN_NAME).read_bytes()
    assert all(name.encode() in data for name in kernels.KERNEL_NAMES)


@needs_nvcc
def test_build_fatbin_and_its_errors(tmp_path, monkeypatch):
    out = kernels.build_fatbin(tmp_path / "k.fatbin", archs=("sm_89",))
    assert out.stat().st_size > 1000
    monkeypatch.setenv("SDRT_KERNELS", str(tmp_path / "missing.fatbin"))
    with pytest.raises(kernels.KernelError, match="SDRT_KERNELS"):
        kernels.find_fatbin()
    monkeypatch.setenv("SDRT_KERNELS", str(out))
    assert kernels.find_fatbin() == out
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    with pytest.raises(kernels.KernelError, match="nvcc was not found"):
        kernels.build_fatbin(tmp_path / "k2.fatbin")


def test_nvcc_command():
    cmd = kernels.nvcc_command("o.fatbin", ["sm_80", "90"])
    assert "-gencode=arch=compute_80,code=sm_80" in cmd and "-gencode=arch=compute_90,code=sm_90" in cmd
    assert "-gencode=arch=compute_90,code=compute_90" in cmd       # PTX for later GPUs
    with pytest.raises(ValueError, match="architectures"):
        kernels.nvcc_command("o.fatbin", ["ampere"])


@pytest.mark.parametrize("numel,sms,expect", [(1, 132, 1), (256, 132, 1), (257, 132, 2),
                                              (4 * 64 * 64, 132, 64), (10 ** 8, 132, 132 * 8)])
def test_launch_config(numel, sms, expect):
    grid, block = kernels.launch_config(numel, sms)
    assert (grid, block) == (expect, kernels.BLOCK)
    assert grid * block >= min(numel, 132 * 8 * block)        # covers the tensor or strides over it


def test_launch_config_rejects_bad_values():
    with pytest.raises(ValueError, match="numel"):
        kernels.launch_config(0)
    with pytest.raises(ValueError, match="block"):
        kernels.launch_config(10, block=100)


def _inputs(b, shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)   # noqa: E731
    out = r(2 * b, *shape).to(device, dtype)
    x, d_prev, noise = (r(b, *shape).to(device) for _ in range(3))
    scale = (torch.rand(b, generator=g) * 10 + 1).to(device)
    return out, x, d_prev, noise, scale


def _float64_step(out, x, d_prev, noise, coef, scale):
    """The step in float64 numpy, straight from the formula in sdrt/kernels/fused_step.cu."""
    o, x, dp = (t.double().cpu().numpy() for t in (out, x, d_prev))
    b = x.shape[0]
    c_skip, c_out, a, bb, e, n, c_in = [float(v) for v in coef[:7]]
    s = scale.double().cpu().numpy().reshape(-1, *([1] * (x.ndim - 1)))
    g = o[b:] + s * (o[:b] - o[b:])
    d = c_skip * x + c_out * g
    xn = a * x + bb * d + (e * dp if e else 0) + (n * noise.double().cpu().numpy() if n else 0)
    return xn, d, xn * c_in


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,shape", [(1, (4, 8, 8)), (3, (4, 17, 23)), (2, (3, 5, 7))])
@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "LCM"])
def test_reference_matches_float64(dtype, b, shape, sampler):
    sigmas = np.array([14.6, 6.0, 2.1, 0.7, 0.03, 0.0])
    table, _ = step_table(sampler, sigmas, v_prediction=(sampler == "LCM"))
    for row in table:
        out, x, d_prev, noise, scale = _inputs(b, shape, dtype, seed=int(row[2] * 1000) % 97)
        want = _float64_step(out, x, d_prev, noise, row, scale)
        x_in = torch.empty_like(out)
        kernels.fused_step(out, x, d_prev, x_in, noise, torch.tensor(row, dtype=torch.float32), scale)
        tol = 1e-5 * max(1.0, float(np.abs(want[0]).max()))
        assert np.abs(x.numpy() - want[0]).max() <= tol
        assert np.abs(d_prev.numpy() - want[1]).max() <= tol
        rel = 1e-3 if dtype == torch.float16 else 1e-5      # one float16 rounding of the input
        for half in (x_in[:b], x_in[b:]):
            assert np.abs(half.float().numpy() - want[2]).max() <= rel * max(1.0, float(np.abs(want[2]).max()))


def test_reference_skips_zero_terms():
    """e = 0 ignores d_prev (unwritten before the first step) and n = 0 needs no noise."""
    out, x, d_prev, noise, scale = _inputs(1, (4, 4, 4), torch.float32)
    d_prev.fill_(math.nan)
    coef = torch.tensor([1.0, -2.0, 0.5, 0.5, 0.0, 0.0, 0.3, 0.0])
    kernels.fused_step(out, x, d_prev, torch.empty_like(out), None, coef, scale)
    assert torch.isfinite(x).all()
    coef[5] = 0.2
    with pytest.raises(ValueError, match="noise"):
        kernels.fused_step(out, x, d_prev, torch.empty_like(out), None, coef, scale)


def test_step_arguments_are_checked():
    out, x, d_prev, noise, scale = _inputs(2, (4, 4, 4), torch.float32)
    coef = torch.zeros(8)
    with pytest.raises(ValueError, match="2B rows"):
        kernels.fused_step(out[:2], x, d_prev, torch.empty_like(out[:2]), noise, coef, scale)
    with pytest.raises(ValueError, match="float32"):
        kernels.fused_step(out, x.double(), d_prev, torch.empty_like(out), noise, coef, scale)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.fused_step(out, x.transpose(2, 3), d_prev, torch.empty_like(out), noise, coef, scale)
    with pytest.raises(ValueError, match="dtype"):
        kernels.fused_step(out.double(), x, d_prev, torch.empty_like(out).double(), noise, coef, scale)


# ---------------------------------------------------------------- GPU: kernel against reference

@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,shape", [(1, (4, 64, 64)), (3, (4, 17, 23)), (4, (4, 96, 64))])
def test_kernel_matches_reference(dtype, b, shape):
    sigmas = np.array([14.6, 6.0, 2.1, 0.7, 0.03, 0.0])
    for sampler in ("Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DDIM"):
        table, _ = step_table(sampler, sigmas, eta=0.5 if sampler == "DDIM" else None)
        for row in table:
            out, x, d_prev, noise, scale = _inputs(b, shape, dtype, device="cuda", seed=b)
            coef = torch.tensor(row, dtype=torch.float32, device="cuda")
            ref = [t.clone() for t in (x, d_prev)] + [torch.empty_like(out)]
            kernels.fused_step(out, ref[0], ref[1], ref[2], noise, coef, scale, use_kernel=False)
            got = [x, d_prev, torch.empty_like(out)]
            kernels.fused_step(out, got[0], got[1], got[2], noise, coef, scale, use_kernel=True)
            torch.cuda.synchronize()
            for r, k in zip(ref, got):
                tol = (2e-3 if (k.dtype == torch.float16) else 1e-5) * max(1.0, float(r.float().abs().max()))
                assert float((r.float() - k.float()).abs().max()) <= tol


@needs_gpu
def test_kernel_replays_in_a_cuda_graph_with_device_coefficients():
    b, shape = 2, (4, 32, 32)
    out, x, d_prev, noise, scale = _inputs(b, shape, torch.float16, device="cuda", seed=3)
    table = torch.tensor(step_table("Euler a", np.array([10.0, 3.0, 1.0, 0.0]))[0], dtype=torch.float32,
                         device="cuda")
    row = torch.empty(8, device="cuda")
    x_in = torch.empty_like(out)
    x0 = x.clone()
    kernels.fused_step(out, x, d_prev, x_in, noise, table[0], scale)        # loads the module
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.fused_step(out, x, d_prev, x_in, noise, row, scale)
    for i in range(len(table)):
        x.copy_(x0)
        row.copy_(table[i])
        graph.replay()
        ref_x, ref_d, ref_in = x0.clone(), torch.empty_like(d_prev), torch.empty_like(out)
        kernels.fused_step(out, ref_x, ref_d, ref_in, noise, table[i], scale, use_kernel=False)
        torch.cuda.synchronize()
        assert float((x - ref_x).abs().max()) <= 1e-5 * max(1.0, float(ref_x.abs().max()))


# ---------------------------------------------------------------- cross-attention

@pytest.mark.parametrize("b,heads,lq,lk,d", [(2, 8, 65, 77, 40), (1, 5, 17, 154, 80), (3, 2, 9, 5, 160)])
def test_cross_attention_reference_equals_sdpa(b, heads, lq, lk, d):
    g = torch.Generator().manual_seed(lq)
    q = torch.randn(b, lq, heads * d, generator=g)
    k, v = torch.randn(b, heads, lk, d, generator=g), torch.randn(b, heads, lk, d, generator=g)
    want = torch.nn.functional.scaled_dot_product_attention(q.view(b, lq, heads, d).transpose(1, 2).double(),
                                                            k.double(), v.double())
    got = kernels.cross_attention(q, k, v, heads)                       # the reference on a CPU
    assert torch.allclose(got.double(), want.transpose(1, 2).reshape(b, lq, heads * d), atol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        kernels.cross_attention(q, k[:, :1], v[:, :1], heads)


def test_cross_attention_launch_geometry():
    # SD 1.5 at 512 px, deepest level: 160-dim heads, 77 keys: 2*77*160*2 B + 4*(160+77)*4 B
    assert kernels.attention_smem_bytes(77, 160, torch.float16) == 2 * 77 * 160 * 2 + 4 * (160 + 77) * 4
    assert kernels.attention_smem_bytes(77, 40, torch.float32) == 2 * 77 * 40 * 4 + 4 * (40 + 77) * 4
    assert kernels.attention_smem_bytes(7, 5, torch.float16) == 144 + 4 * (5 + 7) * 4    # 140 B padded to 144
    assert kernels.attention_grid(4096, 16) == (256, 16)
    assert kernels.attention_grid(4097, 16) == (257, 16)                # a tail block for the odd query
    assert kernels.cross_attention_fits(77, 40, torch.float16, "cpu")
    assert not kernels.cross_attention_fits(308, 160, torch.float16, "cpu")   # 4 windows: over 48 KiB
    assert not kernels.cross_attention_fits(77, 40, torch.float64, "cpu")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,heads,lq,lk,d", [(2, 8, 4096, 77, 40), (2, 8, 1025, 154, 80), (1, 8, 257, 77, 160),
                                              (3, 5, 63, 7, 40), (1, 3, 31, 7, 5)])
def test_cross_attention_kernel_matches_reference(dtype, b, heads, lq, lk, d):
    g = torch.Generator(device="cuda").manual_seed(lq + lk)
    q = torch.randn(b, lq, heads * d, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(b, heads, lk, d, device="cuda", generator=g).to(dtype) for _ in range(2))
    if not kernels.cross_attention_fits(lk, d, dtype, "cuda"):
        pytest.skip("this GPU's shared memory does not hold the head")
    got = kernels.cross_attention(q, k, v, heads)
    want = kernels.cross_attention_reference(q.double(), k.double(), v.double(), heads)
    torch.cuda.synchronize()
    assert torch.isfinite(got).all()                                     # every element written
    rel = float((got.double() - want).norm() / want.norm())
    assert rel <= (2e-3 if dtype == torch.float16 else 1e-5)


def _signature(name: str) -> list[str]:
    """Parameter kinds of an extern "C" kernel, read from its source: ptr, int or float."""
    import re
    src = "\n".join(p.read_text() for p in kernels.SOURCES)
    m = re.search(r'extern "C" __global__ void(?: __launch_bounds__\([^)]*\))?\s+' + name + r"\(([^)]*)\)", src)
    assert m, f"{name} not found in the kernel sources"
    kinds = []
    for param in m.group(1).split(","):
        param = " ".join(param.split())
        kinds.append("ptr" if "*" in param else "int" if param.startswith("int ") else
                     "float" if param.startswith("float ") else param)
    return kinds


def _kinds(args) -> list[str]:
    import ctypes
    return ["ptr" if isinstance(a, ctypes.c_void_p) else "int" if isinstance(a, ctypes.c_int) else
            "float" if isinstance(a, ctypes.c_float) else type(a).__name__ for a in args]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_launch_arguments_match_the_kernel_signatures(dtype):
    """What fused_step and cross_attention hand cuLaunchKernel: one value per kernel parameter,
    of its kind, in its order, with the tensors' addresses and the sizes."""
    out, x, d_prev, noise, scale = _inputs(3, (4, 5, 7), dtype)
    x_in, coef = torch.empty_like(out), torch.zeros(8)
    args = kernels.step_kernel_args(out, x, d_prev, x_in, noise, coef, scale)
    assert _kinds(args) == _signature(kernels.STEP_KERNELS[dtype])
    assert [a.value for a in args[:7]] == [t.data_ptr() for t in (out, x, d_prev, x_in, noise, coef, scale)]
    assert (args[7].value, args[8].value) == (4 * 5 * 7, 3)
    assert kernels.step_kernel_args(out, x, d_prev, x_in, None, coef, scale)[4].value is None   # NULL noise
    q = torch.randn(2, 33, 8 * 40).to(dtype)
    k, v = (torch.randn(2, 8, 77, 40).to(dtype) for _ in range(2))
    o = torch.empty_like(q)
    args = kernels.attention_kernel_args(q, k, v, o, 8, 0.125)
    assert _kinds(args) == _signature(kernels.ATTENTION_KERNELS[dtype])
    assert [a.value for a in args[4:8]] == [8, 33, 77, 40] and args[8].value == 0.125


def test_cuda_module_launch_packs_parameters_and_opts_in_to_shared_memory():
    """CudaModule.launch against a fake of cuda-python's driver module: cuLaunchKernel gets an
    array of pointers to each parameter's value, the grid, the block, the shared memory, and
    the stream; more than 48 KiB of shared memory is opted in once per kernel."""
    import ctypes
    import types

    calls = []

    class Attr:
        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8

    def launch(fn, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        arr = (ctypes.c_void_p * 3).from_address(params)
        values = (ctypes.c_void_p.from_address(arr[0]).value, ctypes.c_int.from_address(arr[1]).value,
                  ctypes.c_float.from_address(arr[2]).value)
        calls.append(("launch", fn, (gx, gy, gz), (bx, by, bz), smem, stream, values, extra))
        return (0,)

    driver = types.SimpleNamespace(
        CUfunction_attribute=Attr, CUstream=lambda handle: ("stream", handle), cuLaunchKernel=launch,
        cuFuncSetAttribute=lambda fn, attr, value: calls.append(("attr", fn, attr, value)) or (0,))
    mod = object.__new__(kernels.CudaModule)
    mod.driver, mod.device, mod.functions, mod._smem_set = driver, torch.device("cpu"), {"k": "FN"}, {}
    import unittest.mock as mock
    stream = types.SimpleNamespace(cuda_stream=1234)
    with mock.patch.object(torch.cuda, "current_stream", lambda device=None: stream):
        for smem in (1024, 64 << 10, 64 << 10):
            mod.launch("k", (5, 3), 128, smem, [ctypes.c_void_p(0xABC0), ctypes.c_int(-7), ctypes.c_float(0.5)])
    launches = [c for c in calls if c[0] == "launch"]
    assert launches[0][1:] == ("FN", (5, 3, 1), (128, 1, 1), 1024, ("stream", 1234), (0xABC0, -7, 0.5), 0)
    assert [c for c in calls if c[0] == "attr"] == [("attr", "FN", 8, 64 << 10)]      # once, above 48 KiB
