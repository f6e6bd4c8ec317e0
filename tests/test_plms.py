"""PLMS (the web UI's CompVis timestep sampler) against its defining update in the variance-
preserving parameterisation (ldm's PLMSSampler: alphas, pred_x0, Adams-Bashforth weights), over
DDIM's timesteps, with a denoiser that is not linear in x."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdrt.samplers import SAMPLERS, resolve_sampler, sample_plms
from sdrt.schedules import DiscreteSchedule, get_sigmas

SCHEDULE = DiscreteSchedule.from_config(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        num_train_timesteps=1000)


def _denoiser(x, sigma):
    return torch.tanh(x * 0.7) / (1.0 + 0.1 * sigma) + 0.05 * sigma


def _reference(x_vp, sigmas):
    """ldm.models.diffusion.plms.PLMSSampler.p_sample_plms over the given noise levels."""
    a = [1.0 / (1.0 + float(s) ** 2) for s in sigmas]

    def eps(x, i):
        xk = x / math.sqrt(a[i])
        return (xk - _denoiser(xk, float(sigmas[i]))) / float(sigmas[i])

    def step(x, e, i):
        pred_x0 = (x - math.sqrt(1 - a[i]) * e) / math.sqrt(a[i])
        return math.sqrt(a[i + 1]) * pred_x0 + math.sqrt(1 - a[i + 1]) * e
    old = []
    for i in range(len(sigmas) - 1):
        e = eps(x_vp, i)
        if not old:
            e_next = eps(step(x_vp, e, i), i + 1)
            e_prime = (e + e_next) / 2
        elif len(old) == 1:
            e_prime = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x_vp = step(x_vp, e_prime, i)
        old = (old + [e])[-3:]
    return x_vp, a[-1]


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 12])
def test_plms_is_the_compvis_update(steps):
    sigmas = get_sigmas("Automatic", steps, SCHEDULE, default=SAMPLERS["PLMS"].schedule)
    assert len(sigmas) == steps + 1 and sigmas[-1] > 0            # DDIM's timesteps, ending at t = 0
    g = torch.Generator().manual_seed(steps)
    noise = torch.randn((2, 4, 5, 5), generator=g, dtype=torch.float64)
    x_k = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)       # the "vp" start: x_T = noise in VP space
    calls = []
    out = sample_plms(lambda x, s: (calls.append(s), _denoiser(x, float(s)))[1], x_k, sigmas)
    ref, a_last = _reference(noise, sigmas)
    assert torch.allclose(out * math.sqrt(a_last), ref, atol=1e-10)
    assert len(calls) == steps + 1                             # the first step takes two calls


def test_plms_by_its_web_ui_names():
    assert resolve_sampler("PLMS")[0].name == "PLMS" and resolve_sampler("plms")[0].init == "vp"
    assert np.allclose(get_sigmas("Automatic", 10, SCHEDULE, default="DDIM"),
                       get_sigmas("Automatic", 10, SCHEDULE, default=SAMPLERS["PLMS"].schedule))
