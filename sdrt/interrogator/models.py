"""The interrogator's networks: a BLIP captioner and a CLIP model (transformers' classes), their
tokenizers and the web UI's image preprocessing.

A model is a local folder with ``blip/`` and ``clip/`` subfolders in transformers' layout
(``save_pretrained``), or the two folders given apart, or a random model:
``random:interrogator-tiny`` (tests) and ``random:interrogator`` (the sizes the web UI runs:
BLIP base at 384 px, CLIP ViT-L/14 at 224 px), seeded, with the real CLIP tokenizer. Nothing
is downloaded.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..architectures import ModelError
from ..tokenizer import clip_tokenizer, clip_vocab_and_merges

# OpenAI CLIP's normalisation; the web UI normalises BLIP's input with it too
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_TINY_CLIP = dict(
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                     pad_token_id=49407),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8),
    projection_dim=32)
_TINY_BLIP = dict(
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     encoder_hidden_size=32),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=64, patch_size=16),
    projection_dim=32)
# what the web UI runs: BLIP base (ViT-B/16 at 384 px, a BERT-base decoder) and CLIP ViT-L/14
_FULL_CLIP = dict(
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                     pad_token_id=49407),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14),
    projection_dim=768)
_FULL_BLIP = dict(
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     encoder_hidden_size=768),
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=384, patch_size=16),
    projection_dim=512)
RANDOM_INTERROGATORS = {"interrogator-tiny": (_TINY_CLIP, _TINY_BLIP), "interrogator": (_FULL_CLIP, _FULL_BLIP)}


@dataclass
class InterrogatorModels:
    """A loaded interrogator: the networks (float32, CPU, eval), their tokenizers and hashes."""

    name: str
    clip: Any                  # transformers.CLIPModel
    clip_tokenizer: Any
    blip: Any                  # transformers.BlipForConditionalGeneration
    blip_tokenizer: Any
    clip_hash: str             # of the CLIP weights: what the term lists' features depend on
    blip_hash: str
    clip_mean: tuple = CLIP_MEAN
    clip_std: tuple = CLIP_STD

    @property
    def model_hash(self) -> str:
        return f"{self.clip_hash}-{self.blip_hash}"

    @property
    def clip_size(self) -> int:
        return int(self.clip.config.vision_config.image_size)

    @property
    def blip_size(self) -> int:
        return int(self.blip.config.vision_config.image_size)

    def clip_pixels(self, image: Image.Image) -> np.ndarray:
        """(1, 3, S, S) float32: OpenAI CLIP's preprocessing (the shorter side resized to S, bicubic,
        the centre S x S cropped, normalised), as torchvision computes it."""
        s = self.clip_size
        w, h = image.size
        if w <= h:
            size = (s, int(s * h / w))
        else:
            size = (int(s * w / h), s)
        resized = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        top, left = int(round((size[1] - s) / 2.0)), int(round((size[0] - s) / 2.0))
        return _pixels(resized.crop((left, top, left + s, top + s)), self.clip_mean, self.clip_std)

    def blip_pixels(self, image: Image.Image) -> np.ndarray:
        """(1, 3, S, S) float32: the web UI's BLIP input (stretched to S x S, bicubic, CLIP's
        normalisation)."""
        s = self.blip_size
        return _pixels(image.convert("RGB").resize((s, s), Image.Resampling.BICUBIC), CLIP_MEAN, CLIP_STD)


def _pixels(image: Image.Image, mean, std) -> np.ndarray:
    """(1, 3, H, W) float32 of an RGB image, scaled to [0, 1] and normalised per channel."""
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, 2, 0)[None])


@functools.lru_cache(maxsize=None)
def blip_tokenizer_from_clip_vocab():
    """A BERT-style WordPiece tokenizer over the words of the CLIP vocabulary (lower case), with
    BLIP's special tokens ([PAD] 0, [CLS], [SEP], [DEC] as the start of a caption). The BERT
    vocabulary BLIP ships is in no package that installs offline; a real BLIP folder brings its
    own ``vocab.txt`` and uses that."""
    from transformers import BertTokenizer

    vocab, _ = clip_vocab_and_merges()
    words, pieces = [], []
    for token in vocab:
        if token.startswith("<|"):
            continue
        whole = token.endswith("</w>")
        text = token[:-4] if whole else token
        if not text or text != text.lower() or "#" in text:
            continue
        words.append(text)
        if len(text) <= 3:                  # word endings and single letters: every word can be spelled
            pieces.append("##" + text)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    table = list(dict.fromkeys(specials + words + pieces)) + ["[DEC]", "[ENC]"]
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(table)}, do_lower_case=True, bos_token="[DEC]")
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def _seeded(build, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _prepare(module):
    return module.eval().requires_grad_(False).float()


def random_models(kind: str) -> InterrogatorModels:
    from transformers import BlipConfig, BlipForConditionalGeneration, CLIPConfig, CLIPModel

    from ..models import _randomize_norms, _weights_hash

    if kind not in RANDOM_INTERROGATORS:
        raise ModelError(f"random interrogator {kind!r} is unknown; valid: "
                         + ", ".join(f"random:{k}" for k in RANDOM_INTERROGATORS))
    clip_cfg, blip_cfg = RANDOM_INTERROGATORS[kind]
    btok = blip_tokenizer_from_clip_vocab()
    text = dict(blip_cfg["text_config"], vocab_size=len(btok), bos_token_id=btok.bos_token_id,
                sep_token_id=btok.sep_token_id, eos_token_id=btok.sep_token_id, pad_token_id=btok.pad_token_id)

    def build():
        clip = CLIPModel(CLIPConfig(**clip_cfg))
        blip = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=blip_cfg["vision_config"],
                                                       projection_dim=blip_cfg["projection_dim"]))
        for m in (clip, blip):
            _randomize_norms(m)
        return clip, blip
    clip, blip = _seeded(build)
    clip, blip = _prepare(clip), _prepare(blip)
    return InterrogatorModels(name=f"random:{kind}", clip=clip, clip_tokenizer=clip_tokenizer(), blip=blip,
                              blip_tokenizer=btok, clip_hash=_weights_hash(clip), blip_hash=_weights_hash(blip))


def _folder_hash(folder: Path) -> str:
    """sha256 over a transformers folder's config and weight files (their full digests)."""
    import hashlib

    from sdrt.export.build import file_digest
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin")
                                                                   or p.name == "config.json"))
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise ModelError(f"{str(folder)!r} has no weights (*.safetensors or *.bin)")
    for p in files:
        h.update(p.name.encode())
        h.update(file_digest(p).encode())
    return h.hexdigest()[:10]


def _has_tokenizer(folder: Path, files: tuple[str, ...]) -> bool:
    return (folder / "tokenizer.json").is_file() or all((folder / f).is_file() for f in files)


def _load_clip(folder: Path):
    from transformers import CLIPModel, CLIPTokenizer

    if not (folder / "config.json").is_file():
        raise ModelError(f"{str(folder)!r} is not a CLIP model in transformers' layout (no config.json)")
    clip = _prepare(CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=None))
    if _has_tokenizer(folder, ("vocab.json", "merges.txt")):
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    else:       # no tokenizer files (transformers would make an empty one): every OpenAI/OpenCLIP CLIP has this vocabulary
        tok = clip_tokenizer()
    mean, std = CLIP_MEAN, CLIP_STD
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return clip, tok, mean, std


def _load_blip(folder: Path):
    from transformers import AutoTokenizer, BlipForConditionalGeneration

    if not (folder / "config.json").is_file():
        raise ModelError(f"{str(folder)!r} is not a BLIP model in transformers' layout (no config.json)")
    if not _has_tokenizer(folder, ("vocab.txt",)):
        raise ModelError(f"{str(folder)!r}: BLIP's tokenizer files (tokenizer.json or vocab.txt) are missing")
    blip = _prepare(BlipForConditionalGeneration.from_pretrained(str(folder), local_files_only=True))
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"{str(folder)!r}: BLIP's tokenizer files are unreadable ({e})") from None
    return blip, tok


def load_models(model: str | Path | None = "random:interrogator-tiny", clip: str | Path | None = None,
                blip: str | Path | None = None) -> InterrogatorModels:
    """The interrogator's networks from ``model`` (``random:...`` or a folder with ``clip/`` and
    ``blip/``); ``clip``/``blip`` name the two folders apart (and override the model's)."""
    base = None
    if isinstance(model, str) and model.startswith("random:"):
        base = random_models(model[len("random:"):])
    elif model is not None:
        root = Path(model)
        if not root.is_dir():
            raise ModelError(f"interrogator model {str(model)!r} is neither a folder nor one of "
                             + ", ".join(f"random:{k}" for k in RANDOM_INTERROGATORS))
        clip, blip = clip or root / "clip", blip or root / "blip"
    if base is None and (clip is None or blip is None):
        raise ModelError("give an interrogator model folder (with clip/ and blip/), or both clip and blip folders")
    parts: dict[str, Any] = {}
    if clip is not None:
        c, tok, mean, std = _load_clip(Path(clip))
        parts.update(clip=c, clip_tokenizer=tok, clip_mean=mean, clip_std=std, clip_hash=_folder_hash(Path(clip)))
    if blip is not None:
        b, btok = _load_blip(Path(blip))
        parts.update(blip=b, blip_tokenizer=btok, blip_hash=_folder_hash(Path(blip)))
    if base is not None:
        return dataclasses.replace(base, **parts)
    name = str(model) if model is not None else f"{Path(clip).name}+{Path(blip).name}"
    return InterrogatorModels(name=name, **parts)
