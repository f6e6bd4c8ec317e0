"""Prompt text to CLIP conditioning, as the web UI builds it.

Each piece of ``prompts.parse_attention`` is tokenized on its own and its tokens carry its
weight. Tokens fill windows of 75; each window becomes BOS + 75 + EOS = 77 ids, with the start,
end and pad ids of the model's own tokenizer (``tokenizer.token_ids``): padded with EOS for SD 1.x,
and for a tokenizer that pads with another id (SD 2.x's OpenCLIP, id 0) every position after the
first EOS is that id, as the web UI does it. A BREAK closes the current window. When a window fills while a comma
lies within the last ``comma_backtrack`` tokens, the text after that comma moves to the next
window. All texts of a request are padded with empty windows to the same count k, and the
encoder runs on every window, giving (77k, C) per text.

Emphasis "Original" multiplies each token's hidden state by its weight, then rescales the
window so its mean is unchanged; "No norm" only multiplies; "Ignore" drops the weights.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .prompts import parse_attention
from .tokenizer import CHUNK, MAX_LENGTH, token_ids

EMPHASIS = ("Original", "No norm", "Ignore")
ENCODE_WINDOWS = 64        # 77-token sequences per text-encoder call (alternation can give a text per step)
COMMA_BACKTRACK = 20


def tokenize_weighted(tokenizer, text: str, comma_backtrack: int = COMMA_BACKTRACK, embeddings=None):
    """``text`` -> list of windows, each (ids[77], weights[77]). A request's texts are tokenized
    several times on their way (the server's bounds, the batcher's window count, the encoder),
    so the result is cached per tokenizer and text (the lists returned are fresh copies)."""
    return tokenize_with_embeddings(tokenizer, text, comma_backtrack, embeddings)[0]


def tokenize_with_embeddings(tokenizer, text: str, comma_backtrack: int = COMMA_BACKTRACK, embeddings=None):
    """(windows, fixes): the windows of ``tokenize_weighted`` and where textual-inversion
    embeddings (``sdrt.embeddings.EmbeddingLibrary``) stand: ``[(window, offset, name)]``, the
    offset counting the window's start token."""
    version = embeddings.version if embeddings is not None else 0
    windows, fixes = _tokenize_cached(tokenizer, text, comma_backtrack, embeddings, version)
    return [(list(ids), list(weights)) for ids, weights in windows], list(fixes)


@functools.lru_cache(maxsize=512)
def _tokenize_cached(tokenizer, text: str, comma_backtrack: int, embeddings, version: int) -> tuple:
    windows, fixes = _tokenize(tokenizer, text, comma_backtrack, embeddings)
    return tuple((tuple(ids), tuple(w)) for ids, w in windows), tuple(fixes)


def _tokenize(tokenizer, text: str, comma_backtrack: int, embeddings=None):
    pieces = parse_attention(text)
    token_lists = tokenizer([p for p, _ in pieces], add_special_tokens=False, truncation=False).input_ids
    special = token_ids(tokenizer)
    comma = special.comma
    windows: list[tuple[list[int], list[float]]] = []
    fixes: list[tuple[int, int, str]] = []          # (window, offset in it counting the start token, name)
    ids: list[int] = []
    mults: list[float] = []
    pending: list[tuple[int, str]] = []             # this window's embeddings: (index in ids, name)
    last_comma = -1

    def close():
        nonlocal ids, mults, last_comma, pending
        pad = CHUNK - len(ids)
        fixes.extend((len(windows), at + 1, name) for at, name in pending)
        windows.append((special.window(ids), [1.0] + mults + [1.0] * pad + [1.0]))
        ids, mults, last_comma, pending = [], [], -1, []

    for tokens, (piece, weight) in zip(token_lists, pieces):
        if piece == "BREAK" and weight == -1.0:
            close()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if comma is not None and token == comma:
                last_comma = len(ids)
            elif (comma_backtrack and len(ids) == CHUNK and last_comma != -1
                  and len(ids) - last_comma <= comma_backtrack):
                cut = last_comma + 1
                moved_ids, moved_mults = ids[cut:], mults[cut:]
                # embeddings after the cut move with their placeholders (the web UI leaves them
                # behind, pointing at the old window's padding)
                moved = [(at - cut, name) for at, name in pending if at >= cut]
                pending = [(at, name) for at, name in pending if at < cut]
                ids, mults = ids[:cut], mults[:cut]
                close()
                ids, mults, pending = moved_ids, moved_mults, moved
            if len(ids) == CHUNK:
                close()
            emb, n_tokens = embeddings.find(tokens, position) if embeddings is not None else (None, None)
            if emb is None:
                ids.append(token)
                mults.append(weight)
                position += 1
                continue
            if len(ids) + emb.count > CHUNK:
                close()
            pending.append((len(ids), emb.name))
            ids.extend([0] * emb.count)                  # placeholders; the encoder reads the vectors there
            mults.extend([weight] * emb.count)
            position += n_tokens
    if ids or not windows:
        close()
    return windows, fixes


def empty_window(tokenizer):
    """The window of an empty text (what shorter texts are padded with)."""
    return token_ids(tokenizer).window([]), [1.0] * (CHUNK + 2)


def encode_texts(backend, tokenizer, texts, clip_skip: int, emphasis: str = "Original",
                 encoder: int = 0, pooled: bool = False, embeddings=None, used: set | None = None) -> dict:
    """Encode each distinct text once: {text: (77k, C)}, all with the same k. ``encoder``: which
    of the backend's text encoders (SDXL has two); ``pooled``: also its pooled projection of the
    first window, {text: ((77k, C), (P,))} (the web UI's ``zs[0].pooled``). ``embeddings``: the
    textual-inversion embeddings the texts may name (their names are added to ``used``)."""
    if emphasis not in EMPHASIS:
        raise ValueError(f"emphasis {emphasis!r} is unknown; valid: {', '.join(EMPHASIS)}")
    distinct = list(dict.fromkeys(texts))
    tokenized = [tokenize_with_embeddings(tokenizer, t, embeddings=embeddings) for t in distinct]
    k = max(len(w) for w, _ in tokenized)
    ids, mults, fixes = [], [], []
    for windows, text_fixes in tokenized:
        windows = windows + [empty_window(tokenizer)] * (k - len(windows))
        ids.append([i for w in windows for i in w[0]])
        mults.append([m for w in windows for m in w[1]])
        fixes.append([(w * MAX_LENGTH + offset, embeddings.loaded[name].vectors[encoder])
                      for w, offset, name in text_fixes])
        if used is not None:
            used.update(name for _, _, name in text_fixes)
    out = {}
    per_call = max(1, ENCODE_WINDOWS // k)      # bounded activations: at most ENCODE_WINDOWS sequences per call
    for start in range(0, len(distinct), per_call):
        end = start + per_call
        # only what differs from the defaults: a backend of the SD 1.x protocol needs no more
        extra = {k: v for k, v in (("encoder", encoder), ("pooled", pooled),
                                   ("fixes", fixes[start:end] if any(fixes[start:end]) else None)) if v}
        got = backend.encode_text(torch.tensor(ids[start:end], dtype=torch.long), clip_skip, **extra)
        hidden, pool = got if pooled else (got, None)          # (t, 77k, C), (t, P)
        if emphasis != "Ignore":
            weights = torch.tensor(mults[start:end], dtype=hidden.dtype, device=hidden.device)
            hidden = apply_emphasis(hidden, weights, emphasis)
        out.update({t: (hidden[i], pool[i]) if pooled else hidden[i] for i, t in enumerate(distinct[start:end])})
    return out


# ---------------------------------------------------------------------------- SDXL

TIME_IDS = 6       # SDXL's size conditioning: original (h, w), crop (top, left), target (h, w)


def encode_texts_sdxl(backend, tokenizers, texts, emphasis: str = "Original", embeddings=None,
                      used: set | None = None) -> dict:
    """SDXL, as the web UI's conditioner builds it: each encoder tokenizes the text itself (CLIP
    pads with its end token, OpenCLIP with 0), runs its penultimate layer and applies the
    emphasis to its own output; the two are concatenated per token, and the second encoder's
    pooled projection of the first window is the pooled text. CLIP skip does not apply (the web
    UI's default: ``sdxl_clip_l_skip`` off). Returns {text: ((77k, C1 + C2), (P,))}."""
    first = encode_texts(backend, tokenizers[0], texts, 1, emphasis, encoder=0, embeddings=embeddings, used=used)
    second = encode_texts(backend, tokenizers[1], texts, 1, emphasis, encoder=1, pooled=True, embeddings=embeddings)
    return {t: (torch.cat([first[t], second[t][0]], dim=-1), second[t][1]) for t in first}


def sdxl_time_ids(height: int, width: int, crop_top: int = 0, crop_left: int = 0) -> list[float]:
    """The web UI's size conditioning for txt2img: original and target size are the image size,
    the crop its ``sdxl_crop_top`` / ``sdxl_crop_left`` options (0)."""
    return [float(height), float(width), float(crop_top), float(crop_left), float(height), float(width)]


def pack_added(hidden: torch.Tensor, pooled: torch.Tensor, time_ids) -> torch.Tensor:
    """One SDXL model call's conditioning as one tensor, so that everything that moves contexts
    (prompt editing schedules, the batcher, the static loop's buffers) moves it unchanged:
    the (77k, C) text hidden states, then one row holding the pooled text (P) and the six size
    values. ``unpack_added`` splits it again inside a backend."""
    c = hidden.shape[-1]
    p = pooled.shape[-1]
    if p + TIME_IDS > c:
        raise ValueError(f"pooled text ({p}) and size conditioning ({TIME_IDS}) do not fit a context row of {c}")
    row = torch.zeros((1, c), dtype=hidden.dtype, device=hidden.device)
    row[0, :p] = pooled.to(hidden.dtype)
    row[0, p:p + TIME_IDS] = torch.as_tensor(time_ids, dtype=hidden.dtype)
    return torch.cat([hidden, row])


def unpack_added(context: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 77k + 1, C) -> text hidden states (B, 77k, C) (a view), pooled text (B, P), size values (B, 6)."""
    row = context[:, -1]
    return context[:, :-1], row[:, :pooled_dim], row[:, pooled_dim:pooled_dim + TIME_IDS]


def added_pooled_dim(unet_config) -> int | None:
    """The pooled text width of an SDXL UNet (None for a UNet without size conditioning)."""
    if getattr(unet_config, "addition_embed_type", None) != "text_time":
        return None
    return int(unet_config.projection_class_embeddings_input_dim) - TIME_IDS * int(unet_config.addition_time_embed_dim)


def apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor, emphasis: str = "Original") -> torch.Tensor:
    """hidden: (T, 77k, C), weights: (T, 77k). "Original" keeps each 77-token window's mean."""
    if bool((weights == 1.0).all()):
        return hidden
    t, n, c = hidden.shape
    z = hidden.reshape(t, n // 77, 77, c)
    w = weights.reshape(t, n // 77, 77, 1)
    out = z * w
    if emphasis == "Original":
        original = z.float().mean(dim=(2, 3), keepdim=True)
        new = out.float().mean(dim=(2, 3), keepdim=True)
        # the web UI divides without a guard; a window whose mean becomes exactly 0 is left as is
        ratio = torch.where(new == 0, 1.0, original / new)
        out = out * ratio.to(out.dtype)
    return out.reshape(t, n, c)


@dataclass
class Conditioning:
    """The encode stage's output: the text conditioning of every model call.

    conds: per image, its ``AND`` parts as ``(weight, schedule)``; uncond: per image, a schedule.
    A schedule is ``[(end_at_model_call, context (77k, C))]``, the web UI's prompt editing.
    """

    conds: list
    uncond: list
    seconds: float               # the text encoder's time
    started: float               # perf_counter when the generation started (for timings["total"])

    @property
    def plain(self) -> bool:
        """One part of weight 1 per image (no ``AND``): what the static loop runs."""
        return all(len(parts) == 1 and parts[0][0] == 1.0 for parts in self.conds)
