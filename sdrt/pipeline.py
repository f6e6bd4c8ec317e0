"""``sdrt.Pipeline``: text to images through any backend, with the web UI's settings.

A generation runs as public, typed stages (``sdrt.Batcher`` and the server use the same ones)::

    job  = pipe.validate(params)         GenerationParams -> Job: checked arguments, planned sigmas
    cond = pipe.encode(job)              -> Conditioning: every model call's text conditioning
    out  = pipe.sample(job, cond)        -> Decoded: the denoising loop and the VAE decode
                                            (the static loop when set_fast_path covers the job,
                                            else pipe.denoise then pipe.decode)
    res  = pipe.result(job, cond, out)   -> GenerationResult with the web UI's infotexts

``pipe(prompt, **params)`` runs all four.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import infotext, prompts
from ._version import __version__
from .backends import check_target, create_backend, sync
from .conditioning import Conditioning, encode_texts, encode_texts_sdxl, pack_added, sdxl_time_ids, tokenize_weighted
from .denoiser import CFGDenoiser, plan_contexts
from .img2img import ENCODE_SEED_OFFSET, img2img_sigmas, img2img_steps, sample_latents
from .models import Components, load_model
from .params import GenerationParams, Job, validate
from .paths import folder_arg
from .result import Decoded, GenerationResult, nan_error, save_png  # noqa: F401 - save_png: old home
from .rng import BrownianNoise, ImageRNG
from .schedules import get_sigmas

RNG_INFOTEXT = {"cpu": "CPU", "nv": "NV", "gpu": None}
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextCost:
    """``Pipeline.cost``: distinct texts, 77-token windows per text, most ``AND`` parts of an
    image, the largest attention weight."""

    texts: int
    windows: int
    and_parts: int
    max_weight: float = 1.0        # the largest attention weight of any token, in magnitude

    @property
    def text_windows(self) -> int:
        """Windows the text encoder runs (and whose hidden states are kept) for the job."""
        return self.texts * self.windows


def _brownian(x: torch.Tensor, sigmas: np.ndarray, seeds) -> BrownianNoise:
    """The SDE samplers' noise over the schedule's positive sigmas (x gives shape and device)."""
    positive = sigmas[sigmas > 0]
    return BrownianNoise(x, float(positive.min()), float(positive.max()), seeds)


class Pipeline:
    """Stable Diffusion text-to-image over one backend (docs/architecture.md)."""

    def __init__(self, components: Components, backend):
        self.components, self.backend = components, backend
        self.fast_path: dict | None = None     # the static loop's settings (set_fast_path)
        self.loops = None                      # its cache of built loops (sdrt.fastpath.LoopCache)
        self._batcher = None
        self.closed = False
        self.loras = None                      # the LoRA folder (sdrt.lora.LoraLibrary; set_lora_dir)
        self.embeddings = None                 # textual inversion (sdrt.embeddings; set_embeddings_dir)
        self.vaes = None                       # the VAE folder (sdrt.vae.VaeLibrary; set_vae_dir)
        self._vae_state = None                 # which VAE's weights the model's VAE holds
        self._lora_state = None                # which LoRAs are merged into the weights
        self._state_lock = threading.Lock()     # the two states above are made once (requests validate concurrently)

    @classmethod
    def from_pretrained(cls, model, backend: str = "torch", device="cpu", dtype="float32",
                        engine_dir=None, fast_path: bool = False, tune: dict | None = None,
                        lora_dir=None, embeddings_dir=None, vae_dir=None) -> "Pipeline":
        """Load ``model`` (a checkpoint file, a diffusers folder, "random:tiny", ...) onto a backend.
        ``fast_path=True`` runs supported samplers on the static loop (``set_fast_path``);
        ``tune``: the torch backend's speed options (``tune``), refused for any other backend
        before the weights load. Options that are None or False are left out. ``lora_dir``: the
        folder of the LoRAs that prompts name (``<lora:NAME:0.8>``; ``set_lora_dir``);
        ``embeddings_dir``: the textual-inversion embeddings prompts name (``set_embeddings_dir``);
        ``vae_dir``: the VAE files the ``vae`` argument names (``set_vae_dir``)."""
        check_target(backend, device, dtype)     # fail before loading weights
        for name, folder in (("lora_dir", lora_dir), ("embeddings_dir", embeddings_dir), ("vae_dir", vae_dir)):
            folder_arg(name, folder)
        tune = {k: v for k, v in (tune or {}).items() if v not in (None, False)}
        if tune and backend != "torch":
            raise ValueError(f"{', '.join(tune)}: speed options of backend 'torch', not {backend!r}")
        components = load_model(model)
        pipe = cls(components, create_backend(backend, components, device, dtype, engine_dir))
        if fast_path:
            pipe.set_fast_path()
        if tune:
            pipe.tune(**tune)
        if lora_dir is not None:
            pipe.set_lora_dir(lora_dir)
        if embeddings_dir is not None:
            pipe.set_embeddings_dir(embeddings_dir)
        if vae_dir is not None:
            pipe.set_vae_dir(vae_dir)
        return pipe

    def set_vae_dir(self, folder) -> None:
        """Use the VAE files under ``folder`` for the ``vae`` argument (``self.vaes.refresh()``
        reads it again); a path to a VAE file works without a folder."""
        from .vae import VaeLibrary
        self.vaes = VaeLibrary(folder)
        if self._vae_state is not None:
            self._vae_state.library = self.vaes

    def set_embeddings_dir(self, folder) -> None:
        """Use the textual-inversion embeddings under ``folder`` that fit this model (the others are
        listed in ``self.embeddings.skipped``; ``self.embeddings.refresh()`` reads the folder again)."""
        from .embeddings import EmbeddingLibrary
        c = self.components
        widths = [int(m.config.hidden_size) for m, _ in c.text_encoders]
        self.embeddings = EmbeddingLibrary(folder, widths, c.tokenizer)

    def set_lora_dir(self, folder) -> None:
        """Use the LoRA files under ``folder`` (searched again by ``self.loras.refresh()``)."""
        from .lora import LoraLibrary
        self.loras = LoraLibrary(folder)
        if self._lora_state is not None:
            self._lora_state.library = self.loras

    def __call__(self, prompt: str | list[str] | GenerationParams = "", *args, callback=None,
                 **kwargs) -> GenerationResult:
        """Generate images: ``pipe(prompt, steps=20, seed=1, ...)`` with the arguments of
        ``sdrt.GenerationParams`` (or ``pipe(params)``). Image i gets seed + i, except with a
        variation (subseed_strength > 0), where every image keeps the seed and the subseeds count
        up (the web UI's rule). ``callback(step, total_steps)`` is called after each step.
        Raises ValueError (a bad argument, before any network runs) or FloatingPointError (an
        image that overflowed)."""
        if isinstance(prompt, GenerationParams):
            if args:
                raise TypeError("pass GenerationParams alone, or with keyword arguments that replace its fields")
            params = prompt.replace(**kwargs) if kwargs else prompt
        else:
            params = GenerationParams(prompt, *args, **kwargs)
        job = self.validate(params)
        cond = self.encode(job)
        out = self.sample(job, cond, callback)
        if out.bad:
            raise nan_error(out.bad, self.backend.dtype)
        return self.result(job, cond, out)

    def submit(self, request=None, /, **kwargs):
        """Queue one image on this pipeline's default ``sdrt.Batcher`` (created on first use);
        returns a Future of a one-image GenerationResult. See ``sdrt.batcher``."""
        if self._batcher is None:
            from .batcher import Batcher
            self._batcher = Batcher(self)
        return self._batcher.submit(request, **kwargs)

    def close(self) -> None:
        """Free what the pipeline holds: its batcher's threads, its static loops (CUDA graphs),
        the backend's sessions or engines. The pipeline cannot run afterwards."""
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None
        if self.loops is not None:
            self.loops.clear()
        self.fast_path = self.loops = None
        close = getattr(self.backend, "close", None)
        if close is not None and not self.closed:
            close()
        self.closed = True

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the stages

    def validate(self, params: GenerationParams) -> Job:
        """Stage 1: check every argument (ValueError naming it) and plan the sigmas."""
        if self.closed:
            raise RuntimeError("this Pipeline was closed (Pipeline.close); load it again to generate")
        c = self.components
        job = validate(params, c.latent_factor, c.text_encoder.config.num_hidden_layers)
        check_tiling = getattr(self.backend, "check_tiling", None)
        if check_tiling is not None:            # a compiled folder is built with or without circular padding
            check_tiling(job.params.tiling)
        elif job.params.tiling and getattr(self.backend, "set_tiling", None) is None:
            raise ValueError(f"tiling needs backend 'torch', or an engine folder built with `sdrt build --tiling`; "
                             f"the {type(self.backend).__name__} has neither")
        self._extra_networks(job)
        self._check_vae(job)
        check = getattr(self.backend, "check_request", None)
        if check is not None:
            check(job.batch_size, job.params.height, job.params.width)
            if job.hires is not None:           # the second pass's size too, before the first runs
                check(job.batch_size, job.hires.size[1], job.hires.size[0])
        if job.sigmas is None:
            self._plan_sigmas(job)
        return job

    def _plan_sigmas(self, job: Job) -> None:
        """The job's sigmas: the schedule for its steps; img2img runs its last t_enc + 1
        (``sdrt.img2img``)."""
        spec, p = job.sampler, job.params
        steps, t_enc = (img2img_steps(p.steps, p.denoising_strength, p.img2img_fix_steps) if job.img2img
                        else (job.steps, None))
        job.sigmas = get_sigmas(p.schedule, steps, self.components.noise_schedule, default=spec.schedule,
                                discard_penultimate=spec.discard_penultimate)
        if t_enc is not None:
            job.sigmas = img2img_sigmas(job.sigmas, t_enc)

    def _extra_networks(self, job: Job) -> None:
        """The prompts' ``<lora:...>`` tags: removed from the text, the first prompt's set kept for
        the batch (the web UI's rule), each LoRA read and matched to the model now, so a missing or
        unfitting file is a ValueError before anything runs or changes."""
        from .lora import LoraLibrary, LoraState, split_extra_networks
        split = [split_extra_networks(p) for p in job.prompts]
        job.text_prompts = [text for text, _ in split]
        job.loras = split[0][1]
        if not job.loras:
            return
        if not getattr(self.backend, "supports_lora", False):
            self._require_weight_changes(f"the prompt asks for LoRA ({', '.join(u.name for u in job.loras)})")
        with self._state_lock:
            if self._lora_state is None:
                self._lora_state = LoraState(self.components, self.loras or LoraLibrary(None))
        self._lora_state.resolve(job.loras)

    def _check_vae(self, job: Job) -> None:
        """A VAE other than the model's own: found, read and checked against the model now."""
        from .vae import OWN, VaeLibrary, VaeState
        if job.params.vae in OWN:
            return
        self._require_weight_changes(f"vae={job.params.vae!r} asks for another VAE")
        with self._state_lock:
            if self._vae_state is None:
                self._vae_state = VaeState(self.components, self.vaes or VaeLibrary(None))
        self._vae_state.weights(job.params.vae)

    def vae_infotext(self, vae: str) -> dict:
        """The web UI's ``VAE hash`` and ``VAE`` for the ``vae`` argument (nothing for the model's own)."""
        return self._vae_state.infotext(vae) if self._vae_state is not None else {}

    def _require_weight_changes(self, what: str) -> None:
        """LoRA and VAE files change the networks' weights: the torch backend's modules can, a
        compiled backend's engines (built with the model's own weights) cannot yet."""
        if not getattr(self.backend, "supports_weight_changes", False):
            hint = getattr(self.backend, "weight_changes_hint", "")
            raise ValueError(f"{what}; in this release that runs on backend 'torch', not on the "
                             f"{type(self.backend).__name__} (its engines hold the model's own weights){hint}")

    def _apply_loras(self, part: str, job: Job) -> None:
        if self._lora_state is not None:        # also with none: the previous job's are taken out
            self._lora_state.apply(part, job.loras)
            sync = getattr(self.backend, "sync_weights", None)
            if sync is not None:                 # a compiled backend gets the merged weights too
                sync(part, self._lora_state)

    def _prompt_schedules(self, job: Job):
        calls = job.model_calls
        parts = [prompts.split_and(p) for p in (job.text_prompts or job.prompts)]
        if job.hires_base:        # a hires second pass: steps count on from the first pass's
            pos = prompts.schedules([t for ps in parts for t, _ in ps], job.hires_base, hires_steps=calls)
            neg = prompts.schedules(job.negative_prompts, job.hires_base, hires_steps=calls)
        else:
            pos = prompts.schedules([t for ps in parts for t, _ in ps], calls)
            neg = prompts.schedules(job.negative_prompts, calls)
        return pos, neg, parts

    def windows(self, job: Job) -> int:
        """How many 77-token windows the job's texts take (all are padded to this count)."""
        return self.cost(job).windows

    def cost(self, job: Job, max_texts: int | None = None) -> TextCost:
        """What the job's text asks of the text encoder and the UNet, before anything runs: the
        distinct texts (prompt editing and alternation give one per schedule entry), the windows
        each is padded to, and the conditional rows of every UNet call (``AND`` parts). With more
        than ``max_texts`` distinct texts nothing is tokenized (``windows`` is then 0)."""
        pos, neg, parts = self._prompt_schedules(job)
        texts = dict.fromkeys(t for sched in pos + neg for _, t in sched)
        and_parts = max(len(ps) for ps in parts)
        if max_texts is not None and len(texts) > max_texts:
            return TextCost(texts=len(texts), windows=0, and_parts=and_parts)
        tokenized = [tokenize_weighted(self.components.tokenizer, t, embeddings=self.embeddings) for t in texts]
        weight = max(abs(w) for windows in tokenized for _, ws in windows for w in ws)
        return TextCost(texts=len(texts), windows=max(map(len, tokenized)), and_parts=and_parts, max_weight=weight)

    def encode(self, job: Job) -> Conditioning:
        """Stage 2: the conditioning of every model call, each distinct text encoded once."""
        started = time.perf_counter()
        self._apply_loras("text", job)
        pos, neg, parts = self._prompt_schedules(job)
        texts = [t for sched in pos + neg for _, t in sched]
        c = self.components
        zero = None              # SDXL: the context of an empty negative prompt
        job.embeddings_used = set()
        if c.is_sdxl:
            emb, zero = self._encode_sdxl(job, texts, {t for sched in pos for _, t in sched})
        else:
            emb = encode_texts(self.backend, c.tokenizer, texts, job.params.clip_skip, job.params.emphasis,
                               embeddings=self.embeddings, used=job.embeddings_used)
        it = iter(pos)
        conds = [[(w, [(end, emb[t]) for end, t in next(it)]) for _, w in ps] for ps in parts]
        uncond = [[(end, zero if t == "" and zero is not None else emb[t]) for end, t in sched] for sched in neg]
        sync(self.backend.device)
        return Conditioning(conds, uncond, seconds=time.perf_counter() - started, started=started)

    def _encode_sdxl(self, job: Job, texts, positive: set) -> tuple[dict, torch.Tensor | None]:
        """SDXL's contexts (``conditioning.pack_added``): both encoders' hidden states, the pooled
        text and the image size. An empty negative prompt gives zeros for the text and the pooled
        text (the web UI's ``force_zero_negative_prompt``; diffusers does it only when no negative
        prompt is passed at all). The web UI decides that per batch, sdrt per image, so that
        batching requests together never changes an image. An empty text that only a negative
        prompt uses is not encoded at all."""
        c, p = self.components, job.params
        wanted = [t for t in texts if t or t in positive] or texts
        emb = encode_texts_sdxl(self.backend, [c.tokenizer, c.tokenizer_2], wanted, p.emphasis,
                                embeddings=self.embeddings, used=job.embeddings_used)
        sizes = sdxl_time_ids(p.height, p.width)
        out = {t: pack_added(hidden, pooled, sizes) for t, (hidden, pooled) in emb.items()}
        hidden, pooled = next(iter(emb.values()))       # every text has the same windows: any gives the shapes
        zero = pack_added(torch.zeros_like(hidden), torch.zeros_like(pooled), sizes)
        return out, zero

    def sample(self, job: Job, cond: Conditioning, callback=None) -> Decoded:
        """Stages 3 and 4: the denoising loop and the VAE. Images that hold NaN or Inf are
        flagged in ``Decoded.finite`` (the caller decides whether that fails them)."""
        self._apply_loras("unet", job)
        if self._vae_state is not None:          # also for the model's own: the previous job's goes
            self._vae_state.apply(job.params.vae)
        self._set_tiling(job)
        if job.hires is not None:
            return self._sample_hires(job, cond, callback)
        if ((job.init_images is not None and job.init_latents is None)
                or (self.components.inpainting and job.image_cond is None)):
            t0 = time.perf_counter()
            self.prepare_latents(job)
            job.encode_seconds = time.perf_counter() - t0
        if self.fast_path is not None:
            from .fastpath import unsupported_reason
            v_pred = self.components.noise_schedule.prediction_type == "v_prediction"
            if unsupported_reason(job, cond, v_prediction=v_pred) is None:
                return self._sample_static(job, cond, callback)
        return self._sample_eager(job, cond, callback)

    def _set_tiling(self, job: Job) -> None:
        """Circular padding on (tiling) or off for this job (``TorchBackend.set_tiling``)."""
        set_tiling = getattr(self.backend, "set_tiling", None)
        if set_tiling is not None:               # (Pipeline.validate refused tiling on the others)
            set_tiling(job.params.tiling)

    def _sample_hires(self, job: Job, cond: Conditioning, callback=None) -> Decoded:
        """The hires fix (``sdrt.hires``): the first pass, its latents (``Latent*``) or 8-bit images
        (pixel upscalers) at the second pass's size, then img2img of those there."""
        from .hires import upscale_image, upscale_latents
        plan, f = job.hires, self.components.latent_factor
        first = dataclasses.replace(job, hires=None)
        t0 = time.perf_counter()
        total = job.steps + plan.steps
        cb = (lambda i, n: callback(i, total)) if callback else None
        if plan.latent_mode is not None:
            if self.components.inpainting:
                self.prepare_latents(first)
            latents = self.denoise(first, cond, cb)
            init = dict(init_latents=upscale_latents(latents, plan, f))
        else:
            out = self.sample(first, cond, cb)
            init = dict(init_images=[upscale_image(Image.fromarray(im), plan, f) for im in out.images])
        second = self.hires_job(job, **init)
        hr_cond = self.encode(second)
        cb = (lambda i, n: callback(job.steps + i, total)) if callback else None
        out = self.sample(second, hr_cond, cb)
        out.timings["loop"] = time.perf_counter() - t0 - out.timings["vae"]
        out.timings["hires_text_encoder"] = hr_cond.seconds
        return out

    def hires_job(self, job: Job, init_images=None, init_latents=None) -> Job:
        """The second pass of a hires-fix job: img2img at ``job.hires.size`` with the same seeds,
        the hires sampler, steps and prompts, exactly ``hires.steps`` steps (the fixed-steps rule),
        prompt editing counted from the end of the first pass."""
        plan, p = job.hires, job.params
        prompts = [p.hr_prompt] * job.batch_size if p.hr_prompt else job.prompts
        negatives = [p.hr_negative_prompt] * job.batch_size if p.hr_negative_prompt else job.negative_prompts
        params = p.replace(prompt=prompts, negative_prompt=negatives, seed=list(job.seeds), subseed=list(job.subseeds),
                           cfg_scale=list(job.cfg_scales), width=plan.size[0], height=plan.size[1],
                           steps=plan.steps, sampler=plan.sampler or p.sampler,
                           schedule=plan.schedule or p.schedule, enable_hr=False, img2img_fix_steps=True,
                           init_images=init_images, mask=None, resize_mode=0, batch_size=job.batch_size,
                           sigmas=None)
        hr = self.validate(params)
        hr.hires_base = job.steps
        if init_latents is not None:            # the latent path: img2img from latents, planned again as such
            hr.init_latents = init_latents.float()
            hr.edit_steps = plan.steps
            self._plan_sigmas(hr)
        return hr

    def _sample_eager(self, job: Job, cond: Conditioning, callback=None) -> Decoded:
        t0 = time.perf_counter()
        latents = self.denoise(job, cond, callback)
        sync(self.backend.device)
        t_loop = time.perf_counter() - t0
        out = self.decode(latents)
        out.timings["loop"] = t_loop
        return out

    def denoise(self, job: Job, cond: Conditioning, callback=None) -> torch.Tensor:
        """Stage 3 on the eager loop: the final latents (B, C, h, w) float32."""
        self._apply_loras("unet", job)
        be, spec, sig = self.backend, job.sampler, job.sigmas
        n_steps = len(sig) - 1
        latent_shape, gen = self._noise(job)
        x = self._start(job, gen.next().float(), sig)
        blend = None
        if job.latent_mask is not None:           # inpainting: the init latents outside the mask, every step
            blend = (job.init_latents, job.latent_mask)
        denoiser = CFGDenoiser(be, self.components.noise_schedule, cond.conds, cond.uncond, job.cfg_scales,
                               latent_shape, 2 * n_steps + 2, image_cond=job.image_cond, blend=blend)
        noise = None
        if spec.noise == "rng":
            noise = lambda s, s_next: gen.next().float()  # noqa: E731
        elif spec.noise == "brownian":
            noise = _brownian(x, sig, job.seeds)
        kwargs = dict(spec.options)
        if spec.eta_default is not None:
            kwargs["eta"] = job.eta
        step_cb = (lambda i, *_: callback(i + 1, n_steps)) if callback else None
        kv = getattr(be, "kv", None)
        with kv.scope(denoiser.contexts) if kv else contextlib.nullcontext():
            x = spec.fn(denoiser, x, sig, noise=noise, callback=step_cb, **kwargs)
        x = x / math.sqrt(1.0 + float(sig[-1]) ** 2)
        if job.latent_mask is not None:           # and once more after the last step (the web UI's sample())
            x = x * job.latent_mask + job.init_latents * (1.0 - job.latent_mask)
        return x

    def _start(self, job: Job, noise: torch.Tensor, sig) -> torch.Tensor:
        """The loop's first latents from the image's first noise draw: txt2img scales the noise to
        the first sigma (variance-preserving for the timestep samplers); img2img adds it, times
        ``initial_noise_multiplier``, to the encoded initial images (``sdrt.img2img``)."""
        sigma = float(sig[0])
        if not job.img2img:
            return noise * (sigma if job.sampler.init == "sigma" else math.sqrt(1.0 + sigma ** 2))
        return job.init_latents + noise * (job.params.initial_noise_multiplier * sigma)

    def prepare_latents(self, job: Job) -> None:
        """img2img's initial latents (``encode_images``); for inpainting the latent mask and the
        masked area's fill (``sdrt.inpaint``); for 9-channel inpainting models the mask and
        masked-image latents they take at every call (txt2img: everything masked)."""
        from .inpaint import latent_mask
        c, p, be = self.components, job.params, self.backend
        f = c.latent_factor
        h, w = p.height // f, p.width // f
        init = job.init_latents            # given: the hires fix's latent path
        if init is None and job.init_images is not None:
            init = self.encode_images(job)
        mask = None
        if job.inpainting:
            mask = torch.stack([torch.from_numpy(latent_mask(item.mask, (w, h), p.mask_round))
                                for item in job.inpainting])[:, None].to(be.device)
            job.latent_mask = mask.expand(-1, c.latent_channels, -1, -1).float()
            if p.inpainting_fill == 2:        # the image's own noise (its seed) in the masked area
                noise = ImageRNG((c.latent_channels, h, w), job.seeds, source=p.rng, device=be.device,
                                 latent_factor=f).next().float()
                init = init * (1.0 - job.latent_mask) + noise * job.latent_mask
            elif p.inpainting_fill == 3:
                init = init * (1.0 - job.latent_mask)
        job.init_latents = init
        if c.inpainting:
            job.image_cond = self._masked_image_latents(job, (h, w))

    def _masked_image_latents(self, job: Job, latent_size: tuple[int, int]) -> torch.Tensor:
        """A 9-channel model's extra input (B, 1 + C, h, w): the mask (1 = repaint) at the latent
        size, then the latents of the image with the masked area removed (all of it without a mask)."""
        from .images import to_tensor_array
        p, b = job.params, job.batch_size
        if job.init_images is not None:
            source = torch.stack([torch.from_numpy(to_tensor_array(im)) for im in job.init_images])
        else:
            source = torch.zeros((b, 3, p.height, p.width))
        if job.inpainting:
            cond_mask = torch.stack([torch.from_numpy(np.asarray(item.mask, dtype=np.float32) / 255.0)
                                     for item in job.inpainting])[:, None]
            if p.mask_round:
                cond_mask = torch.round(cond_mask)
        else:
            cond_mask = torch.ones((b, 1, source.shape[2], source.shape[3]))
        masked = source * (1.0 - cond_mask)
        latents = self._sample_encoded(job, list(masked), ENCODE_SEED_OFFSET + 1)
        lat = torch.cat(latents)
        small = torch.nn.functional.interpolate(cond_mask, size=latent_size).to(lat.device)
        return torch.cat([small, lat], dim=1).float()

    def encode_images(self, job: Job) -> torch.Tensor:
        """img2img's initial latents (B, C, h, w), float32 on the backend's device: each image
        encoded by the VAE and a latent sampled from the posterior with noise from the image's
        seed + ``ENCODE_SEED_OFFSET`` (``sdrt.img2img``); in resize mode 3 encoded at its own size
        (rounded down to the latent factor) and resized bilinearly to the output's latent size."""
        from .images import LANCZOS, to_tensor_array
        c, p = self.components, job.params
        f = c.latent_factor
        pixels = []
        for image in job.init_images:
            if p.resize_mode == 3 and (image.width % f or image.height % f):
                image = image.resize((max(f, image.width // f * f), max(f, image.height // f * f)), resample=LANCZOS)
            pixels.append(torch.from_numpy(to_tensor_array(image)))
        out = []
        for latent in self._sample_encoded(job, pixels, ENCODE_SEED_OFFSET):
            if latent.shape[2:] != (p.height // f, p.width // f):
                latent = torch.nn.functional.interpolate(latent, size=(p.height // f, p.width // f), mode="bilinear")
            out.append(latent)
        return torch.cat(out).float()

    def _sample_encoded(self, job: Job, pixels: list, seed_offset: int) -> list:
        """Each image (3, H, W) in [-1, 1] encoded by the VAE (in one call when they share a size)
        and a scaled latent (1, C, h, w) sampled from its posterior with noise from its image's
        seed + ``seed_offset`` (``sdrt.img2img``)."""
        c, p, be = self.components, job.params, self.backend
        if len({tuple(t.shape) for t in pixels}) == 1:
            moments = be.encode_image(torch.stack(pixels).to(be.device)).split(1)
        else:
            moments = [be.encode_image(t[None].to(be.device)) for t in pixels]
        scale = float(getattr(c.vae.config, "scaling_factor", 0.18215))
        out = []
        for i, m in enumerate(moments):
            eps = ImageRNG((c.latent_channels, m.shape[2], m.shape[3]), [(job.seeds[i] + seed_offset) % 2 ** 32],
                           source=p.rng, device=be.device, latent_factor=c.latent_factor).next()
            out.append(sample_latents(m, eps, scale))
        return out

    def decode(self, latents: torch.Tensor) -> Decoded:
        """Stage 4: latents (B, C, h, w) -> pixels and uint8 images on the host."""
        t0 = time.perf_counter()
        decoded = self.backend.decode(latents)
        pixels = ((decoded + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).cpu().numpy()
        return Decoded.from_pixels(pixels, dict(vae=time.perf_counter() - t0))

    def result(self, job: Job, cond: Conditioning, out: Decoded) -> GenerationResult:
        """Stage 5: PIL images, the web UI's infotexts, seeds and per-stage timings."""
        texts = [self.infotext(job, i) for i in range(job.batch_size)]
        images = [Image.fromarray(p) for p in out.images]
        if job.inpainting:                        # the original pixels back outside the mask
            from .inpaint import apply_overlay
            images = [apply_overlay(im, item) for im, item in zip(images, job.inpainting)]
        timings = dict(text_encoder=cond.seconds, loop=out.timings["loop"], unet=out.timings["loop"],
                       vae=out.timings["vae"], total=time.perf_counter() - cond.started)
        if job.img2img:
            timings["vae_encode"] = job.encode_seconds
        return GenerationResult(images=images, infotexts=texts,
                                seeds=list(job.seeds), timings=timings, pixels=out.pixels)

    def _noise(self, job: Job):
        """(latent shape (C, h, w), the images' noise generator) for a job."""
        c, p = self.components, job.params
        f = c.latent_factor
        shape = (c.latent_channels, p.height // f, p.width // f)
        gen = ImageRNG(shape, job.seeds, subseeds=job.subseeds, subseed_strength=p.subseed_strength,
                       seed_resize_from=p.seed_resize_from, source=p.rng,
                       eta_noise_seed_delta=p.eta_noise_seed_delta, device=self.backend.device, latent_factor=f)
        return shape, gen

    # ------------------------------------------------------------------ the static loop

    def set_fast_path(self, enabled: bool = True, use_kernel: bool = True, capture: bool | None = None,
                      cache_size: int = 4, cuda=None) -> None:
        """Run requests that the static loop supports (``sdrt.fastpath``: Euler, Euler a, DDIM,
        DPM++ 2M, DPM++ 2M SDE, LCM; plain or edited prompts, no AND) as a static loop: per-step tables on
        the device, the fused step (the CUDA kernel on a GPU unless ``use_kernel=False``), and on
        a CUDA device one CUDA graph per configuration, captured on first use and replayed
        (``capture=False`` keeps it eager; ``cuda``: the CUDA graph API, a fake in tests). Other
        requests keep the eager loop. On a graph replay a progress callback is called once, after
        the last step. ``enabled=False`` turns it off and releases the loops."""
        from .fastpath import LoopCache
        if self.loops is not None:
            self.loops.clear()                    # their graphs and cached K/V entries go
        self.fast_path = dict(use_kernel=use_kernel, capture=capture, cuda=cuda) if enabled else None
        self.loops = LoopCache(cache_size)

    def tune(self, **options) -> None:
        """The torch backend's speed options (``TorchBackend.tune``: compile, channels_last,
        cudnn_benchmark, sdpa_order, quantize). Captured graphs that the change invalidates are dropped
        (they are captured again on next use)."""
        tune = getattr(self.backend, "tune", None)
        if tune is None:
            raise ValueError(f"the {type(self.backend).__name__} has no speed options to tune "
                             "(they belong to backend='torch')")
        if tune(**options) and self.loops is not None:
            self.loops.clear()

    def _sample_static(self, job: Job, cond: Conditioning, callback=None) -> Decoded:
        """Stages 3 and 4 on the static loop (same images as the eager loop up to float rounding)."""
        from .fastpath import CaptureFailed, StaticLoop
        be, spec, sig = self.backend, job.sampler, job.sigmas
        n_steps = len(sig) - 1
        t0 = time.perf_counter()
        latent_shape, gen = self._noise(job)
        distinct, index = plan_contexts(cond.conds, cond.uncond, n_steps, be.device, be.dtype)
        inpaint = bool(job.inpainting)
        extra = 0 if job.image_cond is None else int(job.image_cond.shape[1])
        key = (job.batch_size, latent_shape, spec.name, sig.tobytes(), job.eta, tuple(index),
               tuple(distinct[0].shape), len(distinct), bool(job.params.tiling), inpaint, extra)
        if key in self.loops.refused:
            return self._sample_eager(job, cond, callback)
        loop = self.loops.get(key, lambda: StaticLoop(
            be, self.components.noise_schedule, spec, sig, job.eta, job.batch_size, latent_shape, index,
            tuple(distinct[0].shape), len(distinct), inpaint=inpaint, image_cond_channels=extra, **self.fast_path))
        first = gen.next().float()
        x0 = self._start(job, first, sig) / loop.init_scale if job.img2img else first
        if spec.noise == "brownian":      # the increments between each drawing step's sigmas
            tree = _brownian(x0, sig, job.seeds)
            noise = [tree(sig[i], sig[i + 1]) for i, d in enumerate(loop.draws) if d]
        else:
            noise = [gen.next().float() for _ in range(sum(loop.draws))]     # the eager loop's order
        try:
            pixels, images, finite, vae = loop.run(x0, noise, distinct, job.cfg_scales, callback,
                                                   inpaint=(job.init_latents, job.latent_mask) if inpaint else None,
                                                   image_cond=job.image_cond)
        except CaptureFailed as e:        # once per configuration: it runs eagerly from now on
            logger.warning("%s; this configuration (%s, %d steps, batch %d) runs on the eager loop from now on",
                           e, spec.name, n_steps, job.batch_size)
            self.loops.refuse(key, str(e))
            return self._sample_eager(job, cond, callback)
        loop_seconds = time.perf_counter() - t0 - vae
        return Decoded(pixels=pixels, images=images, finite=[bool(f) for f in finite],
                       timings=dict(loop=loop_seconds, vae=vae))

    # ------------------------------------------------------------------ infotext

    @staticmethod
    def _inpaint_infotext(job: Job, i: int) -> dict:
        """The web UI's extra generation parameters of an inpainting."""
        from .inpaint import FILL_MODES
        p, item = job.params, job.inpainting[i]
        return {"Mask blur": p.mask_blur or None,
                "Mask mode": "Inpaint not masked" if p.inpainting_mask_invert else None,
                "Masked content": FILL_MODES[p.inpainting_fill] if p.inpainting_fill != 1 else None,
                "Inpaint area": "Only masked" if item.crop else None,
                "Masked area padding": p.inpaint_full_res_padding if item.crop else None}

    def infotext(self, job: Job, i: int) -> str:
        """The web UI's "parameters" text of image ``i`` of a job."""
        p, spec = job.params, job.sampler
        resize = p.seed_resize_from
        params = {
            "Prompt": job.prompts[i], "Negative prompt": job.negative_prompts[i],
            "Steps": p.steps, "Sampler": spec.name, "Schedule type": p.schedule,
            "CFG scale": job.cfg_scales[i], "Seed": job.seeds[i], "Size": f"{p.width}x{p.height}",
            "Model hash": self.components.model_hash, "Model": self.components.name,
            **self.vae_infotext(p.vae),
            "Variation seed": job.subseeds[i] if p.subseed_strength else None,
            "Variation seed strength": p.subseed_strength or None,
            "Seed resize from": f"{resize[0]}x{resize[1]}" if resize and min(resize) > 0 else None,
            "Denoising strength": p.denoising_strength if job.img2img or job.hires else None,
            "Noise multiplier": p.initial_noise_multiplier if job.img2img and p.initial_noise_multiplier != 1 else None,
            **(self._inpaint_infotext(job, i) if job.inpainting else {}),
            "Clip skip": p.clip_skip,                       # format() leaves out 1
            "ENSD": p.eta_noise_seed_delta if p.eta_noise_seed_delta and spec.noise == "rng" else None,
            "RNG": RNG_INFOTEXT[p.rng],
            "Emphasis": p.emphasis if p.emphasis != "Original" else None,
            "Tiling": True if p.tiling else None,
            **(job.hires.infotext if job.hires else {}),
            "Lora hashes": self._lora_state.hashes(job.loras) if job.loras else None,
            "TI hashes": self.embeddings.hashes(sorted(job.embeddings_used))
            if self.embeddings is not None and job.embeddings_used else None,
            ("Eta DDIM" if spec.name == "DDIM" else "Eta"):
                p.eta if spec.eta_default is not None and p.eta is not None
                and p.eta != spec.eta_default else None,       # only samplers that use eta record it
            "Version": f"sdrt {__version__}",
        }
        return infotext.format(params)
