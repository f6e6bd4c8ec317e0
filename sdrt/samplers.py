"""Samplers: small pure functions over a denoiser in sigma space, with the web UI's names.

Every sampler has the signature ``sample_x(model, x, sigmas, noise=None, callback=None, ...)``:

- ``model(x, sigma) -> denoised``: x is (B, C, h, w) float32, sigma a Python float;
- ``sigmas``: the host-side float64 schedule (``sdrt.schedules``), decreasing;
- ``noise(sigma, sigma_next) -> tensor like x``: the stochastic samplers' noise source;
- ``callback(i, sigma, x, denoised)``: called once per step, after the step's first model call.

All step coefficients are Python floats computed from the host schedule, so no sampler reads a
device tensor back to the host. The algorithms are those of k-diffusion (Katherine Crowson),
which the web UI runs; DDIM, UniPC and LCM are written in the same sigma space.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from ``sigma`` to ``sigma_next``."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def _d(x, sigma, denoised):
    """Karras ODE derivative dx/dsigma."""
    return (x - denoised) / sigma


def _require_noise(noise, name):
    if noise is None:
        raise ValueError(f"sampler {name!r} is stochastic and needs a noise source (noise=...)")
    return noise


def _denoise(model, x, sigmas, i, callback):
    """Step i's first model call, reported to the callback."""
    denoised = model(x, sigmas[i])
    if callback:
        callback(i, sigmas[i], x, denoised)
    return denoised


# ---------------------------------------------------------------- one-model-call linear samplers
#
# Euler, Euler a, DDIM, DPM++ 2M, DPM++ 2M SDE and LCM update x with one model call per step as
#     x' = a x + b D + e D_prev + n noise        (D: this step's denoised, D_prev: the previous one)
# Each declares its coefficients once, below; ``sample_linear`` runs them on the eager loop and
# ``sdrt.fastpath.step_table`` puts the same numbers into the static loop's device table.


@dataclass(frozen=True)
class LinearStep:
    """One step's coefficients of ``x' = a x + b D + e D_prev + n noise``; ``draw``: the step asks
    the noise source for a tensor (n may still be 0 for it)."""

    a: float = 0.0
    b: float = 0.0
    e: float = 0.0
    n: float = 0.0
    draw: bool = False


def _euler_step(s, i, eta=None, s_noise=1.0, **_):
    """Implements Algorithm 2 (Euler steps) from Karras et al. (2022), without churn."""
    a = s[i + 1] / s[i]
    return LinearStep(a=a, b=1.0 - a)


def _euler_ancestral_step(s, i, eta=1.0, s_noise=1.0, **_):
    """Ancestral sampling with Euler steps (k-diffusion)."""
    down, up = ancestral_step(s[i], s[i + 1], eta)
    a = down / s[i]
    draw = s[i + 1] > 0 and up > 0
    return LinearStep(a=a, b=1.0 - a, n=s_noise * up if draw else 0.0, draw=draw)


def _ddim_step(s, i, eta=0.0, s_noise=1.0, **_):
    """DDIM (Song et al. 2021, eq. 12) in sigma space: with eta=0 an Euler step of the
    probability-flow ODE; with eta>0 the DDIM noise sigma_t becomes an ancestral step, since
    sigma_up^2 = eta^2 s'^2 (s^2 - s'^2) / s^2 is exactly DDIM's sigma_t / sqrt(alpha_prev)."""
    down, up = ancestral_step(s[i], s[i + 1], eta)
    a = down / s[i]
    draw = s[i + 1] > 0 and up > 0
    return LinearStep(a=a, b=1.0 - a, n=up if draw else 0.0, draw=draw)


def _dpmpp_2m_step(s, i, **_):
    """DPM-Solver++(2M), Lu et al. (2022), Algorithm 2."""
    if s[i + 1] == 0:
        return LinearStep(b=1.0)
    h = math.log(s[i]) - math.log(s[i + 1])
    phi = -math.expm1(-h)
    if i == 0:
        return LinearStep(a=s[i + 1] / s[i], b=phi)
    r = (math.log(s[i - 1]) - math.log(s[i])) / h
    return LinearStep(a=s[i + 1] / s[i], b=phi * (1 + 1 / (2 * r)), e=-phi / (2 * r))


def _dpmpp_2m_sde_step(s, i, eta=1.0, s_noise=1.0, solver_type="midpoint", **_):
    """DPM-Solver++(2M) SDE (k-diffusion), midpoint or Heun second-order correction."""
    if s[i + 1] == 0:
        return LinearStep(b=1.0)
    h = math.log(s[i]) - math.log(s[i + 1])
    eta_h = eta * h
    phi = -math.expm1(-h - eta_h)
    a, b, e = s[i + 1] / s[i] * math.exp(-eta_h), phi, 0.0
    if i > 0:
        r = (math.log(s[i - 1]) - math.log(s[i])) / h
        coef = (phi / (-h - eta_h) + 1) / r if solver_type == "heun" else 0.5 * phi / r
        b, e = b + coef, -coef
    n = s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise if eta else 0.0
    return LinearStep(a=a, b=b, e=e, n=n, draw=bool(eta))


def _lcm_step(s, i, **_):
    """Latent Consistency Model sampling (Luo et al. 2023, Algorithm 1): jump to the
    denoised estimate, then re-noise to the next sigma."""
    draw = s[i + 1] > 0
    return LinearStep(b=1.0, n=s[i + 1] if draw else 0.0, draw=draw)


def linear_steps(step, sigmas, **options) -> list[LinearStep]:
    """Every step's coefficients of a linear sampler for a host schedule (checked here)."""
    s = [float(v) for v in np.asarray(sigmas, dtype=np.float64)]
    if len(s) < 2 or any(b >= a for a, b in zip(s, s[1:])) or s[-1] < 0:
        raise ValueError("sigmas must be a decreasing list of at least 2 values >= 0")
    if options.get("solver_type", "midpoint") not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {options['solver_type']!r}")
    return [step(s, i, **options) for i in range(len(s) - 1)]


def sample_linear(model, x, sigmas, noise=None, callback=None, step=None, name="", **options):
    """Runs a linear sampler (``step``: one of the declarations above) on the eager loop."""
    d_prev = None
    for i, c in enumerate(linear_steps(step, sigmas, **options)):
        denoised = _denoise(model, x, sigmas, i, callback)
        out = denoised * c.b if c.a == 0 else x * c.a + denoised * c.b
        if c.e:
            out = out + d_prev * c.e
        if c.draw:
            drawn = _require_noise(noise, name)(sigmas[i], sigmas[i + 1])
            if c.n:
                out = out + drawn * c.n
        x, d_prev = out, denoised
    return x


def linear_sampler(step, name: str):
    """The eager sampler of a linear step declaration (what ``SamplerSpec.fn`` holds)."""
    fn = functools.partial(sample_linear, step=step, name=name)
    fn.__doc__ = step.__doc__
    return fn


sample_euler = linear_sampler(_euler_step, "Euler")
sample_euler_ancestral = linear_sampler(_euler_ancestral_step, "Euler a")
sample_ddim = linear_sampler(_ddim_step, "DDIM")
sample_dpmpp_2m = linear_sampler(_dpmpp_2m_step, "DPM++ 2M")
sample_dpmpp_2m_sde = linear_sampler(_dpmpp_2m_sde_step, "DPM++ 2M SDE")
sample_lcm = linear_sampler(_lcm_step, "LCM")


def sample_heun(model, x, sigmas, noise=None, callback=None):
    """Implements Algorithm 2 (Heun steps) from Karras et al. (2022), without churn."""
    for i in range(len(sigmas) - 1):
        denoised = _denoise(model, x, sigmas, i, callback)
        d = _d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            x = x + (d + d_2) * (dt / 2)
    return x


def _dpm2_step(model, x, d, sigma, sigma_to):
    """DPM-Solver-2 step from sigma to sigma_to through their geometric midpoint."""
    sigma_mid = math.exp((math.log(sigma) + math.log(sigma_to)) / 2)
    x_2 = x + d * (sigma_mid - sigma)
    return x + _d(x_2, sigma_mid, model(x_2, sigma_mid)) * (sigma_to - sigma)


def sample_dpm_2(model, x, sigmas, noise=None, callback=None):
    """DPM-Solver-2 (Lu et al. 2022) steps in Karras' sigma ODE, as in k-diffusion."""
    for i in range(len(sigmas) - 1):
        denoised = _denoise(model, x, sigmas, i, callback)
        d = _d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            x = _dpm2_step(model, x, d, sigmas[i], sigmas[i + 1])
    return x


def sample_dpm_2_ancestral(model, x, sigmas, noise=None, callback=None, eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver-2 steps (k-diffusion)."""
    for i in range(len(sigmas) - 1):
        denoised = _denoise(model, x, sigmas, i, callback)
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = _d(x, sigmas[i], denoised)
        if down == 0:
            x = x + d * (down - sigmas[i])
        else:
            x = _dpm2_step(model, x, d, sigmas[i], down)
            x = x + _require_noise(noise, "DPM2 a")(sigmas[i], sigmas[i + 1]) * (s_noise * up)
    return x


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """Linear multistep coefficients: the integral over [sigma_i, sigma_{i+1}] of each Lagrange
    basis polynomial through sigma_i, sigma_{i-1}, ..., computed exactly."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    coeffs = []
    for j in range(order):
        poly = np.poly1d([1.0])
        for k in range(order):
            if k != j:
                poly *= np.poly1d([1.0, -nodes[k]]) / (nodes[j] - nodes[k])
        integral = poly.integ()
        coeffs.append(float(integral(sigmas[i + 1]) - integral(sigmas[i])))
    return coeffs


def sample_lms(model, x, sigmas, noise=None, callback=None, order=4):
    """Linear multistep method over the Karras ODE (k-diffusion ``sample_lms``)."""
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = _denoise(model, x, sigmas, i, callback)
        ds.append(_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        coeffs = lms_coefficients(sigmas, i, min(i + 1, order))
        for c, d in zip(coeffs, reversed(ds)):
            x = x + d * c
    return x


def sample_plms(model, x, sigmas, noise=None, callback=None):
    """PLMS (pseudo linear multistep, Liu et al. 2022), the CompVis sampler the web UI offers,
    over DDIM's timesteps: the noise prediction e = (x - D) / sigma of the last four steps combined
    with Adams-Bashforth weights, the first step a pseudo improved Euler step (two model calls).
    In the k-diffusion parameterisation a step from sigma to sigma' with combined prediction e' is
    x' = x + (sigma' - sigma) e' (the VP update sqrt(a') x0 + sqrt(1 - a') e', divided by sqrt(a'))."""
    old: list = []
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        e = _d(x, s, _denoise(model, x, sigmas, i, callback))
        if not old:
            x_tmp = x + e * (s_next - s)
            e_prime = (e + _d(x_tmp, s_next, model(x_tmp, s_next))) / 2
        elif len(old) == 1:
            e_prime = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = x + e_prime * (s_next - s)
        old = (old + [e])[-3:]
    return x


def sample_dpmpp_2s_ancestral(model, x, sigmas, noise=None, callback=None, eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022, Algorithm 1)."""
    for i in range(len(sigmas) - 1):
        denoised = _denoise(model, x, sigmas, i, callback)
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if down == 0:
            x = x + _d(x, sigmas[i], denoised) * (down - sigmas[i])
        else:
            t, t_next = -math.log(sigmas[i]), -math.log(down)
            h = t_next - t
            s = t + h / 2
            x_2 = x * (math.exp(-s) / sigmas[i]) - denoised * math.expm1(-h / 2)
            denoised_2 = model(x_2, math.exp(-s))
            x = x * (down / sigmas[i]) - denoised_2 * math.expm1(-h)
        if sigmas[i + 1] > 0 and up > 0:
            x = x + _require_noise(noise, "DPM++ 2S a")(sigmas[i], sigmas[i + 1]) * (s_noise * up)
    return x


def sample_dpmpp_sde(model, x, sigmas, noise=None, callback=None, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic, SDE-DPM-Solver++ with a midpoint at ratio r), k-diffusion."""
    for i in range(len(sigmas) - 1):
        denoised = _denoise(model, x, sigmas, i, callback)
        if sigmas[i + 1] == 0:
            x = x + _d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        sigma_s = math.exp(-s)
        down, up = ancestral_step(sigmas[i], sigma_s, eta)
        s_ = -math.log(down)
        x_2 = x * (down / sigmas[i]) - denoised * math.expm1(t - s_)
        if eta:
            x_2 = x_2 + _require_noise(noise, "DPM++ SDE")(sigmas[i], sigma_s) * (s_noise * up)
        denoised_2 = model(x_2, sigma_s)
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        t_next_ = -math.log(down)
        denoised_d = denoised * (1 - fac) + denoised_2 * fac
        x = x * (down / sigmas[i]) - denoised_d * math.expm1(t - t_next_)
        if eta:
            x = x + noise(sigmas[i], sigmas[i + 1]) * (s_noise * up)
    return x


def _unipc_coefficients(lambdas: list[float], h: float, order: int, variant: str):
    """rks (ratios of the previous log-SNR gaps), the vector b and B(h) of UniPC
    (Zhao et al. 2023, Algorithm 2 / eq. 8-10), data prediction."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks = [(lam - lambdas[0]) / h for lam in lambdas[1:]] + [1.0]
    factorial, b, R = 1, [], []
    for k in range(1, order + 1):
        R.append([rk ** (k - 1) for rk in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return rks, np.array(R, dtype=np.float64), np.array(b, dtype=np.float64), b_h, h_phi_1


def sample_unipc(model, x, sigmas, noise=None, callback=None, order=3, variant="bh1",
                 lower_order_final=True):
    """UniPC (Zhao et al. 2023): the UniP-p predictor plus the UniC corrector, multistep,
    data prediction, in log-SNR time lambda = -log(sigma). Variant bh1 or bh2."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    n = len(sigmas) - 1
    lam = [(-math.log(s) if s > 0 else math.inf) for s in sigmas]
    outs: list = []           # denoised at previous steps, newest last
    last_x, last_order = None, 0
    for i in range(n):
        denoised = _denoise(model, x, sigmas, i, callback)
        if last_x is not None:  # UniC: correct x_i with the model output at x_i
            x = _unipc_correct(last_x, denoised, outs, lam, i, last_order, variant, sigmas)
        outs = (outs + [denoised])[-order:]
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, len(outs))
        last_x, last_order = x, this_order
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = lam[i + 1] - lam[i]
        rks, R, b, b_h, h_phi_1 = _unipc_coefficients([lam[i - k] for k in range(this_order)], h,
                                                      this_order, variant)
        x_t = x * (sigmas[i + 1] / sigmas[i]) - denoised * h_phi_1
        if this_order >= 2:
            rhos = [0.5] if this_order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
            for k, rho in enumerate(rhos, start=1):
                x_t = x_t - (outs[-1 - k] - denoised) * (b_h * rho / rks[k - 1])
        x = x_t
    return x


def _unipc_correct(x_prev, model_t, outs, lam, i, order, variant, sigmas):
    """UniC: recompute the step from i-1 to i with the new model output at i."""
    m0 = outs[-1]
    h = lam[i] - lam[i - 1]
    rks, R, b, b_h, h_phi_1 = _unipc_coefficients([lam[i - 1 - k] for k in range(order)], h,
                                                  order, variant)
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
    x_t = x_prev * (sigmas[i] / sigmas[i - 1]) - m0 * h_phi_1
    for k in range(1, order):
        x_t = x_t - (outs[-1 - k] - m0) * (b_h * rhos[k - 1] / rks[k - 1])
    return x_t - (model_t - m0) * (b_h * rhos[-1])


@dataclass(frozen=True)
class SamplerSpec:
    """A web UI sampler: its function and how the pipeline drives it."""

    name: str
    fn: Callable
    aliases: tuple[str, ...] = ()
    schedule: str = "Uniform"          # what "Automatic" means for this sampler
    noise: str = "none"                # "none" | "rng" (ImageRNG.next) | "brownian" (SDE samplers)
    second_order: bool = False         # two model calls per step (prompt schedules count both)
    discard_penultimate: bool = False
    init: str = "sigma"                # initial x = noise*sigma_0 ("sigma") or noise*sqrt(1+sigma_0^2) ("vp")
    eta_default: float | None = None   # the sampler's eta when the request gives none
    options: dict = field(default_factory=dict)
    # x' = a x + b D + e D_prev + n noise per step (one model call): what the static loop runs
    linear_step: Callable | None = None


SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in [
    SamplerSpec("DPM++ 2M", sample_dpmpp_2m, ("k_dpmpp_2m",), schedule="Karras", linear_step=_dpmpp_2m_step),
    SamplerSpec("DPM++ SDE", sample_dpmpp_sde, ("k_dpmpp_sde",), schedule="Karras", noise="brownian",
                second_order=True, eta_default=1.0),
    SamplerSpec("DPM++ 2M SDE", sample_dpmpp_2m_sde, ("k_dpmpp_2m_sde",), schedule="Exponential",
                noise="brownian", eta_default=1.0, linear_step=_dpmpp_2m_sde_step),
    SamplerSpec("DPM++ 2S a", sample_dpmpp_2s_ancestral, ("k_dpmpp_2s_a",), schedule="Karras",
                noise="rng", second_order=True, eta_default=1.0),
    SamplerSpec("Euler a", sample_euler_ancestral, ("k_euler_a", "k_euler_ancestral"), noise="rng",
                eta_default=1.0, linear_step=_euler_ancestral_step),
    SamplerSpec("Euler", sample_euler, ("k_euler",), linear_step=_euler_step),
    SamplerSpec("LMS", sample_lms, ("k_lms",)),
    SamplerSpec("Heun", sample_heun, ("k_heun",), second_order=True),
    SamplerSpec("DPM2", sample_dpm_2, ("k_dpm_2",), schedule="Karras", second_order=True,
                discard_penultimate=True),
    SamplerSpec("DPM2 a", sample_dpm_2_ancestral, ("k_dpm_2_a",), schedule="Karras", noise="rng",
                second_order=True, discard_penultimate=True, eta_default=1.0),
    SamplerSpec("DDIM", sample_ddim, ("ddim",), schedule="DDIM", noise="rng", init="vp", eta_default=0.0,
                linear_step=_ddim_step),
    SamplerSpec("PLMS", sample_plms, ("plms",), schedule="DDIM", init="vp"),
    SamplerSpec("UniPC", sample_unipc, ("unipc",), init="vp"),
    SamplerSpec("LCM", sample_lcm, ("k_lcm",), noise="rng", linear_step=_lcm_step),
]}

_SCHEDULE_SUFFIXES = {"karras": "Karras", "exponential": "Exponential"}


def resolve_sampler(name: str, schedule: str = "Automatic") -> tuple[SamplerSpec, str]:
    """(sampler, schedule) for a web UI sampler name, including aliases (``k_euler_a``) and the
    old combined names ("DPM++ 2M Karras"), whose suffix sets the schedule."""
    key = str(name).strip().lower()
    for spec in SAMPLERS.values():
        if key == spec.name.lower() or key in spec.aliases:
            return spec, schedule
    base, _, suffix = key.rpartition(" ")
    if suffix in _SCHEDULE_SUFFIXES and base:
        for spec in SAMPLERS.values():
            if base == spec.name.lower():
                return spec, _SCHEDULE_SUFFIXES[suffix]
    raise ValueError(f"sampler {name!r} is unknown; valid samplers: {', '.join(SAMPLERS)} "
                     "(old names such as 'DPM++ 2M Karras' are accepted too)")
