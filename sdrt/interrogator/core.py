"""``sdrt.Interrogator``: an image back to a prompt, as the web UI's "Interrogate CLIP" and
the clip-interrogator project do it.

- ``classic`` (the web UI's ``/sdapi/v1/interrogate`` with ``model: "clip"``): BLIP's caption,
  then for each list of the term folder (the web UI's ``interrogate/``: artists, flavors,
  mediums, movements) its top term by CLIP similarity, ranked over the list's first
  ``dict_limit`` terms with the web UI's softmax score (``(term:score)`` with ``return_ranks``).
- ``fast``, ``best``, ``negative``: clip-interrogator 0.6's modes over its tables (``by``/
  ``inspired by`` artists, trending sites, flavors, mediums, movements, negative terms): the
  caption plus the top terms; the chained search that adds the term that most raises the whole
  prompt's similarity; the chain of the least similar terms.

Every mode uses the web UI's caption (BLIP, "a picture of " as the decoder's prompt, beams and
lengths from the web UI's options). Rankings are exact top-k over cached features.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..images import load_image
from ..options import option
from ..paths import cache_root
from .decode import beam_search, greedy
from .models import InterrogatorModels, load_models
from .terms import (
    WEBUI_CATEGORIES,
    FeatureCache,
    FeatureTable,
    TermList,
    clip_interrogator_tables,
    package_data,
    read_folder,
)
from .towers import CachedDecoder, create_towers

MODES = ("classic", "fast", "best", "negative")
CAPTION_PROMPT = "a picture of "        # the web UI's BLIP prompt, cut from the caption
MAX_TOKENS = 75                         # CLIP's text window without its start and end tokens
@dataclass
class InterrogateOptions:
    """How an interrogation runs, declared once (``sdrt.options``): the web UI's interrogation
    options (``webui``: their names in ``/sdapi/v1/options``), clip-interrogator's search sizes;
    ``sdrt interrogate``'s flags are derived from the fields."""

    num_beams: int = option(1, "BLIP's beams: 1 is greedy search", flags=("--beams",),
                            webui="interrogate_clip_num_beams")
    min_length: int = option(24, "shortest caption in tokens, the caption prompt's included",
                             webui="interrogate_clip_min_length")
    max_length: int = option(48, "longest caption in tokens, the caption prompt's included",
                             webui="interrogate_clip_max_length")
    dict_limit: int = option(1500, "classic: rank only each list's first N terms (0: whole lists)",
                             webui="interrogate_clip_dict_limit")
    return_ranks: bool = option(False, "classic: write (term:score) with the term's softmax score", flags=("--ranks",),
                                webui="interrogate_return_ranks")
    skip_categories: tuple = option((), "classic: the lists left out", cli=False,
                                    webui="interrogate_clip_skip_categories")
    flavor_intermediate_count: int = option(2048, "best, negative: the candidates the chains search")
    min_flavors: int = option(8, "best: terms the chain adds before it may stop")
    max_flavors: int = option(32, "fast, best, negative: the most terms added")

    def validate(self) -> "InterrogateOptions":
        checks = (("num_beams", 1, 16), ("min_length", 1, 512), ("max_length", 2, 512), ("dict_limit", 0, 10**7),
                  ("flavor_intermediate_count", 1, 10**6), ("min_flavors", 0, 256), ("max_flavors", 1, 256))
        for name, lo, hi in checks:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"interrogation option {name} must be an integer in {lo}..{hi}, got {value!r}")
        if not isinstance(self.skip_categories, (tuple, list)) or \
                not all(isinstance(c, str) for c in self.skip_categories):
            raise ValueError(f"interrogation option skip_categories must be a list of list names, "
                             f"got {self.skip_categories!r}")
        if self.min_length > self.max_length:
            raise ValueError(f"interrogation min_length {self.min_length} exceeds max_length {self.max_length}")
        return self

    def to_webui(self) -> dict:
        """The web UI's options with these values (lists as JSON has them)."""
        return {f.metadata["webui"]: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self) if "webui" in f.metadata}

    def with_webui(self, options: dict) -> "InterrogateOptions":
        """A copy with the web UI's option values (other keys are ignored)."""
        names = {f.metadata["webui"]: f.name for f in dataclasses.fields(self) if "webui" in f.metadata}
        changes = {names[k]: v for k, v in options.items() if k in names}
        if isinstance(changes.get("skip_categories"), list):
            changes["skip_categories"] = tuple(changes["skip_categories"])
        return dataclasses.replace(self, **changes).validate()


class Interrogator:
    """Image -> prompt. ``Interrogator.from_pretrained("random:interrogator-tiny")``, then
    ``interrogate(image, mode="classic")``; ``caption(image)``, ``image_features(image)``,
    ``rank(features, table(name), top)``."""

    def __init__(self, models: InterrogatorModels, towers, lists: dict[str, TermList] | None = None,
                 cache_dir=None, options: InterrogateOptions | None = None, chunk: int = 1024,
                 categories=None):
        """``lists``: the term lists by name (default: the clip-interrogator package's);
        ``categories``: the lists the classic format ranks (default: every given list, as the web
        UI ranks every file of its interrogate/ folder; of the package's lists, the four the web
        UI downloads there, not clip-interrogator's negative terms)."""
        if lists is None:
            lists = read_folder(package_data())
            categories = WEBUI_CATEGORIES if categories is None else categories
        self.models, self.towers, self.lists = models, towers, lists
        self.categories = tuple(lists) if categories is None else tuple(categories)
        self.options = (options or InterrogateOptions()).validate()
        self.chunk = int(chunk)               # texts per text-tower call
        self.cache = FeatureCache(Path(cache_dir) if cache_dir else cache_root() / "interrogator",
                                  models.clip_hash, self.text_features)
        self._ci: dict[str, TermList] | None = None
        self._merged_key, self._merged_table = None, None     # clip-interrogator's tables as one
        self.timings: dict[str, float] = {}                   # seconds of the last interrogation

    @classmethod
    def from_pretrained(cls, model="random:interrogator-tiny", clip=None, blip=None, backend: str = "torch",
                        device="cpu", engine_dir=None, cache_dir=None, lists=None,
                        options: InterrogateOptions | None = None) -> "Interrogator":
        """``model``: ``random:interrogator-tiny``, ``random:interrogator`` or a folder with
        ``clip/`` and ``blip/`` (transformers' layout); ``clip``/``blip``: the folders apart.
        ``backend``: "torch" or "onnxruntime" (its graphs built into ``engine_dir`` once).
        ``lists``: a folder of ``*.txt`` term lists (default: the clip-interrogator package's)."""
        # the lists are read (or found missing) before any weights load
        term_lists = read_folder(lists) if lists is not None else read_folder(package_data())
        models = load_models(model, clip=clip, blip=blip)
        return cls(models, create_towers(backend, models, device, engine_dir), term_lists, cache_dir, options,
                   categories=None if lists is not None else WEBUI_CATEGORIES)

    # ------------------------------------------------------------------ features

    def text_features(self, texts) -> np.ndarray:
        """(N, D) normalised CLIP text features; texts longer than CLIP's window are cut as CLIP
        cuts them. Texts are encoded in batches of ``chunk`` of similar token counts, each batch
        as long as its longest text (the tower is causal: the end token's output does not depend
        on the padding after it), so short terms cost their own tokens, not 77."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, int(self.models.clip.config.projection_dim)), np.float32)
        tok = self.models.clip_tokenizer
        ids = tok(texts, max_length=77, truncation=True).input_ids
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        order = np.argsort([len(i) for i in ids], kind="stable")
        out = np.empty((len(texts), int(self.models.clip.config.projection_dim)), np.float32)
        for start in range(0, len(order), self.chunk):
            rows = order[start:start + self.chunk]
            width = max(len(ids[r]) for r in rows)
            batch = np.full((len(rows), width), pad, np.int64)
            for j, r in enumerate(rows):
                batch[j, :len(ids[r])] = ids[r]
            out[rows] = self.towers.clip_text(batch)
        return _normalise(out)

    def image_features(self, image) -> np.ndarray:
        """(D,) normalised CLIP image features of ``image`` (anything ``sdrt.images.load_image`` reads)."""
        pil = load_image(image)
        return _normalise(self.towers.clip_image(self.models.clip_pixels(pil)))[0]

    def table(self, name: str) -> FeatureTable:
        """The features of list ``name`` (computed once per list content and CLIP model, then read from disk)."""
        if name in self.lists:
            return self.cache.table(self.lists[name])
        ci = self.ci_tables()
        if name in ci:
            return self.cache.table(ci[name])
        raise ValueError(f"term list {name!r} is unknown; valid: {', '.join(list(self.lists) + list(ci))}")

    def ci_tables(self) -> dict[str, TermList]:
        if self._ci is None:
            self._ci = clip_interrogator_tables(self.lists)
        return self._ci

    def warm(self, names=None) -> dict[str, float]:
        """Compute (or read) the features of ``names`` (default: every list the modes use); seconds per list."""
        names = names or list(self.lists) + list(self.ci_tables())
        out = {}
        for name in names:
            t0 = time.perf_counter()
            self.table(name)
            out[name] = time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ captions

    def caption(self, image, num_beams: int | None = None, min_length: int | None = None,
                max_length: int | None = None) -> str:
        """BLIP's caption as the web UI makes it: the decoder starts from "a picture of ",
        which is cut from the result; greedy for one beam, else beam search."""
        given = {"num_beams": num_beams, "min_length": min_length, "max_length": max_length}
        o = dataclasses.replace(self.options, **{k: v for k, v in given.items() if v is not None}).validate()
        num_beams, min_length, max_length = o.num_beams, o.min_length, o.max_length
        pil = load_image(image)
        tok = self.models.blip_tokenizer
        prompt = tok(CAPTION_PROMPT).input_ids
        prompt = [tok.bos_token_id] + list(prompt[1:-1])          # [DEC] a picture of (BLIP's generate)
        if max_length <= len(prompt):
            raise ValueError(f"max_length {max_length} leaves no token after the caption prompt ({len(prompt)} tokens)")
        from sdrt.export.interrogator import decoder_dims
        embeds = self.towers.blip_vision(self.models.blip_pixels(pil))
        eos, pad = int(self.models.blip.config.text_config.sep_token_id), int(tok.pad_token_id)
        step = CachedDecoder(self.towers, self.towers.blip_cross(embeds), decoder_dims(self.models))
        if num_beams == 1:
            ids = greedy(step, prompt, eos, min_length, max_length)
        else:
            ids = beam_search(step, prompt, eos, pad, num_beams, min_length, max_length)
        return strip_prompt(tok.decode(ids, skip_special_tokens=True))

    # ------------------------------------------------------------------ ranking

    def rank(self, features: np.ndarray, table: FeatureTable, top: int = 1,
             reverse: bool = False) -> list[tuple[str, float]]:
        """The ``top`` terms of ``table`` by cosine similarity to ``features``, most similar first
        (``reverse``: least similar first), with their similarities."""
        sims = table.features @ features.astype(np.float32)
        order = top_k(-sims if reverse else sims, top)
        return [(table.labels[i], float(sims[i])) for i in order]

    def similarities(self, features: np.ndarray, texts) -> np.ndarray:
        """Cosine similarities of ``texts`` to ``features``."""
        return self.text_features(texts) @ features.astype(np.float32)

    # ------------------------------------------------------------------ modes

    def interrogate(self, image, mode: str = "classic", caption: str | None = None) -> str:
        if mode not in MODES:
            raise ValueError(f"interrogation mode {mode!r} is unknown; valid: {', '.join(MODES)}")
        pil = load_image(image)
        self.timings = {}
        t0 = time.perf_counter()
        features = self.image_features(pil)
        if mode != "negative" and caption is None:
            t1 = time.perf_counter()
            caption = self.caption(pil)
            self.timings["caption"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        if mode == "classic":
            out = self.classic(features, caption)
        elif mode == "fast":
            out = self.fast(features, caption)
        elif mode == "best":
            out = self.best(features, caption)
        else:
            out = self.negative(features)
        self.timings["rank"] = time.perf_counter() - t1
        self.timings["total"] = time.perf_counter() - t0
        return out

    def classic(self, features: np.ndarray, caption: str) -> str:
        """The web UI's format: the caption, then per list its top terms (``, term`` or
        ``, (term:score)``), the score being the term's softmax probability over the list."""
        o = self.options
        res = caption
        for name, terms in self.lists.items():
            if name not in self.categories or name in o.skip_categories:
                continue
            if o.dict_limit and len(terms.items) > o.dict_limit:     # the list's head: features of its own
                terms = TermList(terms.name, terms.items[:o.dict_limit], terms.topn)
            sims = self.cache.table(terms).features @ features.astype(np.float32)
            probs = _softmax(100.0 * sims)
            for i in top_k(probs, terms.topn):
                res += f", ({terms.items[i]}:{probs[i]:.3f})" if o.return_ranks else f", {terms.items[i]}"
        return res

    def fast(self, features, caption: str) -> str:
        tops = self.rank(features, self._merged(), self.options.max_flavors)
        return self.truncate_to_fit(caption + ", " + ", ".join(t for t, _ in tops))

    def _ci_classic(self, features, caption: str, max_flavors: int) -> str:
        def top1(name):
            return self.rank(features, self.table(name), 1)[0][0]
        medium, artist, trending, movement = (top1(f"ci-{n}") for n in ("mediums", "artists", "trendings", "movements"))
        flaves = ", ".join(t for t, _ in self.rank(features, self.table("ci-flavors"), max_flavors))
        if caption.startswith(medium):
            prompt = f"{caption} {artist}, {trending}, {movement}, {flaves}"
        else:
            prompt = f"{caption}, {medium} {artist}, {trending}, {movement}, {flaves}"
        return self.truncate_to_fit(prompt)

    def best(self, features, caption: str) -> str:
        o = self.options
        flaves = [t for t, _ in self.rank(features, self._merged(), o.flavor_intermediate_count)]
        best_sim = float(self.similarities(features, [caption])[0])
        best = self.chain(features, flaves, caption, best_sim, o.min_flavors, o.max_flavors)
        candidates = [caption, self._ci_classic(features, caption, o.max_flavors), self.fast(features, caption), best]
        return candidates[int(np.argmax(self.similarities(features, candidates)))]

    def negative(self, features) -> str:
        o = self.options
        flaves = [t for t, _ in self.rank(features, self.table("ci-flavors"), o.flavor_intermediate_count, reverse=True)]
        flaves += list(self.table("ci-negative").labels)
        return self.chain(features, flaves, max_count=o.max_flavors, reverse=True)

    def chain(self, features, phrases, best_prompt: str = "", best_sim: float = 0.0, min_count: int = 8,
              max_count: int = 32, reverse: bool = False) -> str:
        """clip-interrogator's chain: add, one at a time, the phrase that makes the whole prompt
        most (``reverse``: least) similar to the image; keep going while that improves (the first
        ``min_count`` always), stop at CLIP's 75 tokens; the best prompt seen wins."""
        sign = -1.0 if reverse else 1.0
        phrases = list(dict.fromkeys(phrases))
        if not phrases:
            return best_prompt
        if not best_prompt:
            sims = sign * self.similarities(features, phrases)
            best_prompt = phrases[int(np.argmax(sims))]
            best_sim = float(sims.max())       # signed; clip-interrogator 0.6 leaves it unsigned (docs/interrogator.md)
            phrases.remove(best_prompt)
        cur_prompt, cur_sim = best_prompt, best_sim
        for idx in range(max_count):
            if not phrases:
                break
            sims = sign * self.similarities(features, [f"{cur_prompt}, {p}" for p in phrases])
            pick = int(np.argmax(sims))
            flave, sim = phrases[pick], float(sims[pick])
            prompt = f"{cur_prompt}, {flave}"
            if sim > best_sim:
                best_prompt, best_sim = prompt, sim
            if not (sim > cur_sim or idx < min_count):
                break
            cur_prompt, cur_sim = prompt, sim
            if self.at_max_len(cur_prompt):
                break
            phrases.pop(pick)
        return best_prompt

    def _merged(self) -> FeatureTable:
        names = ("ci-artists", "ci-flavors", "ci-mediums", "ci-movements", "ci-trendings")
        tables = [self.table(n) for n in names]
        key = tuple(id(t.features) for t in tables)
        if self._merged_key != key:
            terms = TermList("ci-merged", tuple(label for t in tables for label in t.labels))
            self._merged_table = FeatureTable(terms, np.concatenate([t.features for t in tables]))
            self._merged_key = key
        return self._merged_table

    def at_max_len(self, text: str) -> bool:
        """Does ``text`` fill CLIP's window (75 tokens or more between the start and end tokens)?"""
        ids = self.models.clip_tokenizer(text, add_special_tokens=False, verbose=False).input_ids
        return len(ids) >= MAX_TOKENS

    def truncate_to_fit(self, text: str) -> str:
        """clip-interrogator's cut: whole ", "-separated parts, while the prompt fits CLIP's window."""
        parts = text.split(", ")
        out = parts[0]
        for part in parts[1:]:
            if self.at_max_len(out + part):
                break
            out += ", " + part
        return out

    def close(self) -> None:
        self.towers = None


def strip_prompt(text: str) -> str:
    """The caption without the web UI's BLIP prompt ("a picture of ")."""
    head = CAPTION_PROMPT.strip()
    return text[len(head):].strip() if text.startswith(head) else text.strip()


def top_k(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, largest first, ties broken by the lower index."""
    k = max(0, min(int(k), scores.shape[0]))
    if k == 0:
        return []
    if k < scores.shape[0]:
        part = np.argpartition(-scores, k - 1)[:k]
        threshold = scores[part].min()
        part = np.flatnonzero(scores >= threshold)        # every tie at the threshold, to break by index
    else:
        part = np.arange(scores.shape[0])
    order = part[np.lexsort((part, -scores[part]))]
    return [int(i) for i in order[:k]]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()
