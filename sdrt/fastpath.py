"""The static loop: for a fixed shape, sampler and schedule, the whole denoising loop as a fixed
sequence of device operations over preallocated buffers, captured once as a CUDA graph and
replayed on a GPU.

Everything a step needs is precomputed on the device before the loop runs:

- ``step_table``: eight float32 coefficients per step for the fused step
  (``sdrt.kernels``): CFG combine, model output -> denoised, the sampler update and the next
  step's input scaling. Euler, Euler a, DDIM (any eta), DPM++ 2M, DPM++ 2M SDE and LCM are one
  linear form ``x' = a x + b D + e D_prev + n noise``.
- the timestep of every step (``(steps, 2B)``), which conditioning every step uses (a fixed
  buffer per distinct context: prompt editing switches buffers, not values), the CFG scale of
  every image, and the ancestral noise of every step, drawn from the image's generator in the
  eager loop's order, so both paths give the same image for a seed.

Per generation only the inputs change (initial latents, noise, contexts, scales); they are
copied into the static buffers, the graph replays (or, on a CPU, the same operations run
eagerly), and the images come back through pinned host buffers with one synchronisation at
the end. Other samplers, ``AND`` prompts and weighted parts run on the eager loop.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict

import numpy as np
import torch

from .backends import ALIGNMENT, aligned_empty
from .kernels import COEFFICIENTS, fused_step
from .samplers import SAMPLERS, SamplerSpec, linear_steps

# the samplers that declare a linear step (sdrt.samplers.LinearStep): one model call per step
STEP_SAMPLERS = tuple(name for name, spec in SAMPLERS.items() if spec.linear_step is not None)


def step_table(sampler: SamplerSpec | str, sigmas, eta: float | None = None, s_noise: float = 1.0,
               v_prediction: bool = False, solver_type: str = "midpoint") -> tuple[np.ndarray, list[bool]]:
    """The fused step's coefficients for every step, and which steps draw ancestral noise.

    sigmas: the decreasing host schedule (steps + 1 values, usually ending in 0). Returns
    ``(table (steps, 8) float64 in COEFFICIENTS order, draws)``: ``draws[i]`` is True where the
    eager sampler asks its noise source for a tensor at step i. The sampler update (a, b, e, n)
    is the sampler's own declaration (``SamplerSpec.linear_step``, which the eager loop runs
    too); this adds the model's parameterisation (c_skip, c_out) and the next input scaling.
    """
    spec = sampler if isinstance(sampler, SamplerSpec) else SAMPLERS.get(sampler)
    if spec is None or spec.linear_step is None:
        raise ValueError(f"sampler {getattr(sampler, 'name', sampler)!r} has no fused step; the static loop runs "
                         f"{', '.join(STEP_SAMPLERS)}")
    if eta is None:
        eta = spec.eta_default or 0.0
    steps = linear_steps(spec.linear_step, sigmas, eta=eta, s_noise=s_noise, solver_type=solver_type)
    s = [float(v) for v in np.asarray(sigmas, dtype=np.float64)]
    table = np.zeros((len(steps), len(COEFFICIENTS)), dtype=np.float64)
    for i, c in enumerate(steps):
        sig, nxt = s[i], s[i + 1]
        c_skip, c_out = ((1.0 / (sig * sig + 1.0), -sig / math.sqrt(sig * sig + 1.0)) if v_prediction
                         else (1.0, -sig))
        table[i] = (c_skip, c_out, c.a, c.b, c.e, c.n, 1.0 / math.sqrt(nxt * nxt + 1.0), 0.0)
    return table, [c.draw for c in steps]


class CaptureFailed(RuntimeError):
    """The loop could not be captured as a CUDA graph (an engine that refuses to enqueue under
    capture, for one); the pipeline runs that configuration on the eager loop instead."""


def unsupported_reason(job, cond, v_prediction: bool = False) -> str | None:
    """Why a job (``Pipeline.validate``) with its conditioning (``Pipeline.encode``) cannot run
    on the static loop (None when it can)."""
    if job.sampler.linear_step is None:
        return (f"sampler {job.sampler.name!r} declares no linear step (one model call per step), so it "
                f"runs on the eager loop (static loop: {', '.join(STEP_SAMPLERS)})")
    if not cond.plain:
        return "AND prompts (several weighted conditionings per image) run on the eager loop"
    if getattr(job, "inpainting", None) and v_prediction:
        return "inpainting with a v-prediction model runs on the eager loop (the static loop blends noise predictions)"
    return None


class StaticLoop:
    """One static configuration's loop: buffers, step tables and (on CUDA) the captured graph.

    Key: batch size, latent shape, sampler, sigmas, eta, which context each step uses, and
    the contexts' shape. ``run`` takes the per-generation inputs and returns float pixels
    (B, H, W, 3), uint8 images (B, H, W, 3) and a per-image finite flag, all on the host.
    """

    def __init__(self, backend, schedule, spec: SamplerSpec, sigmas, eta, batch: int, latent_shape,
                 context_index: list[int], context_shape, n_contexts: int, use_kernel: bool = True,
                 capture: bool | None = None, cuda=None, inpaint: bool = False, image_cond_channels: int = 0):
        self.backend, self.device = backend, backend.device
        self.cuda = cuda or torch.cuda       # the CUDA graph API (tests pass a recording fake)
        self.batch, self.latent_shape = batch, tuple(latent_shape)
        self.sigmas = np.asarray(sigmas, dtype=np.float64)
        self.steps = len(self.sigmas) - 1
        table, self.draws = step_table(spec, self.sigmas, eta, v_prediction=schedule.prediction_type == "v_prediction",
                                       solver_type=spec.options.get("solver_type", "midpoint"))
        self.context_index = list(context_index[:self.steps])
        self.use_kernel = use_kernel
        self.capture = (self.device.type == "cuda" and getattr(backend, "graph_safe", False)) if capture is None else capture
        if self.capture and self.device.type != "cuda" and cuda is None:
            raise ValueError("CUDA-graph capture needs a CUDA device")
        dev, dt = self.device, backend.dtype
        self.init_scale = float(self.sigmas[0]) if spec.init == "sigma" else math.sqrt(1.0 + float(self.sigmas[0]) ** 2)
        self.c_in0 = 1.0 / math.sqrt(float(self.sigmas[0]) ** 2 + 1.0)
        self.latent_divisor = math.sqrt(1.0 + float(self.sigmas[-1]) ** 2)
        ts = [schedule.sigma_to_t(float(v)) for v in self.sigmas[:-1]]
        with torch.inference_mode():
            self.coef = torch.tensor(table, dtype=torch.float32, device=dev)
            # each step's timesteps (2B) start on an ALIGNMENT boundary: compiled backends bind them by address
            stride = -(-2 * batch * 4 // ALIGNMENT) * ALIGNMENT // 4
            self.t = aligned_empty((len(ts), stride), torch.float32, dev)
            self.t.copy_(torch.tensor(ts, dtype=torch.float32)[:, None].expand(len(ts), stride))
            shape = (batch, *self.latent_shape)
            self.x0 = torch.zeros(shape, device=dev)              # initial latents (input)
            # inpainting (inputs): the init latents and the latent mask's complement (1 = keep)
            self.inpaint = bool(inpaint)
            # and, derived once per generation, the mask for the CFG rows and the step's scratch
            self.init = torch.zeros(shape, device=dev) if inpaint else None
            self.keep = torch.zeros(shape, device=dev) if inpaint else None
            rows = (2 * batch, *self.latent_shape)
            self.repaint_rows = torch.zeros(rows, device=dev) if inpaint else None
            self._diff = torch.zeros(shape, device=dev) if inpaint else None
            self._blended = torch.zeros(rows, device=dev) if inpaint else None
            # 9-channel inpainting models: their extra input (mask, masked-image latents) per image,
            # appended to the UNet's input rows at every step
            k = int(image_cond_channels)
            self.image_cond = torch.zeros((batch, k, *self.latent_shape[1:]), device=dev) if k else None
            self.x_unet = (torch.zeros((2 * batch, self.latent_shape[0] + k, *self.latent_shape[1:]), device=dev,
                                       dtype=dt) if k else None)
            self.x = torch.zeros(shape, device=dev)
            self.d_prev = torch.zeros(shape, device=dev)
            self.x_in = torch.zeros((2 * batch, *self.latent_shape), device=dev, dtype=dt)
            self.noise = torch.zeros((max(1, sum(self.draws)), *shape), device=dev)
            self.scale = torch.zeros(batch, device=dev)
            self.contexts = [torch.zeros(context_shape, device=dev, dtype=dt) for _ in range(n_contexts)]
            self.pixels = self.images = self.finite = None
        self._graph = self._state = None
        self._kv_refs: list = []       # the K/V buffers a captured graph reads: alive as long as it
        self.replays = 0

    def _backend_state(self):
        state = getattr(self.backend, "graph_state", None)
        return state() if state is not None else None

    def release(self) -> None:
        """Drop this loop's graph and its cached cross-attention entries."""
        kv = getattr(self.backend, "kv", None)
        if kv is not None:
            kv.discard(self.contexts)
        self._graph, self._kv_refs = None, []

    # -- the static body: reads and writes only the buffers above ------------------------------

    def _body(self, callback=None) -> None:
        self._denoise(callback)
        self._decode()

    def _denoise(self, callback=None) -> None:
        b = self.batch
        kv = getattr(self.backend, "kv", None)
        if kv is not None:                  # cross-attention K/V once per conditioning, not per step
            kv.precompute(self.contexts)
            self._kv_refs = kv.entries(self.contexts)
        self.x.copy_(self.x0).mul_(self.init_scale)
        self.x_in[:b].copy_(self.x * self.c_in0)
        self.x_in[b:].copy_(self.x_in[:b])
        c = self.latent_shape[0]
        if self.x_unet is not None:       # the extra channels: the same for the cond and uncond rows
            self.x_unet[:b, c:].copy_(self.image_cond)
            self.x_unet[b:, c:].copy_(self.image_cond)
        k = 0
        for i in range(self.steps):
            x_unet = self.x_in
            if self.x_unet is not None:
                self.x_unet[:, :c].copy_(self.x_in)
                x_unet = self.x_unet
            out = self.backend.unet(x_unet, self.t[i, :2 * b], self.contexts[self.context_index[i]])
            if self.inpaint:
                out = self._blend(out, float(self.sigmas[i]))
            noise = None
            if self.draws[i]:
                noise, k = self.noise[k], k + 1
            fused_step(out.contiguous(), self.x, self.d_prev, self.x_in, noise, self.coef[i], self.scale,
                       use_kernel=self.use_kernel)
            if callback is not None:
                callback(i + 1, self.steps)

    def _blend(self, out: torch.Tensor, sigma: float) -> torch.Tensor:
        """Inpainting's per-step blend of the denoised prediction (D = m D + (1 - m) init), done on
        the noise prediction of both CFG rows before the fused step (eps' = m eps + (1 - m)(x -
        init) / sigma: the CFG combination of the rows then gives the blended prediction)."""
        b = self.batch
        torch.sub(self.x, self.init, out=self._diff).mul_(self.keep).div_(sigma)
        blended = self._blended
        blended.copy_(out).mul_(self.repaint_rows)
        blended[:b].add_(self._diff)
        blended[b:].add_(self._diff)
        return out.copy_(blended)          # in the UNet's output, consumed by the step right after

    def _decode(self) -> None:
        latents = self.x / self.latent_divisor
        if self.inpaint:                   # and once more after the last step, as the eager loop
            latents = latents * self.repaint_rows[:self.batch] + self.init * self.keep
        decoded = self.backend.decode(latents)
        pix = ((decoded + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1)
        if self.pixels is None:   # first (eager or warm-up) run: output buffers of the right size
            self.pixels = torch.empty_like(pix, memory_format=torch.contiguous_format)
            self.images = torch.empty(pix.shape, dtype=torch.uint8, device=pix.device)
            self.finite = torch.empty(pix.shape[0], dtype=torch.bool, device=pix.device)
        self.pixels.copy_(pix)
        # the web UI truncates to uint8 rather than rounding (float32 255*p, as the eager path)
        self.images.copy_((255.0 * torch.nan_to_num(pix)).to(torch.uint8))
        self.finite.copy_(torch.isfinite(pix).flatten(1).all(1))

    def _capture(self) -> None:
        """Warm up on a side stream (allocator, cuBLAS/cuDNN handles, the kernel module), then
        capture the body into one CUDA graph."""
        dev, cuda = self.device, self.cuda
        side = cuda.Stream(dev)
        side.wait_stream(cuda.current_stream(dev))
        with cuda.stream(side):
            self._body()
        cuda.current_stream(dev).wait_stream(side)
        graph = cuda.CUDAGraph()
        # thread_local: sdrt.Batcher encodes the next batch's text on another thread meanwhile
        try:
            with cuda.graph(graph, capture_error_mode="thread_local"):
                self._body()
        except Exception as e:  # noqa: BLE001 - reported as what it is: this loop cannot be a graph
            raise CaptureFailed(f"the loop could not be captured as a CUDA graph: {type(e).__name__}: {e}") from e
        self._graph = graph
        self._state = self._backend_state()
        pinned = dev.type == "cuda"
        self._host = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
                      for name, t in (("pixels", self.pixels), ("images", self.images), ("finite", self.finite))}

    def set_inputs(self, x0: torch.Tensor, noise: list[torch.Tensor], contexts: list[torch.Tensor], scales,
                   inpaint: tuple | None = None, image_cond: torch.Tensor | None = None) -> None:
        """Copy one generation's inputs into the static buffers (asynchronous on a GPU)."""
        if tuple(x0.shape) != tuple(self.x0.shape):
            raise ValueError(f"initial latents {tuple(x0.shape)} do not match this loop's {tuple(self.x0.shape)}")
        if len(noise) != sum(self.draws):
            raise ValueError(f"{len(noise)} noise tensors for {sum(self.draws)} noise draws")
        if len(contexts) != len(self.contexts):
            raise ValueError(f"{len(contexts)} contexts for {len(self.contexts)} context buffers")
        self.x0.copy_(x0, non_blocking=True)
        for k, n in enumerate(noise):
            self.noise[k].copy_(n, non_blocking=True)
        for buf, ctx in zip(self.contexts, contexts):
            if ctx.shape != buf.shape:
                raise ValueError(f"context {tuple(ctx.shape)} does not match the buffer {tuple(buf.shape)}")
            buf.copy_(ctx, non_blocking=True)
        self.scale.copy_(torch.as_tensor(scales, dtype=torch.float32), non_blocking=True)
        if self.inpaint:
            if inpaint is None:
                raise ValueError("this loop inpaints: give the init latents and the latent mask")
            init, mask = inpaint
            self.init.copy_(init, non_blocking=True)
            self.keep.copy_(1.0 - mask)
            b = self.batch
            self.repaint_rows[:b].copy_(mask)
            self.repaint_rows[b:].copy_(mask)
        if self.image_cond is not None:
            if image_cond is None or tuple(image_cond.shape) != tuple(self.image_cond.shape):
                raise ValueError(f"this loop's model takes image conditioning {tuple(self.image_cond.shape)}")
            self.image_cond.copy_(image_cond, non_blocking=True)

    @torch.inference_mode()
    def run(self, x0, noise, contexts, scales, callback=None, inpaint=None,
            image_cond=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """One generation: (pixels float32 (B, H, W, 3), images uint8 (B, H, W, 3), finite (B,),
        seconds of the VAE decode). A replayed graph runs the loop and the decode as one: there
        the decode's seconds are reported as 0 (the loop's time includes them)."""
        self.set_inputs(x0, noise, contexts, scales, inpaint, image_cond)
        if self._graph is not None and self._backend_state() != self._state:
            # another loop or an eager call re-shaped an engine's context since the capture:
            # replaying would be undefined behaviour (TensorRT), so capture again
            self._graph = None
        if self.capture and self._graph is None:
            self._capture()          # its warm-up run computed this generation's outputs already
        elif self._graph is not None:
            self._graph.replay()
            self.replays += 1
        vae = 0.0
        if self._graph is not None:
            for name, host in self._host.items():
                host.copy_(getattr(self, name), non_blocking=True)
            self.cuda.current_stream(self.device).synchronize()    # the one wait, after the loop
            if callback is not None:
                callback(self.steps, self.steps)
            out = self._host
        else:                        # eager: the decode is timed on its own
            self._denoise(callback)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            self._decode()
            out = dict(pixels=self.pixels, images=self.images, finite=self.finite)
            out = {k: v.cpu() for k, v in out.items()}
            vae = time.perf_counter() - t0
        return (*(out[k].numpy().copy() for k in ("pixels", "images", "finite")), vae)

class LoopCache:
    """The static loops a pipeline has built, least recently used first out."""

    def __init__(self, size: int = 4):
        self.size, self._loops = size, OrderedDict()
        self.refused: dict = {}          # key -> why the configuration runs eagerly (CaptureFailed)

    def get(self, key, make):
        loop = self._loops.pop(key, None)
        if loop is None:
            loop = make()
        self._loops[key] = loop
        while len(self._loops) > self.size:
            self._loops.popitem(last=False)[1].release()
        return loop

    def clear(self) -> None:
        while self._loops:
            self._loops.popitem()[1].release()
        self.refused.clear()

    def refuse(self, key, reason: str) -> None:
        """Run this configuration on the eager loop from now on (its loop could not be captured)."""
        loop = self._loops.pop(key, None)
        if loop is not None:
            loop.release()
        self.refused[key] = reason

    def __len__(self) -> int:
        return len(self._loops)

    def keys(self) -> list:
        return list(self._loops)

    def values(self) -> list:
        return list(self._loops.values())
