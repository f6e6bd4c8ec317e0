"""Noise schedules: the model's discrete DDPM schedule and the web UI's sigma schedules.

Everything here is host-side float64 data, computed once before the loop starts, so the
loop never reads a device tensor to decide what to do next. Sigmas are in k-diffusion's
parameterisation: ``x = x0 + sigma * eps`` with ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

SCHEDULES = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform")


@dataclass(frozen=True)
class DiscreteSchedule:
    """A model's training schedule: ``sigmas[t]`` for t = 0 .. num_train_timesteps-1.

    Built from the diffusers scheduler config (beta_start, beta_end, beta_schedule) exactly as
    diffusers builds it (torch float32), so that a sigma taken from diffusers' table maps back to
    an integer timestep. (The LDM code computes the table in float64 before storing it as float32;
    the two differ by under 1e-5 relative.)
    """

    sigmas: np.ndarray          # (T,), float64 values of the float32 table, increasing in t
    prediction_type: str = "epsilon"

    @classmethod
    def from_config(cls, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    num_train_timesteps=1000, prediction_type="epsilon") -> "DiscreteSchedule":
        import torch

        n = int(num_train_timesteps)
        if n < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps!r}")
        if not (0 < float(beta_start) <= float(beta_end) < 1):
            raise ValueError(f"the betas must satisfy 0 < beta_start <= beta_end < 1, got {beta_start!r} and "
                             f"{beta_end!r}")
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float32) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
        else:
            raise ValueError(f"beta_schedule {beta_schedule!r} is not supported "
                             "(expected 'scaled_linear' or 'linear')")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r} is not supported "
                             "(expected 'epsilon' or 'v_prediction')")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).double().numpy()
        return cls(sigmas=sigmas, prediction_type=prediction_type)

    @functools.cached_property
    def log_sigmas(self) -> np.ndarray:
        return np.log(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: float) -> float:
        """Continuous timestep for ``sigma`` by linear interpolation in log sigma
        (k-diffusion's ``DiscreteSchedule.sigma_to_t``, unquantised)."""
        log_sigmas = self.log_sigmas
        log_sigma = math.log(sigma)
        low = int(np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2))
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = min(max((lo - log_sigma) / (lo - hi), 0.0), 1.0)
        return (1 - w) * low + w * (low + 1)

    def t_to_sigma(self, t: np.ndarray) -> np.ndarray:
        log_sigmas = self.log_sigmas
        t = np.asarray(t, dtype=np.float64)
        low, high = np.floor(t).astype(int), np.ceil(t).astype(int)
        w = t - low
        return np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])


def _append_zero(s: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(s, dtype=np.float64), [0.0]])


def uniform(n: int, ds: DiscreteSchedule) -> np.ndarray:
    """The model's own schedule: timesteps evenly spaced from T-1 to 0 (k-diffusion ``get_sigmas``)."""
    return _append_zero(ds.t_to_sigma(np.linspace(len(ds.sigmas) - 1, 0, n)))


def sgm_uniform(n: int, ds: DiscreteSchedule) -> np.ndarray:
    """Timesteps evenly spaced from t(sigma_max) to t(sigma_min), endpoint excluded (SGM / SDXL)."""
    ts = np.linspace(ds.sigma_to_t(ds.sigma_max), ds.sigma_to_t(ds.sigma_min), n + 1)[:-1]
    return _append_zero(ds.t_to_sigma(ts))


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022), eq. 5: evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Evenly spaced in log sigma."""
    return _append_zero(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)))


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> np.ndarray:
    """Polynomial in log sigma (k-diffusion ``get_sigmas_polyexponential``)."""
    ramp = np.linspace(1, 0, n) ** rho
    return _append_zero(np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def ddim_timesteps(n: int, ds: DiscreteSchedule) -> np.ndarray:
    """DDIM's "leading" timesteps with offset 1 (t = 1, 1+k, ..., k = T // n), ending at
    sigma(t=0) rather than 0, exactly as DDIM with ``set_alpha_to_one=False`` does."""
    k = len(ds.sigmas) // n
    ts = (np.arange(n) * k + 1)[::-1]
    return np.concatenate([ds.sigmas[ts], [ds.sigma_min]])


def normalize_schedule(name: str) -> str:
    """Canonical schedule name for ``name`` (case and ``_``/space insensitive)."""
    key = str(name).strip().lower().replace("_", " ")
    for s in SCHEDULES:
        if s.lower() == key:
            return s
    raise ValueError(f"schedule {name!r} is unknown; valid schedules: {', '.join(SCHEDULES)}")


def get_sigmas(schedule: str, n: int, ds: DiscreteSchedule, default: str = "Uniform",
               discard_penultimate: bool = False) -> np.ndarray:
    """The n+1 sigmas (last one 0, or sigma_min for DDIM) of ``schedule`` for ``n`` steps.

    ``default`` is what "Automatic" means for the sampler; ``discard_penultimate`` computes one
    step more and drops the next-to-last sigma (DPM2 does, as the web UI does).
    """
    name = normalize_schedule(schedule)
    if name == "Automatic":
        name = default
    steps = n + 1 if discard_penultimate else n
    if name == "Uniform":
        s = uniform(steps, ds)
    elif name == "SGM Uniform":
        s = sgm_uniform(steps, ds)
    elif name == "Karras":
        s = karras(steps, ds.sigma_min, ds.sigma_max)
    elif name == "Exponential":
        s = exponential(steps, ds.sigma_min, ds.sigma_max)
    elif name == "Polyexponential":
        s = polyexponential(steps, ds.sigma_min, ds.sigma_max)
    elif name == "DDIM":
        s = ddim_timesteps(steps, ds)
    else:  # pragma: no cover - normalize_schedule guards this
        raise ValueError(name)
    if discard_penultimate:
        s = np.concatenate([s[:-2], s[-1:]])
    return s
