"""The PyTorch reference backend: the diffusers/transformers modules, eager, CPU or CUDA."""
from __future__ import annotations

import contextlib
import weakref

import torch

from ..conditioning import added_pooled_dim, unpack_added
from ..tokenizer import MAX_LENGTH
from . import check_text_input


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module


_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


# dynamo keeps its compiled entries per code object: every compiled UNet of one class (each batch
# size, resolution and weight layout; a float8 copy; a peer's copy in the benchmarks) counts
# against one limit, 8 by default. Past it dynamo silently runs that frame eagerly and compiles its
# callees one by one instead (seen in the GPU suite's rehearsal: the float8 layers then recompiled
# per layer). A server batching requests of many shapes needs more.
RECOMPILE_LIMIT = 64


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise dynamo's per-code-object recompile limit to at least ``limit`` (process-wide)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):        # the name before torch 2.6
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)
            break
    if getattr(cfg, "accumulated_recompile_limit", limit * 4) < limit * 4:
        cfg.accumulated_recompile_limit = limit * 4


def _compiled(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """One torch.compile wrapper per module and mode, shared by every backend on that module, so
    a second backend does not compile again."""
    allow_recompiles()
    per_mode = _COMPILED.setdefault(module, {})
    if mode not in per_mode:
        per_mode[mode] = torch.compile(module, mode=mode, dynamic=False)
    return per_mode[mode]


@contextlib.contextmanager
def _token_fixes(text_encoder: torch.nn.Module, fixes, windows: int):
    """While inside, ``text_encoder``'s token embeddings are replaced at the ``fixes`` (per input
    row: [(position in its 77k tokens, vectors (n, C))]) for the windows of those rows."""
    if not fixes or not any(fixes):
        yield
        return
    flat = [(r * windows + pos // MAX_LENGTH, pos % MAX_LENGTH, vec)
            for r, row in enumerate(fixes) for pos, vec in row]

    def hook(module, args, output):
        out = output.clone()
        for row, offset, vec in flat:
            k = min(int(vec.shape[0]), MAX_LENGTH - offset)
            out[row, offset:offset + k] = vec[:k].to(out.device, out.dtype)
        return out

    inner = getattr(text_encoder, "text_model", text_encoder)
    handle = inner.embeddings.token_embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# TorchBackend.tune's settings when nothing is tuned: tune(**UNTUNED) undoes every option
UNTUNED = dict(channels_last=False, cudnn_benchmark=False, sdpa_order=None, compile=False, quantize=False)

SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


class TorchBackend:
    """Runs the model's own modules; the reference every compiled backend is compared with."""

    graph_safe = True        # its CUDA work can be captured into a CUDA graph
    supports_weight_changes = True     # LoRA and VAE files change these modules' weights (sdrt.lora, sdrt.vae)
    supports_lora = True

    def __init__(self, components, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.text_encoder = _place(components.text_encoder, device, dtype)
        self.text_encoder_2 = (_place(components.text_encoder_2, device, dtype)
                               if components.text_encoder_2 is not None else None)
        self.pooled_dim = added_pooled_dim(components.unet.config)      # SDXL: contexts carry pooled text + sizes
        self._eager_unet = _place(components.unet, device, dtype)
        self._compile_mode = None
        self._quantized = None          # the float8 copy of the UNet (tune(quantize="fp8"); sdrt.quantize)
        # SDXL's VAE overflows float16 (NaN, black images): it decodes in float32, as diffusers'
        # force_upcast does and the web UI falls back to after a NaN; the other families' VAEs do not
        self.vae_dtype = torch.float32 if components.is_sdxl else dtype
        self.vae = _place(components.vae, device, self.vae_dtype)
        self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        self.num_text_layers = int(self.text_encoder.config.num_hidden_layers)
        # transformers 5 flattens CLIPTextModel; 4.x keeps the layers under .text_model
        inner = getattr(self.text_encoder, "text_model", self.text_encoder)
        self.final_layer_norm = inner.final_layer_norm
        self.kv = None
        self._reset_attention()
        self._sdpa_order = None

    def tune(self, channels_last: bool | None = None, cudnn_benchmark: bool | None = None,
             sdpa_order: tuple[str, ...] | None | str = "keep", compile: str | bool | None = None,
             quantize: str | bool | None = None) -> bool:
        """Speed options, each measured on a GPU by benchmarks/gpu/run.py (unet_levers):

        - ``channels_last``: the UNet's and VAE's weights in NHWC (cuDNN's fast convolution
          layout). This replaces the weight tensors, so CUDA graphs captured before are invalid:
          ``Pipeline.tune`` drops them.
        - ``cudnn_benchmark``: ``torch.backends.cudnn.benchmark`` (process-wide): cuDNN times its
          convolution algorithms per shape on first use.
        - ``sdpa_order``: the order in which PyTorch's SDPA backends are tried in the UNet and VAE,
          names from ``SDPA_BACKENDS`` (e.g. ``("cudnn", "flash", "efficient", "math")``); None is
          PyTorch's own order.
        - ``compile``: a ``torch.compile`` mode for the UNet (e.g. ``"default"``,
          ``"max-autotune-no-cudagraphs"``; sdrt captures its own CUDA graphs), False for eager.
          Compilation happens on the first call (minutes for SD 1.5). Not with the cross-attention
          K/V cache, whose lookups dynamo cannot trace.
        - ``quantize``: ``"fp8"`` runs the UNet's transformer-block linear layers in float8 e4m3
          (``sdrt.quantize``: per-channel weight and per-row activation scales, ``torch._scaled_mm``)
          on a shallow copy of the UNet, so other users of the modules keep float16; False for none.
          Needs a GPU of compute capability 8.9 or newer (refused below); emulated on a CPU. Best
          with ``compile``, which fuses the activations' scaling into the neighbouring kernels.

        Arguments left out keep their setting. Returns whether captured graphs are invalid (the
        weights were replaced or the UNet's code changed)."""
        if sdpa_order not in ("keep", None):
            unknown = [n for n in sdpa_order if n not in SDPA_BACKENDS]
            if unknown or not sdpa_order or isinstance(sdpa_order, str):
                raise ValueError(f"sdpa_order {sdpa_order!r}: give a sequence of {', '.join(SDPA_BACKENDS)}")
        if compile and self.kv is not None:
            raise ValueError("compile: turn the cross-attention K/V cache off first (enable_kv_cache(False)); "
                             "dynamo cannot trace its lookups")
        if compile not in (None, False) and not isinstance(compile, str):
            raise ValueError(f"compile={compile!r}: give a torch.compile mode such as 'default', or False")
        if quantize not in (None, False) and quantize != self.quantize:
            from ..quantize import QUANTIZE_MODES, check_fp8_device
            if quantize not in QUANTIZE_MODES:
                raise ValueError(f"quantize={quantize!r}: give one of {', '.join(QUANTIZE_MODES)}, or False")
            check_fp8_device(self.device)
        moved = False
        if quantize is not None and (quantize or None) != self.quantize:
            kv = self.kv
            if kv is not None:
                self.enable_kv_cache(False)
            from ..quantize import quantize_unet
            self._quantized = quantize_unet(self._eager_unet, quantize) if quantize else None
            if kv is not None:
                self.enable_kv_cache(True, kv.custom_kernel)
            moved = True
        if channels_last is not None and channels_last != self.channels_last:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            self._eager_unet.to(memory_format=fmt)
            self.vae.to(memory_format=fmt)
            moved = True
        if compile is not None and (compile or None) != self._compile_mode:
            self._compile_mode = compile or None
            moved = True
        if cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
        if sdpa_order != "keep":
            self._sdpa_order = tuple(sdpa_order) if sdpa_order is not None else None
        return moved

    @property
    def unet_module(self) -> torch.nn.Module:
        """The UNet as called: the module itself, or its torch.compile wrapper (``tune``)."""
        tree = self._tree
        return _compiled(tree, self._compile_mode) if self._compile_mode else tree

    @property
    def _tree(self) -> torch.nn.Module:
        """The UNet's modules as run: the model's own, or their float8 copy."""
        return self._quantized if self._quantized is not None else self._eager_unet

    @property
    def quantize(self) -> str | None:
        return "fp8" if self._quantized is not None else None

    def sync_weights(self, part: str, lora_state=None) -> None:
        """After LoRA merges into the original weights: re-quantize the float8 layers that changed."""
        if part == "unet" and self._quantized is not None:
            from ..quantize import refresh
            refresh(self._quantized)

    @property
    def options(self) -> dict:
        """The speed options in force (see ``tune``)."""
        return dict(channels_last=self.channels_last, cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
                    sdpa_order=self._sdpa_order, compile=self._compile_mode, quantize=self.quantize)

    @property
    def channels_last(self) -> bool:
        """Whether the UNet's weights are in NHWC now (read off the weights: other backends on
        the same modules may have changed them)."""
        w = self._eager_unet.conv_in.weight
        return bool(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous())

    def _attention_order(self):
        if self._sdpa_order is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[n]) for n in self._sdpa_order], set_priority=True)

    def _reset_attention(self) -> None:
        """Give every layer that another backend on these modules left cached K/V the plain
        SDPA processor again."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        from ..attention import CachedKVProcessor
        trees = [self._eager_unet] + ([self._quantized] if self._quantized is not None else [])
        for module in (m for tree in trees for m in tree.modules()):
            if isinstance(getattr(module, "processor", None), CachedKVProcessor):
                module.set_processor(AttnProcessor2_0())

    def enable_kv_cache(self, enabled: bool = True, custom_kernel: bool = False) -> None:
        """Compute cross-attention keys and values once per conditioning (``sdrt.attention``);
        ``custom_kernel`` also runs the attention on sdrt's cross-attention kernel (CUDA)."""
        from ..attention import CrossAttentionKV
        if enabled and self._compile_mode:
            raise ValueError("the cross-attention K/V cache does not work under torch.compile (dynamo cannot "
                             "trace its lookups): tune(compile=False) first")
        if enabled and (self.kv is None or not self.kv.installed() or self.kv.custom_kernel != custom_kernel):
            self.kv = CrossAttentionKV(self._tree, custom_kernel, view=self.text_view)
        elif not enabled:
            self._reset_attention()
            self.kv = None

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor, clip_skip: int = 1, encoder: int = 0, pooled: bool = False,
                    fixes=None):
        """input_ids: (B, 77k) -> hidden states (B, 77k, C); each 77-token window is encoded
        on its own. clip_skip n > 1 takes the hidden state n layers from the end, then the
        final layer norm. SDXL (``encoder`` 0 or 1): the penultimate layer without the final
        norm, whatever clip_skip says (the web UI's default); ``pooled=True`` also returns the
        encoder's pooled projection of each row's first window, (B, P). ``fixes``: per row,
        ``[(position, vectors (n, C))]``: textual-inversion vectors read in place of the token
        embeddings from that position on (the web UI's EmbeddingsWithFixes)."""
        b, n = input_ids.shape
        windows = check_text_input(input_ids, clip_skip, self.num_text_layers)
        ids = input_ids.reshape(b * windows, MAX_LENGTH).to(self.device)
        module = self.text_encoder if encoder == 0 else self.text_encoder_2
        if module is None or encoder not in (0, 1):
            raise ValueError(f"text encoder {encoder} does not exist in this model")
        with _token_fixes(module, fixes, windows):
            if self.pooled_dim is not None:
                out = module(ids, output_hidden_states=True)
                hidden = out.hidden_states[-2]
            else:
                out = module(ids, output_hidden_states=clip_skip > 1)
                hidden = self.final_layer_norm(out.hidden_states[-clip_skip]) if clip_skip > 1 else out.last_hidden_state
        hidden = hidden.reshape(b, n, hidden.shape[-1])
        if not pooled:
            return hidden
        if not hasattr(out, "text_embeds"):
            raise ValueError(f"text encoder {encoder} has no pooled projection")
        return hidden, out.text_embeds.reshape(b, windows, -1)[:, 0]

    def text_view(self, context: torch.Tensor) -> torch.Tensor:
        """The part of a (rows, L, C) context the cross-attention layers read (SDXL's contexts end
        with the pooled-text row, ``sdrt.conditioning.pack_added``)."""
        return context if self.pooled_dim is None else context[:, :-1]

    @torch.inference_mode()
    def unet(self, sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        context = context.to(self.dtype)
        kwargs = {}
        if self.pooled_dim is not None:
            context, pooled, time_ids = unpack_added(context, self.pooled_dim)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        with self._attention_order():
            return self.unet_module(sample.to(self.dtype), t, encoder_hidden_states=context, return_dict=False,
                                    **kwargs)[0]

    def set_tiling(self, enabled: bool) -> bool:
        """Circular padding in every convolution of the UNet and the VAE (the web UI's
        ``apply_circular``): images that tile seamlessly. Returns whether it changed (captured
        CUDA graphs of the other mode are then invalid)."""
        mode = "circular" if enabled else "zeros"
        changed = False
        for module in (self._eager_unet, self.vae):
            for m in module.modules():
                if isinstance(m, torch.nn.Conv2d) and m.padding_mode != mode:
                    m.padding_mode = mode
                    changed = True
        return changed

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> the VAE posterior's moments (B, 2C, h, w): mean then
        log-variance, unscaled, float32 (the pipeline samples and scales: sdrt.img2img)."""
        if self.vae.post_quant_conv.weight.dtype != self.vae_dtype:
            self.vae.to(self.vae_dtype)
        with self._attention_order():
            posterior = self.vae.encode(images.to(self.device, self.vae_dtype), return_dict=False)[0]
        return posterior.parameters.float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae.post_quant_conv.weight.dtype != self.vae_dtype:    # a shared module another pipeline cast
            self.vae.to(self.vae_dtype)
        with self._attention_order():
            out = self.vae.decode(latents.to(self.vae_dtype) / self.scaling_factor, return_dict=False)[0]
        return out.float()
