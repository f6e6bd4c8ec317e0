"""The AUTOMATIC1111 web UI's HTTP API over an ``sdrt.Batcher`` (a FastAPI app).

``create_app(config)`` builds the app; ``sdrt.serving.deploy`` runs it as a Ray Serve deployment
(one replica per GPU or CPU worker) or, with ``--no-ray``, under uvicorn in one process.

Routes (the web UI's names and JSON shapes, so existing clients such as ``webuiapi`` work):
``POST /sdapi/v1/txt2img``, ``GET /sdapi/v1/samplers``, ``/schedulers``, ``/sd-models``,
``GET|POST /sdapi/v1/options``, ``GET /sdapi/v1/progress``, ``GET /sdapi/v1/scripts``,
``POST /sdapi/v1/png-info``, ``POST /sdapi/v1/interrogate``, the resource lists clients read on start (``/upscalers``,
``/embeddings``, ``/cmd-flags``, ``/sd-vae``, ...; empty where sdrt has none), plus ``GET /health``
and ``GET /metrics`` (Prometheus text format).

Errors are JSON ``{"error": kind, "detail": message}``: 400 malformed JSON, 413 body too large,
422 invalid or unsupported arguments, 503 queue full (with Retry-After), 504 timeout, 500 a
failed generation (NaN/Inf image). No request can take the server down.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import logging
import time
from datetime import datetime

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, create_model

from .. import infotext
from .._version import __version__
from ..batcher import Batcher, BatcherBusy, BatcherClosed, Interrupted, Request
from ..conditioning import EMPHASIS
from ..params import GenerationParams, image_seeds, scalar_type
from ..pipeline import Pipeline
from ..result import save_png
from ..samplers import SAMPLERS, resolve_sampler
from ..schedules import SCHEDULES, normalize_schedule
from .config import ServerConfig
from .guard import Guard, parse_auth
from .models import ModelPool

logger = logging.getLogger("sdrt.serving")

# the web UI's scheduler names (API "scheduler" accepts a name or a label)
SCHEDULER_NAMES = {s: s.lower().replace(" ", "_") for s in SCHEDULES}
RNG_SOURCES = {"GPU": "gpu", "CPU": "cpu", "NV": "nv"}


class _WebUIOnly(BaseModel):
    """The txt2img request's fields that are the web UI's own (its names for sampler and
    schedule, n_iter, what sdrt refuses); the generation arguments are added from
    ``GenerationParams`` (``webui`` names, web UI defaults) to make ``Txt2Img``."""

    model_config = ConfigDict(extra="allow")

    styles: list[str] | None = None
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    n_iter: int = 1
    restore_faces: bool | None = None
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_noise: float = 1.0
    override_settings: dict | None = None
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict = {}


def _webui_fields() -> dict:
    fields = {}
    for f in GenerationParams.fields():
        name, default = f.metadata["webui"], f.metadata["webui_default"]
        if name:
            kind = scalar_type(f)
            fields[name] = (kind | None if default is None else kind, default)
    return fields


Txt2Img = create_model("Txt2Img", __base__=_WebUIOnly, **_webui_fields())
Txt2Img.__doc__ = """The web UI's txt2img request, with its defaults. Fields sdrt does not implement are
accepted at their default values and refused (422) otherwise."""



class Img2Img(Txt2Img):
    """The web UI's img2img request: txt2img's fields, the initial images (base64 or data URLs)
    and, for inpainting, the mask and its settings (the web UI's defaults)."""

    init_images: list[str]
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


# the generation arguments that the web UI takes from its options (override_settings)
OPTION_FIELDS = {f.metadata["webui_option"]: f for f in GenerationParams.fields() if f.metadata["webui_option"]}


# field -> value sdrt implements; any other value is refused with a clear message
UNSUPPORTED_IMG2IMG = {"latent_mask": (None, ""), "image_cfg_scale": (None, 1.0, 1.5)}
WHY_UNSUPPORTED = {"latent_mask": " (a separate latent mask)", "image_cfg_scale": " (instruct-pix2pix models)"}
UNSUPPORTED = {"restore_faces": (None, False),
               "script_name": (None, ""), "alwayson_scripts": ({},), "s_churn": 0.0, "s_tmin": 0.0,
               "s_noise": 1.0, "save_images": False, "styles": (None, [])}
OPTION_KEYS = ("sd_model_checkpoint", *OPTION_FIELDS)
MAX_OTHER_OPTIONS = 2000      # web UI options kept without effect (the web UI has about 600)


class APIError(Exception):
    def __init__(self, status: int, kind: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.kind, self.detail, self.headers = status, kind, detail, headers


def _error(status, kind, detail, headers=None, request_id: str | None = None):
    body = {"error": kind, "detail": detail}
    if request_id and status >= 500:          # (every response carries it in X-Request-ID too)
        body["request_id"] = request_id
    return JSONResponse(body, status_code=status, headers=headers)


def _request_id(request: HTTPRequest) -> str | None:
    return getattr(request.state, "request_id", None)


async def _until_disconnected(request: HTTPRequest) -> None:
    """Completes when the client goes away (the guard watches the connection)."""
    event = getattr(request.state, "disconnected", None)
    if event is None:                       # not behind the guard: never
        await asyncio.Event().wait()
    await event.wait()


class ServerState:
    """One replica: the pipeline, its batcher, the options and the HTTP counters."""

    def __init__(self, config: ServerConfig, pipe: Pipeline | None = None):
        parse_auth(config.api_auth)                # a malformed credential list fails before the model loads
        self.config = config
        pipe = pipe or self._pipeline(config.model)
        if config.lora_dir and pipe.loras is None:
            pipe.set_lora_dir(config.lora_dir)
        if config.embeddings_dir and pipe.embeddings is None:
            pipe.set_embeddings_dir(config.embeddings_dir)
        if config.vae_dir and pipe.vaes is None:
            pipe.set_vae_dir(config.vae_dir)
        self.pool = ModelPool(config.model, config.models_dir, config.max_models, load=self._load,
                              loaded=(pipe, self._batcher(pipe)))
        self.first = self.pool.first
        self.options = {"sd_model_checkpoint": self.first.title,
                        **{k: _option_value(f.name, f.default) for k, f in OPTION_FIELDS.items()}}
        # web UI options outside the generation arguments: kept as set; the interrogator reads its own
        # (interrogate_*, with the web UI's defaults), the others have no effect
        from ..interrogator import InterrogateOptions
        self.other_options: dict = InterrogateOptions().to_webui()
        self.http = {}            # (path, status) -> count
        self.started = time.time()

    def _pipeline(self, model: str) -> Pipeline:
        cfg = self.config
        return Pipeline.from_pretrained(model, backend=cfg.backend, device=cfg.device, dtype=cfg.dtype,
                                        engine_dir=cfg.engine_dir if model == cfg.model else None,
                                        fast_path=cfg.fast_path, tune=dict(channels_last=cfg.channels_last,
                                                                           compile=cfg.compile,
                                                                           quantize=cfg.quantize),
                                        lora_dir=cfg.lora_dir, embeddings_dir=cfg.embeddings_dir,
                                        vae_dir=cfg.vae_dir)

    def _batcher(self, pipe: Pipeline) -> Batcher:
        cfg = self.config
        return Batcher(pipe, max_batch_size=cfg.max_batch_size, max_wait=cfg.max_wait, max_queue=cfg.max_queue,
                       timeout=cfg.timeout, threads=cfg.threads)

    def _load(self, model: str):
        pipe = self._pipeline(model)
        return pipe, self._batcher(pipe)

    def _current(self):
        """The loaded entry of the server's own model (sd_model_checkpoint), or its first."""
        try:
            key = self.pool.resolve(self.options["sd_model_checkpoint"]).key
        except ValueError:
            key = self.first.key
        return self.pool.loaded.get(key) or self.pool.loaded.get(self.first.key) or next(iter(self.pool.loaded.values()))

    @property
    def pipe(self) -> Pipeline:
        """The pipeline of the server's current model (``sd_model_checkpoint``)."""
        return self._current().pipe

    @property
    def batcher(self) -> Batcher:
        return self._current().batcher

    @property
    def model_title(self) -> str:
        return self.pool.resolve(self.options["sd_model_checkpoint"]).title

    @property
    def engine(self) -> Batcher:
        """Deprecated name of ``batcher`` (kept for one release)."""
        return self.batcher

    def checkpoint(self, opts: dict):
        """The model ``opts`` (a request's settings) name; 422 when the server does not offer it."""
        try:
            return self.pool.resolve(opts["sd_model_checkpoint"])
        except ValueError as e:
            raise APIError(422, "UnknownModel", str(e)) from None

    def settings(self, overrides: dict | None) -> dict:
        """Options for one request: the server's, then the request's override_settings."""
        opts = dict(self.options)
        for k, v in (overrides or {}).items():
            if k not in OPTION_KEYS:
                raise APIError(422, "UnsupportedOption", f"override_settings key {k!r} is not supported by sdrt; "
                                                         f"supported: {', '.join(OPTION_KEYS)}")
            opts[k] = v
        self.checkpoint(opts)
        if opts["randn_source"] not in RNG_SOURCES:
            raise APIError(422, "InvalidOption", f"randn_source must be one of {', '.join(RNG_SOURCES)}, "
                                                 f"got {opts['randn_source']!r}")
        if opts["emphasis"] not in EMPHASIS:
            raise APIError(422, "InvalidOption", f"emphasis must be one of {', '.join(EMPHASIS)}, "
                                                 f"got {opts['emphasis']!r}")
        layers = max(c.pipe.components.text_encoder.config.num_hidden_layers for c in self.pool.loaded.values())
        skip, ensd = opts["CLIP_stop_at_last_layers"], opts["eta_noise_seed_delta"]
        if isinstance(skip, bool) or not isinstance(skip, int) or not 1 <= skip <= layers:
            raise APIError(422, "InvalidOption", f"CLIP_stop_at_last_layers must be an integer in 1..{layers}, "
                                                 f"got {skip!r}")
        if isinstance(ensd, bool) or not isinstance(ensd, int) or not 0 <= ensd < 2 ** 32:
            raise APIError(422, "InvalidOption", f"eta_noise_seed_delta must be an integer in 0..{2 ** 32 - 1}, "
                                                 f"got {ensd!r}")
        return opts

    def requests_for(self, body: Txt2Img, pipe: Pipeline | None = None) -> tuple[list[Request], dict]:
        """One batcher request per image, with the web UI's seed rule; raises APIError (422).
        ``pipe``: the model's the request runs on (checked against its sizes and text encoder).
        An ``Img2Img`` body's images are decoded here (one image serves the batch; several set
        the batch size, the web UI's rule)."""
        cfg = self.config
        pipe = pipe or self.pipe
        unsupported = dict(UNSUPPORTED, **(UNSUPPORTED_IMG2IMG if isinstance(body, Img2Img) else {}))
        for name, allowed in unsupported.items():
            value = getattr(body, name)
            if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
                hint = WHY_UNSUPPORTED.get(name, "")
                raise APIError(422, "Unsupported", f"{name}={repr(value)[:60]} is not supported by sdrt{hint} "
                                                   f"(send {allowed if not isinstance(allowed, tuple) else allowed[0]!r})")
        images = self._init_images(body) if isinstance(body, Img2Img) else None
        batch_size = len(images) if images and 1 < len(images) <= body.batch_size else body.batch_size
        if images and len(images) > body.batch_size:
            raise APIError(422, "ValueError", f"init_images: {len(images)} images for batch_size {body.batch_size}; "
                                              "send one image, or at most batch_size")
        n = batch_size * body.n_iter
        if body.batch_size < 1 or body.n_iter < 1 or n > cfg.max_images:
            raise APIError(422, "ValueError", f"batch_size x n_iter must be between 1 and {cfg.max_images} images "
                                              f"on this server, got {body.batch_size} x {body.n_iter}")
        for side in ("width", "height"):
            if not 1 <= getattr(body, side) <= cfg.max_side:
                raise APIError(422, "ValueError", f"{side} must be in 1..{cfg.max_side} on this server, "
                                                  f"got {getattr(body, side)}")
        chars = len(body.prompt) + len(body.negative_prompt)
        if chars > cfg.max_prompt_chars:
            raise APIError(422, "ValueError", f"prompt and negative prompt hold {chars} characters; this server "
                                              f"accepts at most {cfg.max_prompt_chars}")
        opts = self.settings(body.override_settings)
        try:    # one resolution: an old combined name ("DPM++ 2M Karras") sets the schedule
            spec, schedule = resolve_sampler(body.sampler_name or body.sampler_index or "Euler",
                                             body.scheduler or "Automatic")
            schedule = normalize_schedule(schedule)
            seeds, subseeds = image_seeds(body.seed, body.subseed, n, body.subseed_strength)
        except ValueError as e:
            raise APIError(422, "ValueError", str(e)) from None
        resize = ((body.seed_resize_from_w, body.seed_resize_from_h)
                  if body.seed_resize_from_w > 0 and body.seed_resize_from_h > 0 else None)
        # the generation arguments under their web UI names, from the body and from the options
        common = {f.name: getattr(body, f.metadata["webui"]) for f in GenerationParams.fields()
                  if f.metadata["webui"] and f.name not in ("batch_size", "seed", "subseed")}
        common.update({f.name: opts[key] for key, f in OPTION_FIELDS.items()})
        common.update(rng=RNG_SOURCES[opts["randn_source"]], sampler=spec.name, schedule=schedule,
                      seed_resize_from=resize)
        if images:
            common.update(resize_mode=body.resize_mode)
            if body.initial_noise_multiplier is not None:
                common.update(initial_noise_multiplier=body.initial_noise_multiplier)
            if body.mask:
                common.update(self._inpainting_fields(body))
        reqs = [Request(seed=s, subseed=ss, **common, **({"init_images": images[k % len(images)]} if images else {}))
                for k, (s, ss) in enumerate(zip(seeds, subseeds))]
        # the text and step bounds; the images are processed once, when the batcher takes each request
        self.check_budget(reqs[0].replace(init_images=None, mask=None), n, pipe)
        return reqs, dict(sampler=spec.name, schedule=schedule, seeds=seeds, subseeds=subseeds, opts=opts,
                          batch_size=batch_size)

    @staticmethod
    def _inpainting_fields(body: "Img2Img") -> dict:
        """The mask (decoded, its alpha kept) and the inpainting settings of an img2img body."""
        from ..images import load_image
        blur = body.mask_blur
        if blur is None:
            if body.mask_blur_x != body.mask_blur_y:
                raise APIError(422, "Unsupported", f"mask_blur_x={body.mask_blur_x} and mask_blur_y={body.mask_blur_y} "
                                                   "differ; sdrt blurs the mask the same both ways (send mask_blur)")
            blur = body.mask_blur_x
        try:
            mask = load_image(body.mask, "mask", mask=True, allow_path=False)
        except ValueError as e:
            raise APIError(422, "ValueError", str(e)) from None
        return dict(mask=mask, mask_blur=blur, inpainting_fill=body.inpainting_fill,
                    inpaint_full_res=body.inpaint_full_res, inpaint_full_res_padding=body.inpaint_full_res_padding,
                    inpainting_mask_invert=bool(body.inpainting_mask_invert), mask_round=body.mask_round)

    def _init_images(self, body: "Img2Img") -> list:
        """The request's images, decoded and checked (sdrt.images), or APIError 422."""
        from ..images import load_image
        if not body.init_images:
            raise APIError(422, "ValueError", "init_images is empty: img2img needs at least one image")
        if len(body.init_images) > self.config.max_images:
            raise APIError(422, "ValueError", f"{len(body.init_images)} init_images; this server accepts at most "
                                              f"{self.config.max_images}")
        try:
            return [load_image(v, f"init_images[{i}]", allow_path=False) for i, v in enumerate(body.init_images)]
        except ValueError as e:
            raise APIError(422, "ValueError", str(e)) from None

    def check_budget(self, request: Request, images: int, pipe: Pipeline | None = None) -> None:
        """Refuse (422, naming the limit) a request whose text or work exceeds this server's bounds."""
        cfg = self.config
        pipe = pipe or self.pipe
        try:
            job = pipe.validate(request)
            cost = pipe.cost(job, max_texts=cfg.max_text_windows)     # tokenizes nothing past the bound
        except ValueError as e:
            raise APIError(422, "ValueError", str(e)) from None
        if any(abs(v) > cfg.max_cfg_scale for v in job.cfg_scales):
            raise APIError(422, "ValueError", f"cfg_scale must be within +-{cfg.max_cfg_scale:g} on this server "
                                              f"(max_cfg_scale), got {job.cfg_scales[0]:g}")
        if cost.max_weight > cfg.max_attention_weight:
            raise APIError(422, "ValueError", f"the prompt gives a token the attention weight {cost.max_weight:g}; "
                                              f"this server accepts at most {cfg.max_attention_weight:g} "
                                              "(max_attention_weight)")
        steps = job.steps + (job.hires.steps if job.hires else 0)
        if images * steps > cfg.max_image_steps:
            raise APIError(422, "TooMuchWork", f"{images} images x {steps} steps = {images * steps}; this "
                                               f"server accepts at most {cfg.max_image_steps} (max_image_steps)")
        if job.hires and max(job.hires.upscale_to) > cfg.max_side:
            w, h = job.hires.upscale_to
            raise APIError(422, "ValueError", f"the hires fix would upscale to {w}x{h}; this server accepts at most "
                                              f"{cfg.max_side} pixels a side (max_side)")
        if cost.and_parts > cfg.max_and_parts:
            raise APIError(422, "TooMuchWork", f"the prompt has {cost.and_parts} AND parts; this server accepts at "
                                               f"most {cfg.max_and_parts} per image (max_and_parts)")
        if cost.texts > cfg.max_text_windows or cost.text_windows > cfg.max_text_windows:
            size = f"{cost.windows} 77-token windows" if cost.windows else "at least one 77-token window"
            raise APIError(422, "TooMuchText", f"the prompts give {cost.texts} distinct texts of {size} to encode; "
                                               f"this server accepts at most {cfg.max_text_windows} windows "
                                               "(max_text_windows): fewer alternations or edits, a shorter prompt, "
                                               "or fewer steps")

    async def txt2img(self, body: Txt2Img, disconnected=None) -> dict:
        """txt2img, or img2img for an ``Img2Img`` body. ``disconnected``: an awaitable that
        completes when the client goes away; its requests are then cancelled (their batch-mates
        are not affected)."""
        def check_and_submit():       # loads the model if need be, tokenizes the texts: off the event loop
            checkpoint = self.checkpoint(self.settings(body.override_settings))
            using = self.pool.use(checkpoint)          # held (never unloaded) until the request is answered
            try:
                entry = using.__enter__()
            except ValueError as e:                    # a checkpoint that does not load: the request's error
                raise APIError(422, "ModelError", str(e)) from None
            try:
                reqs, meta = self.requests_for(body, entry.pipe)
                return [entry.batcher.submit(r) for r in reqs], meta, entry, using
            except BaseException:
                using.__exit__(None, None, None)
                raise
        futures, meta, entry, using = await asyncio.to_thread(check_and_submit)
        try:
            return await self._answer(body, futures, meta, entry.pipe, disconnected)
        finally:
            using.__exit__(None, None, None)

    async def _answer(self, body: Txt2Img, futures, meta, pipe: Pipeline, disconnected) -> dict:
        async def settle(f):          # an interrupted image is left out of the answer, as the web UI does
            try:
                return await asyncio.wrap_future(f)
            except Interrupted as e:
                return e
        gathered = asyncio.gather(*[settle(f) for f in futures])
        watcher = asyncio.ensure_future(disconnected) if disconnected is not None else None
        try:
            if watcher is not None:
                await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not gathered.done():
                    raise asyncio.CancelledError("the client disconnected")
            results = await gathered
        except BaseException as e:  # noqa: BLE001 - cancelled or failed: cancel the rest, answer the error
            for f in futures:
                f.cancel()
            gathered.cancel()
            raise _api_error(e) from None
        finally:
            if watcher is not None:
                watcher.cancel()
        kept = [i for i, r in enumerate(results) if not isinstance(r, Interrupted)]
        if len(kept) < len(results):
            meta = dict(meta, first_seed=meta["seeds"][0], first_subseed=meta["subseeds"][0],
                        seeds=[meta["seeds"][i] for i in kept], subseeds=[meta["subseeds"][i] for i in kept])
            results = [results[i] for i in kept]
        images = [_png_base64(r.images[0], r.infotexts[0]) for r in results] if body.send_images else []
        infotexts = [r.infotexts[0] for r in results]
        c = pipe.components
        vae_info = pipe.vae_infotext(meta["opts"]["sd_vae"])
        info = {
            "prompt": body.prompt, "all_prompts": [body.prompt] * len(results),
            "negative_prompt": body.negative_prompt, "all_negative_prompts": [body.negative_prompt] * len(results),
            "seed": meta.get("first_seed", meta["seeds"][0] if meta["seeds"] else None), "all_seeds": meta["seeds"],
            "subseed": meta.get("first_subseed", meta["subseeds"][0] if meta["subseeds"] else None),
            "all_subseeds": meta["subseeds"], "subseed_strength": body.subseed_strength,
            "width": body.width, "height": body.height, "sampler_name": meta["sampler"],
            "cfg_scale": body.cfg_scale, "steps": body.steps, "batch_size": meta["batch_size"],
            "restore_faces": False, "face_restoration_model": None, "sd_model_name": c.name,
            "sd_model_hash": c.model_hash, "sd_vae_name": vae_info.get("VAE"), "sd_vae_hash": vae_info.get("VAE hash"),
            "seed_resize_from_w": body.seed_resize_from_w, "seed_resize_from_h": body.seed_resize_from_h,
            "denoising_strength": body.denoising_strength if isinstance(body, Img2Img) or body.enable_hr else None,
            "extra_generation_params": {"Schedule type": meta["schedule"]},
            "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
            "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"),
            "clip_skip": meta["opts"]["CLIP_stop_at_last_layers"],
            "is_using_inpainting_conditioning": c.inpainting,
            "version": f"sdrt {__version__}",
            "timings": [r.timings for r in results],
        }
        parameters = body.model_dump()
        if isinstance(body, Img2Img) and not body.include_init_images:     # the web UI leaves them out
            parameters.update(init_images=None, mask=None)
        return {"images": images, "parameters": parameters, "info": json.dumps(info)}

    def progress(self) -> dict:
        p = self.batcher.progress()
        frac = p["step"] / p["steps"] if p["steps"] else 0.0
        elapsed = time.perf_counter() - p["started"] if p["started"] else 0.0
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        return {"progress": frac, "eta_relative": eta,
                "state": {"skipped": False, "interrupted": False, "stopping_generation": False,
                          "job": f"batch of {p['batch']}" if p["batch"] else "", "job_count": p["queued"] + (p["batch"] > 0),
                          "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"), "job_no": p["job_no"],
                          "sampling_step": p["step"], "sampling_steps": p["steps"]},
                "current_image": None, "textinfo": None, "queued": p["queued"]}

    def metrics_text(self) -> str:
        m = self.batcher.metrics
        lines = ["# HELP sdrt_queue_length Images waiting for a batch.", "# TYPE sdrt_queue_length gauge",
                 f"sdrt_queue_length {self.batcher.queue_length()}",
                 "# HELP sdrt_requests_total Images by outcome.", "# TYPE sdrt_requests_total counter"]
        for outcome in ("ok", "failed", "invalid", "busy", "timeout", "cancelled"):
            lines.append(f'sdrt_requests_total{{outcome="{outcome}"}} {m["requests"][outcome]}')
        lines += ["# HELP sdrt_batches_total Batches run.", "# TYPE sdrt_batches_total counter",
                  f"sdrt_batches_total {m['batches']}",
                  "# HELP sdrt_batch_size Images per batch.", "# TYPE sdrt_batch_size histogram"]
        hist = m["batch_size"]
        for le, count in hist.cumulative():
            if le == "+Inf" or int(le) <= self.batcher.max_batch_size:
                lines.append(f'sdrt_batch_size_bucket{{le="{le}"}} {count}')
        lines += [f"sdrt_batch_size_sum {hist.sum}", f"sdrt_batch_size_count {hist.count}",
                  "# HELP sdrt_stage_seconds Seconds per image and stage (queue, text_encoder, loop, vae, total; unet: the old name of loop).",
                  "# TYPE sdrt_stage_seconds histogram"]
        for stage, h in m["latency"].items():
            for le, count in h.cumulative():
                lines.append(f'sdrt_stage_seconds_bucket{{stage="{stage}",le="{le}"}} {count}')
            lines += [f'sdrt_stage_seconds_sum{{stage="{stage}"}} {h.sum}',
                      f'sdrt_stage_seconds_count{{stage="{stage}"}} {h.count}']
        lines += ["# HELP sdrt_http_responses_total HTTP responses by path and status.",
                  "# TYPE sdrt_http_responses_total counter"]
        for (path, status), count in sorted(self.http.items()):
            lines.append(f'sdrt_http_responses_total{{path="{path}",status="{status}"}} {count}')
        return "\n".join(lines) + "\n"


def _option_value(name: str, value):
    """A generation argument's value as the web UI's option holds it."""
    return {v: k for k, v in RNG_SOURCES.items()}[value] if name == "rng" else value


def _api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):
        return APIError(422, "ValueError", str(e))
    if isinstance(e, BatcherBusy):
        return APIError(503, "Busy", str(e), {"Retry-After": "1"})
    if isinstance(e, BatcherClosed):
        return APIError(503, "Closed", str(e))
    if isinstance(e, TimeoutError):
        return APIError(504, "Timeout", str(e) or "the request timed out")
    if isinstance(e, asyncio.CancelledError):
        return APIError(499, "Cancelled", "the request was cancelled")
    return APIError(500, type(e).__name__, str(e))


async def _empty_list():
    return []


class PNGInfo(BaseModel):
    image: str = ""


def _png_info(data: str) -> dict:
    """The web UI's png-info: the image's ``parameters`` text, its other text chunks, and the
    parameters parsed as the web UI's ``parse_generation_parameters`` gives them."""
    from PIL import Image, UnidentifiedImageError
    data = data.strip()
    if data.startswith("data:") and "," in data:           # a data URL, as browsers send them
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
        image = Image.open(io.BytesIO(raw))
    except (ValueError, UnidentifiedImageError, OSError) as e:
        raise APIError(422, "ValueError", f"image must be a base64 PNG or JPEG: {type(e).__name__}: {e}") from None
    items = {k: v for k, v in (image.info or {}).items() if isinstance(v, str)}
    text = items.pop("parameters", "")
    return {"info": text, "items": items, "parameters": infotext.parse(text) if text else {}}


class InterrogateRequest(BaseModel):
    image: str = ""
    model: str = "clip"


class Interrogation:
    """The server's interrogator (``ServerConfig.interrogator``), loaded on the first request, as
    the web UI loads its models on first use; one interrogation at a time."""

    def __init__(self, config: ServerConfig):
        import threading
        self.config, self.lock, self.interrogator = config, threading.Lock(), None

    def __call__(self, data: str, options: dict) -> str:
        from ..images import load_image
        from ..interrogator import InterrogateOptions, Interrogator
        try:
            image = load_image(data, "image", allow_path=False)
            opts = InterrogateOptions().with_webui(options)
        except ValueError as e:
            raise APIError(422, "ValueError", str(e)) from None
        with self.lock:
            if self.interrogator is None:
                cfg = self.config
                backend = cfg.backend if cfg.backend in ("torch", "onnxruntime") else "torch"
                try:
                    self.interrogator = Interrogator.from_pretrained(cfg.interrogator, backend=backend,
                                                                     device=cfg.device, lists=cfg.interrogator_lists)
                except (ValueError, RuntimeError, OSError) as e:     # the server's configuration, not the request
                    raise APIError(503, "InterrogatorUnavailable", f"the interrogator could not be loaded "
                                                                   f"({cfg.interrogator}): {e}") from None
            self.interrogator.options = opts
            return self.interrogator.interrogate(image, mode="classic")


class _ExtrasSettings(BaseModel):
    """The web UI's Extras request settings (upscaling; face restoration is not in sdrt)."""

    resize_mode: int = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False


class ExtrasSingleImage(_ExtrasSettings):
    image: str = ""


class _ExtrasFile(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchImages(_ExtrasSettings):
    imageList: list[_ExtrasFile]


def _extras(settings: _ExtrasSettings, data: str, name: str) -> tuple[str, str]:
    """One image through the Extras upscaling: (base64 PNG, the info text); APIError 422 for a bad
    image or setting. The image's own infotext is kept, the upscaling's is added as the web UI
    adds it (its ``postprocessing`` text)."""
    from ..images import load_image
    from ..upscale import extras
    if settings.gfpgan_visibility or settings.codeformer_visibility:
        raise APIError(422, "Unsupported", "face restoration (gfpgan_visibility, codeformer_visibility) is not in sdrt; "
                                           "send 0")
    try:
        image = load_image(data, name, allow_path=False)
        raw = image.info.get("parameters")
        out, info = extras(image, settings.resize_mode, settings.upscaling_resize, settings.upscaling_resize_w,
                           settings.upscaling_resize_h, settings.upscaling_crop, settings.upscaler_1,
                           settings.upscaler_2, settings.extras_upscaler_2_visibility)
    except ValueError as e:
        raise APIError(422, "ValueError", str(e)) from None
    text = ", ".join(f"{k}: {v}" for k, v in info.items())
    buf = io.BytesIO()
    from PIL.PngImagePlugin import PngInfo
    meta = PngInfo()
    if raw:
        meta.add_text("parameters", raw)
    meta.add_text("postprocessing", text)
    out.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode(), text


def _png_base64(image, text: str) -> str:
    return base64.b64encode(save_png(image, io.BytesIO(), text).getvalue()).decode()


def create_app(config: ServerConfig | None = None, state: ServerState | None = None) -> FastAPI:
    """The FastAPI app for one replica (loads the model unless ``state`` is given)."""
    state = state or ServerState(config or ServerConfig())
    app = FastAPI(title="sdrt", version=__version__)
    app.state.sdrt = state
    cfg = state.config
    # outermost: body limit and deadline, credentials, request ids (sdrt.serving.guard)
    app.add_middleware(Guard, max_body_bytes=cfg.max_body_bytes, max_image_body_bytes=cfg.max_image_body_bytes,
                       body_timeout=cfg.body_timeout,
                       api_auth=cfg.api_auth)

    @app.middleware("http")
    async def counts_and_errors(request: HTTPRequest, call_next):
        try:
            response = await call_next(request)
        except Exception as e:  # noqa: BLE001 - never let one request take the server down
            logger.exception("500 on %s %s (request %s)", request.method, request.url.path, _request_id(request))
            response = _error(500, type(e).__name__, str(e), request_id=_request_id(request))
        key = (request.url.path, response.status_code)
        state.http[key] = state.http.get(key, 0) + 1
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            msg = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
            return _error(400, "MalformedJSON", f"the request body is not valid JSON: {msg}".rstrip(": "))
        parts = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors]
        return _error(422, "ValidationError", "; ".join(parts))

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, exc: APIError):
        if exc.status >= 500:
            logger.error("%d on %s %s (request %s): %s", exc.status, request.method, request.url.path,
                         _request_id(request), exc.detail)
        return _error(exc.status, exc.kind, exc.detail, exc.headers, request_id=_request_id(request))

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2Img, request: HTTPRequest):
        return await state.txt2img(body, _until_disconnected(request))

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2Img, request: HTTPRequest):
        return await state.txt2img(body, _until_disconnected(request))

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in SAMPLERS.values()]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": SCHEDULER_NAMES[s], "label": s, "aliases": None,
                 "default_rho": 7.0 if s == "Karras" else (1.0 if s == "Polyexponential" else -1.0),
                 "need_inner_model": s in ("Uniform", "SGM Uniform")} for s in SCHEDULES]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [c.to_json() for c in state.pool.checkpoints]

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        await asyncio.to_thread(state.pool.refresh)
        return None

    @app.get("/sdapi/v1/options")
    async def get_options():
        return {**state.other_options, **state.options}

    @app.post("/sdapi/v1/options")
    async def set_options(body: dict):
        if cfg.freeze_settings:
            raise APIError(403, "Frozen", "this server's options are frozen (freeze_settings); per-request "
                                          "override_settings still apply")
        # the web UI's options sdrt does not implement are kept as set and returned by GET (clients
        # save and restore all of them); the ones it implements are checked and applied
        others = {k: v for k, v in body.items() if k not in OPTION_KEYS}
        if len(set(state.other_options) | set(others)) > MAX_OTHER_OPTIONS:
            raise APIError(422, "TooManyOptions", f"this server keeps at most {MAX_OTHER_OPTIONS} options it does not "
                                                  "implement")
        body = {k: v for k, v in body.items() if k in OPTION_KEYS}
        state.settings(body)                       # validates every key and value first
        if body.get("sd_vae") not in (None, "Automatic", "None"):
            try:                                   # the file is found and fits the model
                await asyncio.to_thread(state.pipe.validate, GenerationParams(vae=body["sd_vae"]))
            except ValueError as e:
                raise APIError(422, "InvalidOption", f"sd_vae: {e}") from None
        if "sd_model_checkpoint" in body:          # the web UI loads the model before answering
            checkpoint = state.checkpoint(body)

            def load():
                with state.pool.use(checkpoint):
                    pass
            try:
                await asyncio.to_thread(load)
            except ValueError as e:
                raise APIError(422, "ModelError", str(e)) from None
            body = dict(body, sd_model_checkpoint=checkpoint.title)
        state.options.update(body)
        state.other_options.update(others)
        return None

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        for entry in list(state.pool.loaded.values()):
            entry.batcher.interrupt()
        return None

    @app.post("/sdapi/v1/skip")
    async def skip():
        for entry in list(state.pool.loaded.values()):
            entry.batcher.skip()
        return None

    @app.get("/sdapi/v1/progress")
    async def progress():
        return state.progress()

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    # what this server has of the web UI's other resources: the routes answer in the web UI's
    # shapes, so clients that list them on start work; sdrt has none of these yet
    empty_lists = ("hypernetworks", "face-restorers", "realesrgan-models",
                   "prompt-styles")
    for name in empty_lists:
        app.add_api_route(f"/sdapi/v1/{name}", _empty_list, methods=["GET"], name=name)

    def library_routes(kind: str, attr: str, empty) -> None:
        """GET /sdapi/v1/<kind> lists the current model's files (its Pipeline.<attr> library) in the
        web UI's shape; POST /sdapi/v1/refresh-<kind> reads every loaded model's folder again."""
        async def listing():
            library = getattr(state.pipe, attr)
            return library.listing() if library is not None else json.loads(empty)

        async def refresh():
            for entry in list(state.pool.loaded.values()):
                library = getattr(entry.pipe, attr)
                if library is not None:
                    await asyncio.to_thread(library.refresh)
            return None
        app.add_api_route(f"/sdapi/v1/{kind}", listing, methods=["GET"], name=kind)
        refresh_name = {"sd-vae": "vae"}.get(kind, kind)
        app.add_api_route(f"/sdapi/v1/refresh-{refresh_name}", refresh, methods=["POST"], name=f"refresh-{kind}")

    library_routes("loras", "loras", "[]")
    library_routes("sd-vae", "vaes", "[]")
    library_routes("embeddings", "embeddings", '{"loaded": {}, "skipped": {}}')

    @app.get("/sdapi/v1/upscalers")
    async def upscalers():
        from ..upscale import UPSCALERS
        return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4} for n in UPSCALERS]

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes():
        from ..hires import LATENT_MODES
        return [{"name": n} for n in LATENT_MODES]

    @app.get("/sdapi/v1/cmd-flags")
    async def cmd_flags():
        flags = dataclasses.asdict(state.config)
        flags["api_auth"] = "***" if flags.get("api_auth") else None       # never echo credentials
        return flags

    @app.post("/sdapi/v1/extra-single-image")
    async def extra_single_image(body: ExtrasSingleImage):
        image, text = await asyncio.to_thread(_extras, body, body.image, "image")
        return {"html_info": f"<p>{text}</p>", "image": image}

    @app.post("/sdapi/v1/extra-batch-images")
    async def extra_batch_images(body: ExtrasBatchImages):
        if len(body.imageList) > cfg.max_images:
            raise APIError(422, "ValueError", f"{len(body.imageList)} images; this server accepts at most "
                                              f"{cfg.max_images} per request")
        done = [await asyncio.to_thread(_extras, body, f.data, f"imageList[{i}]") for i, f in enumerate(body.imageList)]
        return {"html_info": f"<p>{done[0][1] if done else ''}</p>", "images": [image for image, _ in done]}

    @app.post("/sdapi/v1/png-info")
    async def png_info(body: PNGInfo):
        return _png_info(body.image)

    interrogation = Interrogation(cfg)

    @app.post("/sdapi/v1/interrogate")
    async def interrogate(body: InterrogateRequest):
        if body.model != "clip":       # the web UI's answer to a model it does not have (deepdanbooru: not in sdrt)
            raise APIError(404, "HTTPException", "Model not found")
        options = {**state.other_options}
        try:
            caption = await asyncio.to_thread(interrogation, body.image, options)
        except ValueError as e:
            raise APIError(422, "ValueError", str(e)) from None
        return {"caption": caption}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_title, "backend": state.config.backend,
                "device": state.config.device, "queue": state.batcher.queue_length(),
                "uptime_s": round(time.time() - state.started, 1), "version": __version__}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics_text(), media_type="text/plain; version=0.0.4")

    return app

