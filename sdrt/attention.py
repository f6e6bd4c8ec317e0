"""Cross-attention keys and values, computed once per conditioning instead of once per step.

In a UNet step the cross-attention layers project the text context into keys and values
(``to_k``, ``to_v``: 16 layers at SD 1.5, 77k x 768 -> 320..1280 each). The context is constant
for a whole generation (or, with prompt editing, for each span of steps), so those projections
repeat the same work every step. ``CrossAttentionKV`` installs a processor on every
cross-attention layer that looks the keys and values up by the context tensor's storage
(pointer, shape, dtype, and the very tensor object) among those ``precompute`` filled, and
falls back to computing them for any other context. With ``custom_kernel`` the attention itself
runs sdrt's cross-attention kernel (``kernels/cross_attention.cu``: queries read and outputs
written in the linear layers' layout, no transposes) instead of PyTorch's SDPA. Values are written into the same buffers each time, so a captured
CUDA graph that runs ``precompute`` in its prologue reads the new conditioning on every replay.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.dtype, t.device)


def _owner(t: torch.Tensor) -> torch.Tensor:
    """The tensor that owns ``t``'s memory: itself, or the base of a view (SDXL's text part of a
    context, or the view a layer passes on)."""
    return t if t._base is None else t._base


class CachedKVProcessor:
    """diffusers attention processor (the SDPA one) with precomputed keys and values for
    cross-attention. Layers with normalisations or masks it does not handle use ``fallback``."""

    def __init__(self, fallback, custom_kernel: bool = False):
        self.fallback, self.custom_kernel = fallback, custom_kernel
        self.table: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = self.misses = 0

    @staticmethod
    def plain(attn) -> bool:
        return (attn.spatial_norm is None and attn.group_norm is None and not attn.norm_cross
                and attn.norm_q is None and attn.norm_k is None and not attn.residual_connection)

    @staticmethod
    def project(attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) as (B, heads, L, head_dim)."""
        b = context.shape[0]
        k, v = attn.to_k(context), attn.to_v(context)
        d = k.shape[-1] // attn.heads
        return (k.view(b, -1, attn.heads, d).transpose(1, 2), v.view(b, -1, attn.heads, d).transpose(1, 2))

    def store(self, attn, context: torch.Tensor) -> None:
        k, v = self.project(attn, context)
        old = self.table.get(_key(context))
        owner = _owner(context)
        if old is not None and old[2]() is owner and old[0].shape == k.shape:   # same buffers: graph-safe
            old[0].copy_(k)
            old[1].copy_(v)
        else:
            self.table[_key(context)] = (k.contiguous(), v.contiguous(), weakref.ref(owner))

    @staticmethod
    def _kernel_fits(k: torch.Tensor, d: int) -> bool:
        from .kernels import cross_attention_fits
        return cross_attention_fits(k.shape[2], d, k.dtype, k.device)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        kv = None
        if encoder_hidden_states is not None and attention_mask is None:
            kv = self.table.get(_key(encoder_hidden_states))
            if kv is not None and kv[2]() is not _owner(encoder_hidden_states):   # same address, another tensor
                kv = None
        if kv is None or hidden_states.ndim != 3:
            self.misses += encoder_hidden_states is not None
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        self.hits += 1
        k, v = kv[0], kv[1]
        b = hidden_states.shape[0]
        q = attn.to_q(hidden_states)
        d = q.shape[-1] // attn.heads
        if self.custom_kernel and self._kernel_fits(k, d):
            from .kernels import cross_attention
            out = cross_attention(q.contiguous(), k, v, attn.heads, attn.scale)   # no transposes
        else:
            q = q.view(b, -1, attn.heads, d).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
            out = out.transpose(1, 2).reshape(b, -1, attn.heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


class CrossAttentionKV:
    """Installs ``CachedKVProcessor`` on a diffusers UNet's cross-attention layers."""

    def __init__(self, unet: torch.nn.Module, custom_kernel: bool = False, view=None):
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0
        self.layers, self.custom_kernel = [], custom_kernel
        # what the layers receive of a planned context (SDXL's contexts end with a pooled-text row)
        self.view = view or (lambda ctx: ctx)
        for module in unet.modules():
            if isinstance(module, Attention) and module.is_cross_attention and CachedKVProcessor.plain(module):
                proc = CachedKVProcessor(AttnProcessor2_0(), custom_kernel)
                module.set_processor(proc)
                self.layers.append((module, proc))
        if not self.layers:
            raise ValueError("the UNet has no plain cross-attention layers to cache keys and values for")

    def installed(self) -> bool:
        """Whether every layer still runs this cache's processor (another backend over the same
        modules may have replaced them)."""
        return all(attn.processor is proc for attn, proc in self.layers)

    @torch.inference_mode()
    def precompute(self, contexts) -> None:
        """Project every context once in every cross-attention layer (rows (N, L, C) each)."""
        for attn, proc in self.layers:
            for ctx in contexts:
                proc.store(attn, self.view(ctx))

    def discard(self, contexts) -> None:
        """Forget the keys and values of ``contexts`` (before their storage can be reused)."""
        for _, proc in self.layers:
            for ctx in contexts:
                proc.table.pop(_key(self.view(ctx)), None)

    def entries(self, contexts) -> list[torch.Tensor]:
        """The key and value buffers of ``contexts`` (a captured graph keeps them alive)."""
        return [t for _, proc in self.layers for ctx in contexts for t in proc.table.get(_key(self.view(ctx)), ())[:2]]

    @property
    def hits(self) -> int:
        return sum(p.hits for _, p in self.layers)

    @property
    def misses(self) -> int:
        return sum(p.misses for _, p in self.layers)

    @contextlib.contextmanager
    def scope(self, contexts):
        """Keys and values of ``contexts`` for the duration of one generation."""
        self.precompute(contexts)
        try:
            yield self
        finally:
            self.discard(contexts)
