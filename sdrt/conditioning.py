"""Text to CLIP input ids in 77-token windows, and encoding each distinct text once.

A text of n tokens becomes ceil(n / 75) windows (at least one), each BOS + 75 tokens + EOS,
padded with EOS as Stable Diffusion 1.x pads; every text of one request is padded to the
same number of windows, so their encodings stack to (B, 77k, C).
"""
from __future__ import annotations

import torch

from .tokenizer import BOS_ID, CHUNK, EOS_ID


def token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)


def to_windows(tokens: list[int], n_windows: int) -> list[int]:
    """tokens -> n_windows * 77 ids (BOS, 75 tokens padded with EOS, EOS per window)."""
    ids = []
    for w in range(n_windows):
        chunk = tokens[w * CHUNK:(w + 1) * CHUNK]
        ids += [BOS_ID] + chunk + [EOS_ID] * (CHUNK - len(chunk)) + [EOS_ID]
    return ids


def windows_needed(tokens: list[int]) -> int:
    return max(1, -(-len(tokens) // CHUNK))


def encode_texts(backend, tokenizer, texts: list[str], clip_skip: int) -> dict[str, torch.Tensor]:
    """Encode each distinct text once: {text: (77k, C)}, all with the same k."""
    distinct = list(dict.fromkeys(texts))
    tokens = [token_ids(tokenizer, t) for t in distinct]
    k = max(windows_needed(t) for t in tokens)
    ids = torch.tensor([to_windows(t, k) for t in tokens], dtype=torch.long)
    hidden = backend.encode_text(ids, clip_skip)
    return {t: hidden[i] for i, t in enumerate(distinct)}
