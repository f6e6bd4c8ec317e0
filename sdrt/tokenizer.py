"""The CLIP BPE tokenizer of Stable Diffusion 1.x, built offline.

The vocabulary comes from ``open_clip/bpe_simple_vocab_16e6.txt.gz``, which ships inside the
``open_clip_torch`` wheel (installed without its dependencies; the package is never imported,
only its data file is read). The vocabulary and merges are derived exactly as CLIP's
``SimpleTokenizer`` does, which gives the same ids as the ``openai/clip-vit-large-patch14``
tokenizer that Stable Diffusion 1.x ships.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from pathlib import Path

BOS_ID, EOS_ID = 49406, 49407
MAX_LENGTH = 77
CHUNK = MAX_LENGTH - 2  # tokens of text per 77-token window


def _bpe_vocab_path() -> Path:
    override = os.environ.get("SDRT_CLIP_BPE")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the CLIP vocabulary was not found: install it with "
            "`pip install --no-deps open_clip_torch==3.3.0` (only its data file is used), "
            "or point SDRT_CLIP_BPE at a bpe_simple_vocab_16e6.txt.gz")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_vocab_and_merges(path: str | Path | None = None) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of CLIP's BPE: 256 byte tokens, their ``</w>`` forms, 48894 merges,
    then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407)."""
    path = Path(path) if path else _bpe_vocab_path()
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    base = _bytes_to_unicode()
    tokens = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=None)
def clip_tokenizer():
    """A ``transformers.CLIPTokenizer`` over the real CLIP vocabulary (pads with EOS, 77 tokens)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=MAX_LENGTH,
                         pad_token="<|endoftext|>")
