"""Prompt text to CLIP conditioning, as the web UI builds it.

Each piece of ``prompts.parse_attention`` is tokenized on its own and its tokens carry its
weight. Tokens fill windows of 75; each window becomes BOS + 75 + EOS = 77 ids, padded with EOS
(Stable Diffusion 1.x). A BREAK closes the current window. When a window fills while a comma
lies within the last ``comma_backtrack`` tokens, the text after that comma moves to the next
window. All texts of a request are padded with empty windows to the same count k, and the
encoder runs on every window, giving (77k, C) per text.

Emphasis "Original" multiplies each token's hidden state by its weight, then rescales the
window so its mean is unchanged; "No norm" only multiplies; "Ignore" drops the weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .prompts import parse_attention
from .tokenizer import BOS_ID, CHUNK, EOS_ID

EMPHASIS = ("Original", "No norm", "Ignore")
COMMA_BACKTRACK = 20


def _comma_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(",</w>")


def tokenize_weighted(tokenizer, text: str, comma_backtrack: int = COMMA_BACKTRACK):
    """``text`` -> list of windows, each (ids[77], weights[77])."""
    pieces = parse_attention(text)
    token_lists = tokenizer([p for p, _ in pieces], add_special_tokens=False, truncation=False).input_ids
    comma = _comma_id(tokenizer)
    windows: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    mults: list[float] = []
    last_comma = -1

    def close():
        nonlocal ids, mults, last_comma
        pad = CHUNK - len(ids)
        windows.append(([BOS_ID] + ids + [EOS_ID] * pad + [EOS_ID], [1.0] + mults + [1.0] * pad + [1.0]))
        ids, mults, last_comma = [], [], -1

    for tokens, (piece, weight) in zip(token_lists, pieces):
        if piece == "BREAK" and weight == -1.0:
            close()
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(ids)
            elif (comma_backtrack and len(ids) == CHUNK and last_comma != -1
                  and len(ids) - last_comma <= comma_backtrack):
                cut = last_comma + 1
                moved_ids, moved_mults = ids[cut:], mults[cut:]
                ids, mults = ids[:cut], mults[:cut]
                close()
                ids, mults = moved_ids, moved_mults
            if len(ids) == CHUNK:
                close()
            ids.append(token)
            mults.append(weight)
    if ids or not windows:
        close()
    return windows


def empty_window():
    return [BOS_ID] + [EOS_ID] * (CHUNK + 1), [1.0] * (CHUNK + 2)


def encode_texts(backend, tokenizer, texts, clip_skip: int, emphasis: str = "Original") -> dict[str, torch.Tensor]:
    """Encode each distinct text once: {text: (77k, C)}, all with the same k."""
    if emphasis not in EMPHASIS:
        raise ValueError(f"emphasis {emphasis!r} is unknown; valid: {', '.join(EMPHASIS)}")
    distinct = list(dict.fromkeys(texts))
    tokenized = [tokenize_weighted(tokenizer, t) for t in distinct]
    k = max(len(w) for w in tokenized)
    ids, mults = [], []
    for windows in tokenized:
        windows = windows + [empty_window()] * (k - len(windows))
        ids.append([i for w in windows for i in w[0]])
        mults.append([m for w in windows for m in w[1]])
    hidden = backend.encode_text(torch.tensor(ids, dtype=torch.long), clip_skip)     # (T, 77k, C)
    if emphasis != "Ignore":
        hidden = apply_emphasis(hidden, torch.tensor(mults, dtype=hidden.dtype, device=hidden.device), emphasis)
    return {t: hidden[i] for i, t in enumerate(distinct)}


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
