"""Float8 (e4m3) linear layers for the UNet: ``TorchBackend.tune(quantize="fp8")``.

Each ``nn.Linear`` of the UNet's transformer blocks (attention projections and feed-forward,
where the matrix work beside the convolutions is) becomes a ``Float8Linear``: its weight is
stored in float8 e4m3 with one scale per output channel (made once), the input is scaled per
row at every call (its largest magnitude maps to e4m3's 448), and the product runs on the
float8 matrix units through ``torch._scaled_mm`` with the two scale vectors (rowwise scaling),
accumulating in float32 and writing bfloat16, then cast back to the activations' dtype.

The quantized UNet is a *shallow copy* of the model's: every convolution, norm and bias is the
same tensor; only the ``Linear`` leaves (and the modules above them) are new objects. So other
backends and the diffusers reference on the same modules keep running the original network,
and ``quantize=None`` drops the copy. Weight changes (LoRA merges into the original weights) are
picked up by ``refresh``, which re-quantizes in place (captured CUDA graphs stay valid).

Float8 matrix units exist on NVIDIA compute capability 8.9 (Ada) and 9.0 (Hopper) and newer;
elsewhere on a GPU this is refused. On a CPU torch emulates ``_scaled_mm`` (for tests: slow).
"""
from __future__ import annotations

import copy

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)          # 448
QUANTIZE_MODES = ("fp8",)
_TINY = 1e-12                                   # an all-zero row or channel keeps a finite scale


def check_fp8_device(device: torch.device | str) -> None:
    """Raise ValueError where float8 matrix products cannot run (a GPU below sm_89)."""
    device = torch.device(device)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise ValueError(f"quantize='fp8' needs float8 matrix units: an NVIDIA GPU of compute capability 8.9 "
                             f"(Ada) or 9.0 (Hopper) or newer; {torch.cuda.get_device_name(device)} is "
                             f"sm_{cap[0]}{cap[1]}")
    elif device.type != "cpu":
        raise ValueError(f"quantize='fp8' runs on CUDA GPUs of compute capability 8.9 or newer (and on the CPU, "
                         f"emulated, for tests), not on {device.type!r}")


_DIRECT: dict = {}


def direct_output(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch writes a rowwise-scaled float8 product straight in ``dtype`` with the
    bias fused (early rowwise kernels wrote only bfloat16: then bfloat16 is written and cast,
    one more pass over the output). Probed once per device and dtype."""
    key = (str(device), dtype)
    if key not in _DIRECT:
        try:
            a = torch.ones(16, 16, device=device).to(FP8)
            out = torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=device),
                                   scale_b=torch.ones(1, 16, device=device),
                                   bias=torch.ones(16, device=device, dtype=dtype), out_dtype=dtype)
            _DIRECT[key] = bool(out.dtype == dtype and float(out[0, 0]) == 17.0)
        except (RuntimeError, NotImplementedError, ValueError):
            _DIRECT[key] = False
    return _DIRECT[key]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in e4m3, float32 scales (rows, 1)) with x ~= x_fp8 * scale, one scale per row of the 2-D ``x``."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=_TINY) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Float8Linear(torch.nn.Module):
    """``y = x @ W.T + b`` with ``W`` and ``x`` in float8 e4m3 (per-channel and per-row scales)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        if linear.in_features % 16 or linear.out_features % 16:
            raise ValueError(f"Float8Linear needs both sizes divisible by 16 (the float8 matrix units' rule); "
                             f"got {linear.in_features} -> {linear.out_features}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.__dict__["source"] = linear           # not a submodule: its weight is the original's
        self.bias = linear.bias                     # the same Parameter (shared with the original)
        q, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", q)                             # (out, in), row-major
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())   # (1, out)
        self._version = linear.weight._version
        # the dtype the product is written in directly (bias fused), else None: bfloat16, then cast
        w = linear.weight
        self.direct_dtype = w.dtype if direct_output(w.device, w.dtype) else None

    def refresh(self) -> bool:
        """Re-quantize from the original weight if it changed since (in place); returns whether it did."""
        w = self.source.weight
        if w._version == self._version and w.device == self.weight_fp8.device:
            return False
        q, scale = quantize_rows(w.detach())
        if q.device != self.weight_fp8.device:
            self.weight_fp8, self.weight_scale = q, scale.reshape(1, -1).contiguous()
        else:
            self.weight_fp8.copy_(q)
            self.weight_scale.copy_(scale.reshape(1, -1))
        self._version = w._version
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, scale = quantize_rows(x.reshape(-1, shape[-1]))
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if x.dtype == self.direct_dtype:
            y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale, bias=bias,
                                 out_dtype=x.dtype)
        else:
            y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                                 out_dtype=torch.bfloat16).to(x.dtype)
            if bias is not None:
                y = y + bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8 e4m3"

    def _apply(self, fn, recurse=True):
        # module.to(float16) would cast the float8 buffers too: keep their dtype, follow the device
        q, s = self.weight_fp8, self.weight_scale
        super()._apply(fn, recurse)
        self.weight_fp8 = q.to(self.weight_fp8.device)
        self.weight_scale = s.to(self.weight_fp8.device)
        return self


def _quantizable(name: str, module: torch.nn.Module) -> bool:
    """The transformer blocks' linear layers (time and class embeddings stay: a few rows each)."""
    return (isinstance(module, torch.nn.Linear) and ".transformer_blocks." in f".{name}."
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def quantize_unet(unet: torch.nn.Module, mode: str = "fp8") -> torch.nn.Module:
    """A shallow copy of ``unet`` whose transformer-block linear layers are ``Float8Linear``."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize={mode!r}: give one of {', '.join(QUANTIZE_MODES)} (or None for none)")
    targets = {name for name, m in unet.named_modules() if _quantizable(name, m)}
    if not targets:
        raise ValueError("quantize='fp8': this UNet has no linear layers of sizes divisible by 16 to quantize")
    parents = {name.rsplit(".", 1)[0] if "." in name else "" for name in targets}
    above = {p.rsplit(".", i)[0] for p in parents for i in range(p.count(".") + 1)} | {""} | parents

    def copy_tree(name: str, module: torch.nn.Module) -> torch.nn.Module:
        if name in targets:
            return Float8Linear(module)
        if name not in above:
            return module                          # the same object: shared with the original
        clone = copy.copy(module)
        clone.__dict__["_modules"] = {k: (copy_tree(f"{name}.{k}" if name else k, child) if child is not None
                                          else None) for k, child in module._modules.items()}
        return clone
    return copy_tree("", unet)


def float8_layers(module: torch.nn.Module) -> list[Float8Linear]:
    return [m for m in module.modules() if isinstance(m, Float8Linear)]


def refresh(module: torch.nn.Module) -> int:
    """Re-quantize the float8 layers whose original weights changed; returns how many did."""
    with torch.no_grad():
        return sum(m.refresh() for m in float8_layers(module))
