"""``sdrt.Pipeline``: text to images through any backend, with the web UI's settings."""
from __future__ import annotations

import contextlib
import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from . import __version__, infotext, prompts
from .backends import check_target, create_backend, sync
from .conditioning import EMPHASIS, encode_texts, tokenize_weighted
from .denoiser import CFGDenoiser
from .models import Components, load_model
from .rng import SOURCES, BrownianNoise, ImageRNG, check_seed
from .samplers import resolve_sampler
from .schedules import get_sigmas, normalize_schedule

MAX_SIDE = 8192
RNG_INFOTEXT = {"cpu": "CPU", "nv": "NV", "gpu": None}


@dataclass
class GenerationResult:
    images: list                       # PIL.Image.Image, one per image
    infotexts: list[str]
    seeds: list[int]
    timings: dict[str, float]          # seconds: text_encoder, unet (the whole loop), vae, total
    pixels: np.ndarray = field(repr=False, default=None)   # (B, H, W, 3) float32 in [0, 1]

    def save(self, path: str | Path, index: int = 0) -> Path:
        """Write image ``index`` as a PNG with its infotext in a ``parameters`` text chunk."""
        return save_png(self.images[index], path, self.infotexts[index])


def save_png(image: Image.Image, path, text: str):
    """Write ``image`` as a PNG with ``text`` in its ``parameters`` chunk, to a path or a
    binary file object. Returns the path (or the file object)."""
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text)
    target = Path(path) if isinstance(path, (str, Path)) else path
    image.save(target, format="PNG", pnginfo=meta)
    return target


def _int_arg(name, value, lo, hi=None, multiple=None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    if multiple and value % multiple:
        raise ValueError(f"{name} must be a multiple of {multiple}, got {value}")
    return value


def _float_arg(name, value, lo=None, hi=None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return float(value)


def _prompt_list(name, value, batch_size) -> list[str]:
    if not isinstance(value, (str, list, tuple)):
        raise ValueError(f"{name} must be a string or a list of {batch_size} strings, got {type(value).__name__}")
    values = [value] * batch_size if isinstance(value, str) else list(value)
    if len(values) != batch_size or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{name} must be a string or a list of {batch_size} strings")
    return values


def image_seeds(seed, subseed, batch_size: int, subseed_strength: float) -> tuple[list[int], list[int]]:
    """Each image's (seed, subseed), the web UI's rule: image i gets seed + i, unless a variation
    is mixed in (subseed_strength > 0), then every image keeps the seed and the subseeds count
    up. -1 picks a random start; a list gives each image its own."""
    def listed(name, value, step):
        if isinstance(value, (list, tuple)):
            if len(value) != batch_size:
                raise ValueError(f"{name} must be an integer or a list of {batch_size} integers, got {len(value)}")
            return [check_seed(v, name) for v in value]
        start = check_seed(value, name)
        return [(start + i * step) % 2 ** 32 for i in range(batch_size)]
    return listed("seed", seed, 1 if subseed_strength == 0 else 0), listed("subseed", subseed, 1)


def nan_error(bad: list[int], dtype: torch.dtype) -> FloatingPointError:
    """The error for decoded images ``bad`` (indices) that hold NaN or Inf."""
    hint = "; try dtype='float32'" if dtype != torch.float32 else ""
    return FloatingPointError(
        f"the decoded image{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} hold NaN or Inf values "
        f"(the model overflowed in {str(dtype).replace('torch.', '')}){hint}")


def _brownian(x: torch.Tensor, sigmas: np.ndarray, seeds) -> BrownianNoise:
    """The SDE samplers' noise over the schedule's positive sigmas (x gives shape and device)."""
    positive = sigmas[sigmas > 0]
    return BrownianNoise(x, float(positive.min()), float(positive.max()), seeds)


class Pipeline:
    """Stable Diffusion text-to-image over one backend. See DESIGN.md for the public API."""

    def __init__(self, components: Components, backend):
        self.components, self.backend = components, backend
        self._fast = self._loops = None        # the static loop's settings and cache (set_fast_path)

    @classmethod
    def from_pretrained(cls, model, backend: str = "torch", device="cpu", dtype="float32",
                        engine_dir=None, fast_path: bool = False, tune: dict | None = None) -> "Pipeline":
        """Load ``model`` (a diffusers folder, "random:tiny" or "random:sd15") onto a backend.
        ``fast_path=True`` runs supported samplers on the static loop (``set_fast_path``);
        ``tune``: the torch backend's speed options (``tune``), refused for any other backend
        before the weights load. Options that are None or False are left out."""
        check_target(backend, device, dtype)     # fail before loading weights
        tune = {k: v for k, v in (tune or {}).items() if v not in (None, False)}
        if tune and backend != "torch":
            raise ValueError(f"{', '.join(tune)}: speed options of backend 'torch', not {backend!r}")
        components = load_model(model)
        pipe = cls(components, create_backend(backend, components, device, dtype, engine_dir))
        if fast_path:
            pipe.set_fast_path()
        if tune:
            pipe.tune(**tune)
        return pipe

    def submit(self, request=None, /, **kwargs):
        """Queue one image on this pipeline's default ``sdrt.Engine`` (created on first use);
        returns a Future of a one-image GenerationResult. See ``sdrt.engine``."""
        if getattr(self, "_engine", None) is None:
            from .engine import Engine
            self._engine = Engine(self)
        return self._engine.submit(request, **kwargs)

    def _check(self, a: dict) -> dict:
        """Validate every argument before any network runs; returns the normalised values."""
        c = self.components
        a["steps"] = _int_arg("steps", a["steps"], 1, 10000)
        a["batch_size"] = _int_arg("batch_size", a["batch_size"], 1, 256)
        factor = c.latent_factor
        a["width"] = _int_arg("width", a["width"], factor, MAX_SIDE, multiple=factor)
        a["height"] = _int_arg("height", a["height"], factor, MAX_SIDE, multiple=factor)
        a["clip_skip"] = _int_arg("clip_skip", a["clip_skip"], 1, c.text_encoder.config.num_hidden_layers)
        a["spec"], sched = resolve_sampler(a["sampler"], a["schedule"])
        a["schedule"] = normalize_schedule(sched)
        if a["emphasis"] not in EMPHASIS:
            raise ValueError(f"emphasis {a['emphasis']!r} is unknown; valid: {', '.join(EMPHASIS)}")
        if a["rng"] not in SOURCES:
            raise ValueError(f"rng {a['rng']!r} is unknown; valid: {', '.join(SOURCES)}")
        a["eta_noise_seed_delta"] = _int_arg("eta_noise_seed_delta", a["eta_noise_seed_delta"], 0, 2 ** 32 - 1)
        a["subseed_strength"] = _float_arg("subseed_strength", a["subseed_strength"], 0.0, 1.0)
        if a["eta"] is not None:
            a["eta"] = _float_arg("eta", a["eta"], 0.0, 10.0)
        a["eta_value"] = a["spec"].eta_default if a["eta"] is None else a["eta"]     # what the sampler uses
        if a["seed_resize_from"] is not None:
            w, h = a["seed_resize_from"]
            a["seed_resize_from"] = (_int_arg("seed_resize_from width", w, 0, MAX_SIDE),
                                     _int_arg("seed_resize_from height", h, 0, MAX_SIDE))
        if isinstance(a["prompt"], (list, tuple)):      # a list of prompts sets the batch size
            a["batch_size"] = _int_arg("number of prompts", len(a["prompt"]), 1, 256)
        a["prompts"] = _prompt_list("prompt", a["prompt"], a["batch_size"])
        a["negative_prompts"] = _prompt_list("negative_prompt", a["negative_prompt"], a["batch_size"])
        if isinstance(a["cfg_scale"], (list, tuple)):
            if len(a["cfg_scale"]) != a["batch_size"]:
                raise ValueError(f"cfg_scale must be a number or a list of {a['batch_size']} numbers")
            a["cfg_scales"] = [_float_arg("cfg_scale", v) for v in a["cfg_scale"]]
        else:
            a["cfg_scales"] = [_float_arg("cfg_scale", a["cfg_scale"])] * a["batch_size"]
        check = getattr(self.backend, "check_request", None)
        if check is not None:
            check(a["batch_size"], a["height"], a["width"])
        a["seeds"], a["subseeds"] = image_seeds(a["seed"], a["subseed"], a["batch_size"], a["subseed_strength"])
        if a["sigmas"] is not None:
            s = np.asarray(a["sigmas"], dtype=np.float64)
            if s.ndim != 1 or len(s) < 2 or not np.all(np.isfinite(s)) or np.any(s < 0) or np.any(np.diff(s) >= 0):
                raise ValueError("sigmas must be a decreasing list of at least 2 finite values >= 0")
            a["sigmas"], a["steps"] = s, len(s) - 1
        return a

    def __call__(self, prompt, negative_prompt="", steps=20, cfg_scale=7.0, sampler="Euler a",
                 schedule="Automatic", seed=-1, width=512, height=512, batch_size=1, clip_skip=1,
                 rng="gpu", eta_noise_seed_delta=0, subseed=-1, subseed_strength=0.0,
                 seed_resize_from=None, eta=None, emphasis: str = "Original",
                 sigmas: Sequence[float] | None = None,
                 callback: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Generate ``batch_size`` images (seeds seed, seed+1, ...).

        Args:
            prompt: text, or a list of texts (one per image; then it sets the batch size).
            seed / subseed: an integer (-1: random), or a list with one per image. Image i gets
                seed + i, except with a variation (subseed_strength > 0), where every image
                keeps the seed and the subseeds count up (the web UI's rule).
            cfg_scale: a number, or a list with one per image.
            sampler / schedule: web UI names ("DPM++ 2M", "Karras"; "DPM++ 2M Karras" too).
            rng: noise source, "gpu" (the device's generator), "cpu" or "nv".
            emphasis: how token weights apply: "Original" (keeps the mean), "No norm", "Ignore".
            sigmas: explicit decreasing sigmas, overriding ``schedule`` and ``steps``.
            callback: called as ``callback(step, total_steps)`` after each step.
        """
        a = self._check(dict(locals()))
        job = self._encode(a)
        result, bad = self._sample(job, callback)
        if bad:
            raise nan_error(bad, self.backend.dtype)
        return result

    # The two stages of a generation; sdrt.Engine runs them on separate threads so that the
    # text of the next batch is encoded while this one denoises.

    def _encode(self, a: dict) -> dict:
        """Stage 1 (validated arguments -> job): sigmas and the conditioning of every model call."""
        t_start = time.perf_counter()
        c, be, spec = self.components, self.backend, a["spec"]
        sig = a["sigmas"] if a["sigmas"] is not None else get_sigmas(
            a["schedule"], a["steps"], c.schedule, default=spec.schedule,
            discard_penultimate=spec.discard_penultimate)
        # text: the web UI's prompt schedules (counted in model calls), each distinct text encoded once
        pos, neg, parts = self._schedules(a, len(sig) - 1)
        texts = [t for sched in pos + neg for _, t in sched]
        emb = encode_texts(be, c.tokenizer, texts, a["clip_skip"], a["emphasis"])
        it = iter(pos)
        conds = [[(w, [(end, emb[t]) for end, t in next(it)]) for _, w in ps] for ps in parts]
        uncond = [[(end, emb[t]) for end, t in sched] for sched in neg]
        sync(be.device)
        return dict(a=a, sigmas=sig, conds=conds, uncond=uncond, t_start=t_start,
                    t_text=time.perf_counter() - t_start)

    def _schedules(self, a: dict, n_steps: int):
        total = n_steps * 2 if a["spec"].second_order else n_steps
        parts = [prompts.split_and(p) for p in a["prompts"]]
        pos = prompts.schedules([t for ps in parts for t, _ in ps], total)
        neg = prompts.schedules(a["negative_prompts"], total)
        return pos, neg, parts

    def _windows(self, a: dict) -> int:
        """How many 77-token windows the request's texts take (all are padded to this count)."""
        n_steps = a["steps"] if a["sigmas"] is None else len(a["sigmas"]) - 1
        pos, neg, _ = self._schedules(a, n_steps)
        texts = dict.fromkeys(t for sched in pos + neg for _, t in sched)
        return max(len(tokenize_weighted(self.components.tokenizer, t)) for t in texts)

    def _sample(self, job: dict, callback=None) -> tuple[GenerationResult, list[int]]:
        """Stage 2 (job -> images): the denoising loop and the VAE. Returns the result and the
        indices of images that hold NaN or Inf (the caller decides whether that fails them)."""
        if self._fast is not None:
            from .fastpath import unsupported_reason
            if unsupported_reason(job) is None:
                return self._sample_static(job, callback)
        a, sig = job["a"], job["sigmas"]
        c, be, spec = self.components, self.backend, a["spec"]
        n_steps = len(sig) - 1
        t0 = time.perf_counter()
        latent_shape, gen = self._noise(a)
        x = gen.next().float()
        x = x * (float(sig[0]) if spec.init == "sigma" else math.sqrt(1.0 + float(sig[0]) ** 2))
        denoiser = CFGDenoiser(be, c.schedule, job["conds"], job["uncond"], a["cfg_scales"], latent_shape,
                               2 * n_steps + 2)
        noise = None
        if spec.noise == "rng":
            noise = lambda s, s_next: gen.next().float()  # noqa: E731
        elif spec.noise == "brownian":
            noise = _brownian(x, sig, a["seeds"])
        kwargs = dict(spec.options)
        if spec.eta_default is not None:
            kwargs["eta"] = a["eta_value"]
        step_cb = (lambda i, *_: callback(i + 1, n_steps)) if callback else None
        kv = getattr(be, "kv", None)
        with kv.scope(denoiser.contexts) if kv else contextlib.nullcontext():
            x = spec.fn(denoiser, x, sig, noise=noise, callback=step_cb, **kwargs)
        latents = x / math.sqrt(1.0 + float(sig[-1]) ** 2)
        sync(be.device)
        t_unet = time.perf_counter() - t0

        t0 = time.perf_counter()
        decoded = be.decode(latents)
        pixels = ((decoded + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).cpu().numpy()
        t_vae = time.perf_counter() - t0
        bad = [i for i in range(len(pixels)) if not np.all(np.isfinite(pixels[i]))]
        # the web UI truncates to uint8 rather than rounding
        images = (255.0 * np.nan_to_num(pixels)).astype(np.uint8)
        return self._result(job, pixels, images, dict(unet=t_unet, vae=t_vae)), bad

    def _noise(self, a: dict):
        """(latent shape (C, h, w), the images' noise generator) for validated arguments."""
        c = self.components
        f = c.latent_factor
        shape = (c.latent_channels, a["height"] // f, a["width"] // f)
        gen = ImageRNG(shape, a["seeds"], subseeds=a["subseeds"], subseed_strength=a["subseed_strength"],
                       seed_resize_from=a["seed_resize_from"], source=a["rng"],
                       eta_noise_seed_delta=a["eta_noise_seed_delta"], device=self.backend.device, latent_factor=f)
        return shape, gen

    def _result(self, job: dict, pixels: np.ndarray, images: np.ndarray, timings: dict):
        a = job["a"]
        texts = [self._infotext(a, i) for i in range(a["batch_size"])]
        timings = dict(text_encoder=job["t_text"], **timings, total=time.perf_counter() - job["t_start"])
        return GenerationResult(images=[Image.fromarray(p) for p in images], infotexts=texts, seeds=a["seeds"],
                                timings=timings, pixels=pixels)

    def set_fast_path(self, enabled: bool = True, use_kernel: bool = True, capture: bool | None = None,
                      cache_size: int = 4) -> None:
        """Run requests that the static loop supports (``sdrt.fastpath``: Euler, Euler a, DDIM,
        DPM++ 2M, DPM++ 2M SDE, LCM; plain or edited prompts, no AND) as a static loop: per-step tables on
        the device, the fused step (the CUDA kernel on a GPU unless ``use_kernel=False``), and on
        a CUDA device one CUDA graph per configuration, captured on first use and replayed
        (``capture=False`` keeps it eager). Other requests keep the eager loop. On a graph
        replay a progress callback is called once, after the last step."""
        from .fastpath import LoopCache
        if self._loops is not None:
            self._loops.clear()                    # their graphs and cached K/V entries go
        self._fast = dict(use_kernel=use_kernel, capture=capture) if enabled else None
        self._loops = LoopCache(cache_size)

    def tune(self, **options) -> None:
        """The torch backend's speed options (``TorchBackend.tune``: compile, channels_last,
        cudnn_benchmark, sdpa_order). Captured graphs that the change invalidates are dropped
        (they are captured again on next use)."""
        tune = getattr(self.backend, "tune", None)
        if tune is None:
            raise ValueError(f"the {type(self.backend).__name__} has no speed options to tune "
                             "(they belong to backend='torch')")
        if tune(**options) and self._loops is not None:
            self._loops.clear()

    def _sample_static(self, job: dict, callback=None) -> tuple[GenerationResult, list[int]]:
        """Stage 2 on the static loop (same images as ``_sample`` up to float rounding)."""
        from .denoiser import plan_contexts
        from .fastpath import StaticLoop
        a, sig = job["a"], job["sigmas"]
        c, be, spec = self.components, self.backend, a["spec"]
        n_steps = len(sig) - 1
        t0 = time.perf_counter()
        latent_shape, gen = self._noise(a)
        distinct, index = plan_contexts(job["conds"], job["uncond"], n_steps, be.device, be.dtype)
        key = (a["batch_size"], latent_shape, spec.name, sig.tobytes(), a["eta_value"], tuple(index),
               tuple(distinct[0].shape), len(distinct))
        loop = self._loops.get(key, lambda: StaticLoop(
            be, c.schedule, spec.name, sig, a["eta_value"], a["batch_size"], latent_shape, index,
            tuple(distinct[0].shape), len(distinct), init=spec.init, options=spec.options, **self._fast))
        x0 = gen.next().float()
        if spec.noise == "brownian":      # the increments between each drawing step's sigmas
            tree = _brownian(x0, sig, a["seeds"])
            noise = [tree(sig[i], sig[i + 1]) for i, d in enumerate(loop.draws) if d]
        else:
            noise = [gen.next().float() for _ in range(sum(loop.draws))]     # the eager loop's order
        pixels, images, finite = loop.run(x0, noise, distinct, a["cfg_scales"], callback)
        t_loop = time.perf_counter() - t0
        bad = [i for i in range(len(finite)) if not finite[i]]
        # the loop and the VAE are one replay: the whole time is reported as unet, vae as 0
        return self._result(job, pixels, images, dict(unet=t_loop, vae=0.0)), bad

    def _infotext(self, a: dict, i: int) -> str:
        spec = a["spec"]
        params = {
            "Prompt": a["prompts"][i], "Negative prompt": a["negative_prompts"][i],
            "Steps": a["steps"], "Sampler": spec.name, "Schedule type": a["schedule"],
            "CFG scale": a["cfg_scales"][i], "Seed": a["seeds"][i], "Size": f"{a['width']}x{a['height']}",
            "Model hash": self.components.model_hash, "Model": self.components.name,
            "Variation seed": a["subseeds"][i] if a["subseed_strength"] else None,
            "Variation seed strength": a["subseed_strength"] or None,
            "Seed resize from": (f"{a['seed_resize_from'][0]}x{a['seed_resize_from'][1]}"
                                 if a["seed_resize_from"] and min(a["seed_resize_from"]) > 0 else None),
            "Clip skip": a["clip_skip"],                       # format() leaves out 1
            "ENSD": a["eta_noise_seed_delta"] if a["eta_noise_seed_delta"] and spec.noise == "rng" else None,
            "RNG": RNG_INFOTEXT[a["rng"]],
            "Emphasis": a["emphasis"] if a["emphasis"] != "Original" else None,
            ("Eta DDIM" if spec.name == "DDIM" else "Eta"):
                a["eta"] if spec.eta_default is not None and a["eta"] is not None
                and a["eta"] != spec.eta_default else None,       # only samplers that use eta record it
            "Version": f"sdrt {__version__}",
        }
        return infotext.format(params)
