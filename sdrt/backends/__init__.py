"""Backends run the networks; the denoising loop never asks which one it has.

A backend implements::

    encode_text(input_ids, clip_skip, encoder=0, pooled=False, fixes=None) -> (B, 77k, C)
        # input_ids (B, 77k) int64; SDXL: encoder 0 or 1, pooled=True also returns (B, P);
        # fixes: textual-inversion vectors per row, [(position, vectors)]
    unet(sample, t, context) -> model output (eps or v), same shape as sample
        # SDXL's context ends with a row of pooled text and size values (conditioning.pack_added)
    decode(latents) -> (B, 3, 8h, 8w) float32 in [-1, 1]

and exposes ``device`` (a torch.device) and ``dtype`` (the networks' torch dtype). Optional:
``supports_lora`` with ``sync_weights(part, lora_state)`` (a compiled backend that takes LoRA-merged
weights), ``supports_weight_changes`` (its networks are the torch modules: LoRA and VAE files apply).
"""
from __future__ import annotations

import logging
from typing import Protocol

import torch

from ..paths import cache_root, default_engine_dir  # noqa: F401 - their old home

BACKENDS = ("torch", "onnxruntime", "tensorrt")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
ALIGNMENT = 256        # bytes: what TensorRT requires of every tensor address (CUDA allocations have it)


class Backend(Protocol):
    device: torch.device
    dtype: torch.dtype

    def encode_text(self, input_ids: torch.Tensor, clip_skip: int, encoder: int = 0, pooled: bool = False,
                    fixes=None): ...
    def unet(self, sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor: ...
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def aligned_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty contiguous tensor whose address is a multiple of ``ALIGNMENT`` bytes (a buffer that a
    compiled backend binds by address and keeps across calls)."""
    size = torch.empty((), dtype=dtype).element_size()
    n = 1
    for d in shape:
        n *= int(d)
    with torch.inference_mode(False):     # a normal tensor: the eager loop writes it in place too
        raw = torch.empty(n * size + ALIGNMENT, dtype=torch.uint8, device=device)
        offset = -raw.data_ptr() % ALIGNMENT
        return raw[offset:offset + n * size].view(dtype).view(tuple(shape))


def build_log(message: str) -> None:
    """Where a backend's on-demand build reports (logger ``sdrt.backends``; "up to date" at debug)."""
    logger = logging.getLogger("sdrt.backends")
    (logger.debug if message.endswith("up to date") else logger.info)(message)


def parse_device(device) -> torch.device:
    """``device`` as a torch.device, checking that a requested GPU exists."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is invalid; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        if dev.index is None:      # "cuda" is the current device: name it, so it equals tensors' devices
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_target(name: str, device, dtype) -> tuple[torch.device, torch.dtype]:
    """Validate backend name, device and dtype (before any weights are loaded)."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is unknown; valid backends: {', '.join(BACKENDS)}")
    dev, dt = parse_device(device), parse_dtype(dtype)
    if name == "tensorrt" and dev.type != "cuda":
        raise ValueError("backend 'tensorrt' needs a CUDA device (device='cuda'); on a CPU use "
                         "backend='onnxruntime' or 'torch'")
    if dt == torch.float16 and dev.type == "cpu":
        raise ValueError("dtype 'float16' needs a CUDA device; on a CPU use dtype='float32'")
    return dev, dt


def sync(device) -> None:
    """Wait for a CUDA device's queued work (for timing); nothing on a CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def check_text_input(input_ids: torch.Tensor, clip_skip: int, num_layers: int) -> int:
    """Validate encode_text's arguments; returns the number of 77-token windows."""
    from ..tokenizer import MAX_LENGTH
    n = input_ids.shape[1]
    if n % MAX_LENGTH:
        raise ValueError(f"input_ids length {n} is not a multiple of {MAX_LENGTH}")
    if not 1 <= clip_skip <= num_layers:
        raise ValueError(f"clip_skip must be in 1..{num_layers}, got {clip_skip}")
    return n // MAX_LENGTH


def token_embeddings(text_encoder, ids: torch.Tensor, fixes, windows: int) -> torch.Tensor:
    """(rows, 77, C) float32 token embeddings of ``ids`` (rows, 77) from ``text_encoder``'s table,
    with textual-inversion vectors in place: ``fixes`` per input row (each ``windows`` rows of
    ``ids``), ``[(position in its 77k tokens, vectors (n, C))]``. What a compiled text encoder
    that takes its token embeddings as an input (``*_embeds``) is given."""
    from ..tokenizer import MAX_LENGTH
    table = getattr(text_encoder, "text_model", text_encoder).embeddings.token_embedding.weight.detach()
    out = table[ids.to(table.device)].float()
    for r, row in enumerate(fixes):
        for pos, vec in row:
            offset = pos % MAX_LENGTH
            k = min(int(vec.shape[0]), MAX_LENGTH - offset)
            out[r * windows + pos // MAX_LENGTH, offset:offset + k] = vec[:k].float().to(out.device)
    return out


class AddedInputs:
    """SDXL's packed context (``conditioning.pack_added``) split into the compiled UNet's three
    inputs, copied into buffers kept per shape and dtype (aligned and contiguous: engines bind them
    by address, and a captured CUDA graph copies into the same ones) instead of new tensors at
    every step."""

    def __init__(self, pooled_dim: int, device: torch.device):
        self.pooled_dim, self.device = pooled_dim, device
        self._buffers: dict[tuple, tuple] = {}

    def __call__(self, context: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        from ..conditioning import unpack_added
        parts = unpack_added(context, self.pooled_dim)
        key = (tuple(context.shape), dtype)
        buffers = self._buffers.get(key)
        if buffers is None:
            with torch.inference_mode(False):
                buffers = self._buffers[key] = tuple(aligned_empty(p.shape, dtype, self.device) for p in parts)
        for buffer, part in zip(buffers, parts):
            buffer.copy_(part)
        return dict(zip(("encoder_hidden_states", "text_embeds", "time_ids"), buffers))


def check_profile_request(profile, size_multiple: int, engine_dir, batch_size: int, height: int, width: int) -> None:
    """Raise before any network runs when a request lies outside a compiled profile."""
    problem = profile.covers(batch_size, height, width, profile.windows[0])
    if problem is None and (height % size_multiple or width % size_multiple):
        problem = (f"the exported UNet takes sizes that are multiples of {size_multiple} px "
                   f"(one per downsampling level)")
    if problem:
        raise ValueError(f"request {batch_size}x{height}x{width} (images x height x width): {problem}; "
                         f"the engines in {engine_dir} were built for {profile.describe()}; "
                         "rebuild with `sdrt build ... --min/--max` to cover it")


def check_folder_tiling(enabled: bool, built: bool, engine_dir) -> None:
    """A compiled folder built with circular padding (``sdrt build --tiling``) makes only tiling
    images, and one without it only others: the request is refused, naming the flag."""
    if bool(enabled) != bool(built):
        raise ValueError(f"tiling={bool(enabled)}, but the engine folder {engine_dir} was built "
                         + ("with" if built else "without") + " circular padding; build one "
                         + ("without" if built else "with") + " `sdrt build --tiling` for these images")


def check_profile_windows(profile, engine_dir, windows: int) -> None:
    lo, _, hi = profile.windows
    if not lo <= windows <= hi:
        raise ValueError(f"the prompt needs {windows} text windows of 77 tokens; the engines in "
                         f"{engine_dir} were built for {lo}..{hi} ({profile.describe()})")


def require_onnxruntime() -> None:
    """ValueError naming the packages when onnx or onnxruntime is missing (before any build)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ValueError(f"backend 'onnxruntime' needs the packages onnx and onnxruntime "
                         f"(pip install -e '.[onnx]'): {e}") from None


def create_backend(name: str, components, device, dtype, engine_dir=None) -> Backend:
    """The backend called ``name`` for a loaded model."""
    dev, dt = check_target(name, device, dtype)
    if name == "torch":
        from .torch_backend import TorchBackend
        return TorchBackend(components, dev, dt)
    if name == "onnxruntime":
        require_onnxruntime()
        from .onnxruntime_backend import OnnxRuntimeBackend
        return OnnxRuntimeBackend(components, dev, dt, engine_dir)
    if name == "tensorrt":
        from sdrt.export.tensorrt import require_tensorrt

        from .tensorrt_backend import TensorRTBackend
        try:
            trt = require_tensorrt()
        except RuntimeError as e:          # not installed: a usage error naming the package
            raise ValueError(f"backend 'tensorrt': {e}") from None
        return TensorRTBackend(components, dev, dt, engine_dir, trt=trt)
    raise ValueError(f"backend {name!r} is unknown; valid backends: {', '.join(BACKENDS)}")
