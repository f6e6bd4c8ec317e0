"""sdrt's CUDA kernels from Python: the fused sampler step and the cross-attention kernel, their
torch references, and the loader.

The kernels' sources ship inside the package, beside this file (``sdrt/kernels/*.cu``), and are
built into one fatbin by the root CMakeLists.txt (``cmake -S . -B build && cmake --build build``,
then ``SDRT_KERNELS=build/sdrt_kernels.fatbin``); without it ``find_fatbin`` compiles them with
nvcc for the GPU at hand into the cache (``sdrt.paths.cache_root()``). Launches
go through cuda-python's driver API on the caller's torch stream, so they are captured into
CUDA graphs like any torch kernel.

The fused step (``fused_step.cu``), one pass over the latents per step::

    g  = u + s (c - u)                       CFG, per-image scale s; c, u: the UNet's two halves
    D  = c_skip x + c_out g                  model output -> denoised (eps or v prediction)
    x' = a x + b D + e D_prev + n noise      the sampler update (sdrt.fastpath.step_table)
    x_in = x' c_in_next  (both halves)       the next UNet input, in the storage dtype

with the eight per-step coefficients read from a device table row (``COEFFICIENTS``).
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import torch

from ..paths import cache_root

SOURCE_DIR = Path(__file__).resolve().parent          # the .cu files are package data
UNIT = SOURCE_DIR / "sdrt_kernels.cu"                 # includes every kernel source
SOURCES = (UNIT, SOURCE_DIR / "fused_step.cu", SOURCE_DIR / "cross_attention.cu")
FATBIN_NAME = "sdrt_kernels.fatbin"
ARCHS = ("80", "86", "89", "90")             # what CMakeLists.txt builds by default
# one row of the step table, in the kernel's order
COEFFICIENTS = ("c_skip", "c_out", "a", "b", "e", "n", "c_in_next", "unused")
BLOCK = 256
STEP_KERNELS = {torch.float32: "sdrt_fused_step_f32", torch.float16: "sdrt_fused_step_f16"}
ATTENTION_KERNELS = {torch.float32: "sdrt_cross_attention_f32", torch.float16: "sdrt_cross_attention_f16"}
KERNEL_NAMES = tuple(STEP_KERNELS.values()) + tuple(ATTENTION_KERNELS.values())


class KernelError(RuntimeError):
    """A kernel could not be built, loaded or launched; the message says which and why."""


def fused_step_reference(out: torch.Tensor, x: torch.Tensor, d_prev: torch.Tensor, x_in: torch.Tensor,
                         noise: torch.Tensor | None, coef: torch.Tensor, scale: torch.Tensor) -> None:
    """The fused step in torch ops, in place, with the kernel's semantics and float32 arithmetic.

    out (2B, C, h, w): UNet output, conditional rows first; x, d_prev (B, C, h, w) float32;
    x_in (2B, C, h, w) in the storage dtype; noise like x or None; coef (8,) float32 on the
    device; scale (B,) float32. Terms whose coefficient is 0 are skipped, as in the kernel
    (d_prev is unwritten before the first step; noise is None for deterministic samplers).
    """
    b = x.shape[0]
    out = out.float()
    c, u = out[:b], out[b:]
    view = (-1,) + (1,) * (x.dim() - 1)
    g = u + scale.view(view) * (c - u)
    # coefficients stay on the device (no host read inside a captured graph); a zero coefficient
    # masks its term out, as the kernel's branch does, so an unwritten d_prev never leaks in
    c_skip, c_out, a, bb, e, n, c_in = (coef[i] for i in range(7))
    d = c_skip * x + c_out * g
    xn = a * x + bb * d + torch.where(e != 0, e * d_prev, 0.0)
    if noise is not None:
        xn = xn + torch.where(n != 0, n * noise, 0.0)
    v = xn * c_in
    x.copy_(xn)
    d_prev.copy_(d)
    x_in[:b].copy_(v)
    x_in[b:].copy_(v)


def launch_config(numel: int, sm_count: int = 132, block: int = BLOCK, waves: int = 8) -> tuple[int, int]:
    """(grid, block) for a grid-stride kernel over ``numel`` elements: enough blocks to cover
    the tensor, at most ``waves`` blocks per SM (the loop strides over the rest)."""
    if numel <= 0:
        raise ValueError(f"numel must be positive, got {numel}")
    if not 1 <= block <= 1024 or block % 32:
        raise ValueError(f"block must be a multiple of 32 in 32..1024, got {block}")
    grid = min((numel + block - 1) // block, max(1, sm_count) * waves)
    return grid, block


def check_step_args(out, x, d_prev, x_in, noise, coef, scale) -> None:
    """Shapes, dtypes, devices and contiguity the kernel relies on; raises ValueError."""
    b = x.shape[0]
    if x.dtype != torch.float32 or d_prev.dtype != torch.float32:
        raise ValueError("x and d_prev must be float32")
    if out.dtype not in STEP_KERNELS or x_in.dtype != out.dtype:
        raise ValueError(f"out and x_in must share a dtype among float32/float16, got {out.dtype}, {x_in.dtype}")
    if out.shape != x_in.shape or out.shape[0] != 2 * b or out.shape[1:] != x.shape[1:] or d_prev.shape != x.shape:
        raise ValueError(f"shapes disagree: out {tuple(out.shape)}, x_in {tuple(x_in.shape)}, "
                         f"x {tuple(x.shape)}, d_prev {tuple(d_prev.shape)} (out and x_in need 2B rows)")
    if noise is not None and (noise.shape != x.shape or noise.dtype != torch.float32):
        raise ValueError(f"noise must be float32 of shape {tuple(x.shape)}")
    if coef.numel() < 7 or coef.dtype != torch.float32 or scale.shape != (b,) or scale.dtype != torch.float32:
        raise ValueError("coef needs 8 float32 values and scale B float32 values")
    tensors = [t for t in (out, x, d_prev, x_in, noise, coef, scale) if t is not None]
    if any(not t.is_contiguous() for t in tensors):
        raise ValueError("every tensor of the fused step must be contiguous")
    if len({t.device for t in tensors}) != 1:
        raise ValueError("every tensor of the fused step must be on one device")
    if noise is None and coef.device.type == "cpu" and float(coef[5]) != 0.0:   # host read: CPU only
        raise ValueError("this step table row adds noise (n != 0) but no noise tensor was given")


def nvcc_command(out_path, archs=ARCHS, sources=(UNIT,), nvcc: str = "nvcc") -> list[str]:
    """The nvcc command that builds the fatbin: a cubin per architecture plus PTX for the last."""
    archs = [str(a).replace("sm_", "") for a in archs]
    if not archs or not all(a.isdigit() for a in archs):
        raise ValueError(f"architectures must look like 80 or sm_80, got {archs}")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return [nvcc, "-fatbin", "-O3", "-std=c++17", *gencode, "-o", str(out_path), *map(str, sources)]


def build_fatbin(out_path, archs=ARCHS) -> Path:
    """Compile the kernels with nvcc into ``out_path``; KernelError names what failed."""
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    if not nvcc or not os.path.exists(nvcc):
        raise KernelError("nvcc was not found (install the CUDA toolkit, or build the kernels elsewhere "
                          "with `cmake -S . -B build && cmake --build build` and set SDRT_KERNELS)")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = nvcc_command(out_path.with_suffix(".tmp"), archs, nvcc=nvcc)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise KernelError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr.strip()}")
    os.replace(out_path.with_suffix(".tmp"), out_path)
    return out_path


def find_fatbin(device: torch.device | None = None) -> Path:
    """The kernels' fatbin: $SDRT_KERNELS (CMake's build), else one compiled for this GPU's
    architecture into the cache (``cache_root()``), again when the sources are newer."""
    env = os.environ.get("SDRT_KERNELS")
    if env:
        if not Path(env).is_file():
            raise KernelError(f"SDRT_KERNELS={env} is not a file")
        return Path(env)
    newest = max(s.stat().st_mtime for s in SOURCES)
    major, minor = torch.cuda.get_device_capability(device)
    cached = cache_root() / f"kernels-sm{major}{minor}.fatbin"
    if cached.is_file() and cached.stat().st_mtime >= newest:
        return cached
    return build_fatbin(cached, archs=(f"{major}{minor}",))


def _check(result, what: str):
    """cuda-python returns (CUresult, values...); raise KernelError on anything but success."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        from cuda.bindings import driver
        _, name = driver.cuGetErrorName(err)
        raise KernelError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else values


class CudaModule:
    """sdrt's fatbin loaded on one CUDA device through cuda-python's driver API; launches go to
    the current torch stream, so they order with torch's work and join CUDA-graph captures."""

    _lock = threading.Lock()
    _loaded: dict = {}

    @classmethod
    def get(cls, device: torch.device) -> "CudaModule":
        device = torch.device(device)
        with cls._lock:
            if device not in cls._loaded:
                cls._loaded[device] = cls(device)
            return cls._loaded[device]

    def __init__(self, device: torch.device):
        try:
            from cuda.bindings import driver
        except ImportError:
            try:
                from cuda import cuda as driver  # cuda-python < 12.6
            except ImportError:
                raise KernelError("sdrt's CUDA kernels need cuda-python (pip install 'cuda-python>=12')") from None
        self.driver, self.device = driver, torch.device(device)
        torch.cuda.init()
        with torch.cuda.device(self.device):
            torch.zeros(1, device=self.device)          # the runtime makes the primary context current
            if int(_check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent") or 0) == 0:
                dev = _check(driver.cuDeviceGet(self.device.index or 0), "cuDeviceGet")
                ctx = _check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
                _check(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
            self.path = find_fatbin(self.device)
            self._image = np.frombuffer(self.path.read_bytes(), dtype=np.uint8).copy()
            self.module = _check(driver.cuModuleLoadData(self._image.ctypes.data), f"cuModuleLoadData({self.path})")
            self.functions = {name: _check(driver.cuModuleGetFunction(self.module, name.encode()),
                                           f"cuModuleGetFunction({name})") for name in KERNEL_NAMES}
            props = torch.cuda.get_device_properties(self.device)
            self.sm_count = props.multi_processor_count
            self.smem_optin = int(getattr(props, "shared_memory_per_block_optin", 48 << 10))
        self._smem_set: dict[str, int] = {}

    def launch(self, name: str, grid: tuple, block: int, smem: int, args: list) -> None:
        """``args``: ctypes values in the kernel's parameter order."""
        fn = self.functions[name]
        if smem > 48 << 10 and self._smem_set.get(name, 0) < smem:     # opt in to more shared memory
            attr = self.driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _check(self.driver.cuFuncSetAttribute(fn, attr, smem), f"cuFuncSetAttribute({name}, {smem} B)")
            self._smem_set[name] = smem
        params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        stream = self.driver.CUstream(torch.cuda.current_stream(self.device).cuda_stream)
        gx, gy = (grid + (1,))[:2] if isinstance(grid, tuple) else (grid, 1)
        _check(self.driver.cuLaunchKernel(fn, gx, gy, 1, block, 1, 1, smem, stream, ctypes.addressof(params), 0),
               f"cuLaunchKernel({name})")


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def fused_step(out, x, d_prev, x_in, noise, coef, scale, use_kernel: bool = True) -> None:
    """The fused step in place: the CUDA kernel on a GPU (when ``use_kernel``), else the torch
    reference (CPU, or a GPU where the kernel is off)."""
    check_step_args(out, x, d_prev, x_in, noise, coef, scale)
    if x.device.type != "cuda" or not use_kernel:
        fused_step_reference(out, x, d_prev, x_in, noise, coef, scale)
        return
    mod = CudaModule.get(x.device)
    grid, block = launch_config(x.numel(), mod.sm_count)
    mod.launch(STEP_KERNELS[out.dtype], (grid,), block, 0, step_kernel_args(out, x, d_prev, x_in, noise, coef, scale))


def step_kernel_args(out, x, d_prev, x_in, noise, coef, scale) -> list:
    """The fused step kernel's parameters, in the order of kernels/fused_step.cu."""
    return [_ptr(out), _ptr(x), _ptr(d_prev), _ptr(x_in), _ptr(noise), _ptr(coef), _ptr(scale),
            ctypes.c_int(x[0].numel()), ctypes.c_int(x.shape[0])]


def attention_kernel_args(q, k, v, out, heads: int, scale: float) -> list:
    """The cross-attention kernel's parameters, in the order of kernels/cross_attention.cu."""
    b, lq, hd = q.shape
    return [_ptr(q), _ptr(k), _ptr(v), _ptr(out), ctypes.c_int(heads), ctypes.c_int(lq), ctypes.c_int(k.shape[2]),
            ctypes.c_int(hd // heads), ctypes.c_float(scale)]


# ---------------------------------------------------------------- cross-attention

ATTENTION_WARPS, ATTENTION_QUERIES_PER_WARP = 4, 4      # as in kernels/cross_attention.cu


def attention_smem_bytes(lk: int, d: int, dtype: torch.dtype) -> int:
    """Dynamic shared memory of the cross-attention kernel: keys and values of one head, and
    per warp a query row and a row of scores (float32)."""
    item = torch.empty((), dtype=dtype).element_size()
    kv = (2 * lk * d * item + 15) // 16 * 16          # the float32 rows start 16-byte aligned
    return kv + ATTENTION_WARPS * (d + lk) * 4


def attention_grid(lq: int, batch_heads: int) -> tuple[int, int]:
    per_block = ATTENTION_WARPS * ATTENTION_QUERIES_PER_WARP
    return (lq + per_block - 1) // per_block, batch_heads


def cross_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                              scale: float | None = None) -> torch.Tensor:
    """q (B, Lq, H*D), k and v (B, H, Lk, D) -> (B, Lq, H*D): softmax(q k^T * scale) v per head,
    in float32, returned in q's dtype."""
    b, lq, hd = q.shape
    d = hd // heads
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qh = q.float().view(b, lq, heads, d).transpose(1, 2)
    w = torch.softmax((qh @ k.float().transpose(-1, -2)) * scale, dim=-1)
    return (w @ v.float()).transpose(1, 2).reshape(b, lq, hd).to(q.dtype)


@functools.lru_cache(maxsize=64)
def cross_attention_fits(lk: int, d: int, dtype: torch.dtype, device) -> bool:
    """Whether the kernel's shared memory holds this head (else use SDPA)."""
    if dtype not in ATTENTION_KERNELS:
        return False
    limit = CudaModule.get(device).smem_optin if torch.device(device).type == "cuda" else 48 << 10
    return attention_smem_bytes(lk, d, dtype) <= limit


def cross_attention(q, k, v, heads: int, scale: float | None = None, use_kernel: bool = True) -> torch.Tensor:
    """Cross-attention in sdrt's layouts (see ``cross_attention_reference``): the CUDA kernel on a
    GPU, the reference elsewhere."""
    b, lq, hd = q.shape
    if hd % heads or k.shape != v.shape or k.shape[0] != b or k.shape[1] != heads or k.shape[3] != hd // heads:
        raise ValueError(f"cross_attention: q {tuple(q.shape)} with {heads} heads does not match "
                         f"k {tuple(k.shape)} / v {tuple(v.shape)}")
    d, lk = hd // heads, k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if q.device.type != "cuda" or not use_kernel:
        return cross_attention_reference(q, k, v, heads, scale)
    if not (q.dtype == k.dtype == v.dtype) or not all(t.is_contiguous() for t in (q, k, v)):
        raise ValueError("cross_attention: q, k and v must be contiguous and share a dtype")
    mod = CudaModule.get(q.device)
    smem = attention_smem_bytes(lk, d, q.dtype)
    if smem > mod.smem_optin:
        raise ValueError(f"cross_attention: {lk} keys of dimension {d} need {smem} bytes of shared memory, "
                         f"this GPU allows {mod.smem_optin}")
    out = torch.empty_like(q)
    mod.launch(ATTENTION_KERNELS[q.dtype], attention_grid(lq, b * heads), ATTENTION_WARPS * 32, smem,
               attention_kernel_args(q, k, v, out, heads, scale))
    return out
