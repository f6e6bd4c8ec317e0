"""The classifier-free-guidance denoiser: adapts a backend's UNet to ``D(x, sigma)``.

Conditional and unconditional inputs go through the UNet in one call. The batch holds, in
order, every cond part of image 0, of image 1, ..., then the B unconditional rows (the web
UI's layout). Which conditioning each model call uses comes from per-image schedules of
``(end_at_step, context)``, where steps count model calls as the web UI counts them. All
contexts the loop will need are assembled before it starts; a call only copies ``x`` into a
preallocated input buffer, fills the timestep buffer and runs the UNet.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .schedules import DiscreteSchedule

# A schedule is a list of (end_at_step, context (L, C)); a cond part adds a weight.
PromptSchedule = Sequence[tuple[int, torch.Tensor]]


def _entry(schedule: PromptSchedule, step: int) -> int:
    """Index of the schedule entry used at model call ``step`` (0-based)."""
    for i, (end_at, _) in enumerate(schedule):
        if step <= end_at:
            return i
    return len(schedule) - 1


def plan_contexts(conds, uncond, max_calls: int, device, dtype) -> tuple[list[torch.Tensor], list[int]]:
    """The (rows, L, C) context of every model call, built once: the distinct contexts, and for
    each call the index of the one it uses (calls that use the same schedule entries share one).
    Rows: every cond part of image 0, of image 1, ..., then the unconditional rows."""
    keys: dict[tuple, int] = {}
    distinct, index = [], []
    for step in range(max_calls):
        key = tuple(_entry(s, step) for c in conds for _, s in c) + tuple(_entry(s, step) for s in uncond)
        if key not in keys:
            rows = [s[_entry(s, step)][1] for c in conds for _, s in c]
            rows += [s[_entry(s, step)][1] for s in uncond]
            keys[key] = len(distinct)
            distinct.append(torch.stack(rows).to(device, dtype))
        index.append(keys[key])
    return distinct, index


class CFGDenoiser:
    """k-diffusion style denoiser with CFG over a backend.

    conds: per image, a list of (weight, schedule) parts (one part with weight 1 for a plain
    prompt; several for ``AND``). uncond: per image, a schedule. x is (B, C, h, w) float32.
    """

    def __init__(self, backend, schedule: DiscreteSchedule, conds, uncond, cfg_scale,
                 latent_shape, max_calls: int, image_cond: torch.Tensor | None = None, blend=None):
        """``image_cond``: (B, K, h, w) channels appended to every row's input (9-channel
        inpainting models: mask and masked-image latents). ``blend``: (init latents, mask) with
        mask 1 where the image is repainted: the denoised prediction keeps the init latents
        elsewhere (the web UI's inpainting, ``mask_before_denoising`` off)."""
        self.backend, self.noise_schedule = backend, schedule
        # one scale for the batch, or one per image (requests batched together by sdrt.Engine)
        scales = [float(v) for v in cfg_scale] if isinstance(cfg_scale, (list, tuple)) else [float(cfg_scale)]
        self.cfg_scales = scales * len(uncond) if len(scales) == 1 else scales
        if len(self.cfg_scales) != len(uncond):
            raise ValueError(f"{len(self.cfg_scales)} cfg scales for {len(uncond)} images")
        same = all(v == self.cfg_scales[0] for v in self.cfg_scales)
        self.cfg_scale = self.cfg_scales[0] if same else torch.tensor(
            self.cfg_scales, device=backend.device, dtype=torch.float32).view(-1, 1, 1, 1)
        self.v_prediction = schedule.prediction_type == "v_prediction"
        self.batch = len(uncond)
        self.parts = [len(c) for c in conds]
        self.weights = [[float(w) for w, _ in c] for c in conds]
        self._plain = all(n == 1 for n in self.parts) and all(w == [1.0] for w in self.weights)
        dev = backend.device
        # rows of the UNet batch that hold each image's cond parts; the uncond rows follow
        self._rows, start = [], 0
        for n in self.parts:
            self._rows.append((start, start + n))
            start += n
        source = [i for i, n in enumerate(self.parts) for _ in range(n)] + list(range(self.batch))
        self._source = torch.tensor(source, device=dev)              # image of each row
        self._rep = torch.empty((len(source), *latent_shape), device=dev, dtype=torch.float32)
        extra = 0 if image_cond is None else int(image_cond.shape[1])
        self._x_in = torch.empty((len(source), latent_shape[0] + extra, *latent_shape[1:]), device=dev,
                                 dtype=backend.dtype)
        if image_cond is not None:             # constant: written once, the rows in the UNet batch's order
            self._x_in[:, latent_shape[0]:] = image_cond.to(dev)[self._source].to(backend.dtype)
        self._channels = latent_shape[0]
        # (the init latents where they are kept, the repaint mask): made once for every step
        self.blend = None if blend is None else ((blend[0].to(dev).float() * (1.0 - blend[1].to(dev).float())),
                                                 blend[1].to(dev).float())
        self._t = torch.empty((len(source),), device=dev, dtype=torch.float32)
        self.contexts, index = plan_contexts(conds, uncond, max_calls, backend.device, backend.dtype)
        self._contexts = [self.contexts[i] for i in index]     # per model call
        self.step = 0

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        sigma = float(sigma)
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)
        torch.index_select(x, 0, self._source, out=self._rep)
        self._x_in[:, :self._channels].copy_(self._rep.mul_(c_in))
        self._t.fill_(self.noise_schedule.sigma_to_t(sigma))
        ctx = self._contexts[min(self.step, len(self._contexts) - 1)]
        self.step += 1
        out = self.backend.unet(self._x_in, self._t, ctx).float()
        guided = self._combine(out)
        if self.v_prediction:  # k-diffusion's DiscreteVDDPMDenoiser scalings
            denoised = x * (1.0 / (sigma * sigma + 1.0)) + guided * (-sigma * c_in)
        else:
            denoised = x - guided * sigma
        if self.blend is not None:
            kept, mask = self.blend
            denoised = torch.addcmul(kept, denoised, mask)
        return denoised

    def _combine(self, out: torch.Tensor) -> torch.Tensor:
        """uncond + cfg_scale * sum_j w_j (cond_j - uncond), on the model output (linear, so the
        same as combining denoised predictions)."""
        uncond = out[-self.batch:]
        if self._plain:
            return uncond + self.cfg_scale * (out[:self.batch] - uncond)
        guided = uncond.clone()
        for i, (a, b) in enumerate(self._rows):
            for j in range(a, b):
                guided[i] += (out[j] - uncond[i]) * (self.cfg_scales[i] * self.weights[i][j - a])
        return guided
