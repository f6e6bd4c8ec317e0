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
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

BOS_ID, EOS_ID = 49406, 49407     # the stock CLIP vocabulary's; a model's own come from token_ids()
MAX_LENGTH = 77
CHUNK = MAX_LENGTH - 2  # tokens of text per 77-token window


def _bpe_vocab_path() -> Path:
    from .paths import package_folder
    override = os.environ.get("SDRT_CLIP_BPE")
    if override:
        return Path(override)
    folder = package_folder("open_clip")
    if folder is None:
        raise RuntimeError(
            "the CLIP vocabulary was not found: install it with "
            "`pip install --no-deps open_clip_torch==3.3.0` (only its data file is used), "
            "or point SDRT_CLIP_BPE at a bpe_simple_vocab_16e6.txt.gz")
    return folder / "bpe_simple_vocab_16e6.txt.gz"


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


OPENCLIP_PAD = "!"       # OpenCLIP (SD 2.x, SDXL's second encoder) pads with id 0, the byte token "!"


@functools.lru_cache(maxsize=None)
def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A ``transformers.CLIPTokenizer`` over the real CLIP vocabulary, 77 tokens. It pads with
    EOS (CLIP ViT-L: SD 1.x, SDXL's first encoder); ``pad_token=OPENCLIP_PAD`` gives OpenCLIP's
    tokenizer (SD 2.x, SDXL's second encoder), the same ids padded with 0."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=MAX_LENGTH,
                         pad_token=pad_token)


@dataclass(frozen=True)
class TokenIds:
    """The special token ids of a model's tokenizer, as the web UI uses them.

    Each 77-token window is ``[bos] + text + [eos] * fill + [eos]`` (SD 1.x: CLIP pads with its
    end token). A tokenizer whose pad token is not its end token (SD 2.x's OpenCLIP pads with id
    0) gets the web UI's OpenCLIP rule: every position after the first end token is the pad id,
    the last one included, which is also what its tokenizer gives with ``padding="max_length"``.
    """

    bos: int
    eos: int
    pad: int
    comma: int | None          # where long prompts may be split (None: never at a comma)

    @property
    def pads_after_end(self) -> bool:
        return self.pad != self.eos

    def window(self, ids: list[int]) -> list[int]:
        """One 77-token window around at most ``CHUNK`` text ids."""
        fill = CHUNK - len(ids)
        if self.pads_after_end:
            return [self.bos] + ids + [self.eos] + [self.pad] * fill
        return [self.bos] + ids + [self.eos] * (fill + 1)


_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_ids(tokenizer) -> TokenIds:
    """``tokenizer``'s start, end, pad and comma ids (cached per tokenizer object)."""
    try:
        return _IDS[tokenizer]
    except (KeyError, TypeError):
        pass
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError(f"the model's tokenizer ({type(tokenizer).__name__}) has no start or end token "
                         f"(bos {tokenizer.bos_token!r}, eos {tokenizer.eos_token!r}): not a CLIP tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    if comma is None or comma == getattr(tokenizer, "unk_token_id", None):
        comma = None
    ids = TokenIds(bos=int(bos), eos=int(eos), pad=int(pad), comma=None if comma is None else int(comma))
    try:
        _IDS[tokenizer] = ids
    except TypeError:               # not weak-referenceable: computed again next time
        pass
    return ids
