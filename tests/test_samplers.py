"""Every sampler that k-diffusion implements equals ``k_diffusion.sampling`` for the same
denoiser, sigmas and noise, to 1e-5; the others are checked against their defining algebra."""
import inspect
import math

import numpy as np
import pytest
import torch

from sdrt import samplers as S
from sdrt.schedules import DiscreteSchedule, get_sigmas, karras

DS = DiscreteSchedule.from_config()

KDIFF = {  # sdrt sampler -> k-diffusion function, extra kwargs
    "Euler": ("sample_euler", {}),
    "Euler a": ("sample_euler_ancestral", {}),
    "Heun": ("sample_heun", {}),
    "DPM2": ("sample_dpm_2", {}),
    "DPM2 a": ("sample_dpm_2_ancestral", {}),
    "LMS": ("sample_lms", {}),
    "DPM++ 2M": ("sample_dpmpp_2m", {}),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", {}),
    "DPM++ SDE": ("sample_dpmpp_sde", {}),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", {}),
}


def toy_denoiser(x, sigma):
    """A smooth, nonlinear stand-in for a network: D(x, sigma), sigma a float or a (B,) tensor."""
    s = sigma.reshape(-1, 1, 1, 1).to(x.dtype) if torch.is_tensor(sigma) else float(sigma)
    c_in = 1 / (s ** 2 + 1) ** 0.5
    return torch.tanh(x * c_in * 1.3) * 0.8 + 0.1 * torch.sin(x * c_in * 3.0)


class Recorder:
    """Noise source that returns the same fresh draws, in call order, to both implementations."""

    def __init__(self, shape, seed):
        self.g = torch.Generator().manual_seed(seed)
        self.shape, self.draws, self.i = shape, [], 0

    def __call__(self, sigma, sigma_next):
        if self.i == len(self.draws):
            self.draws.append(torch.randn(self.shape, generator=self.g))
        self.i += 1
        return self.draws[self.i - 1]

    def rewind(self):
        self.i = 0


@pytest.mark.parametrize("name", list(KDIFF))
@pytest.mark.parametrize("schedule", ["Karras", "Uniform", "Exponential"])
def test_sampler_matches_k_diffusion(ksampling, name, schedule):
    spec, _ = S.resolve_sampler(name)
    steps = 9
    sig = get_sigmas(schedule, steps, DS, discard_penultimate=spec.discard_penultimate)
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn((2, 4, 5, 7), generator=g) * float(sig[0])   # odd latent sizes
    noise = Recorder(x0.shape, 11)
    ours = spec.fn(toy_denoiser, x0.clone(), sig, noise=noise)
    n_ours = noise.i
    noise.rewind()
    fn_name, kw = KDIFF[name]
    kfn = getattr(ksampling, fn_name)
    extra = {"disable": True}
    if "noise_sampler" in inspect.signature(kfn).parameters:
        extra["noise_sampler"] = noise
    theirs = kfn(toy_denoiser, x0.clone(), torch.tensor(sig, dtype=torch.float64), **extra, **kw)
    assert noise.i == n_ours, "both implementations draw the same number of noise tensors"
    assert torch.isfinite(ours).all()
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-5, f"{name}/{schedule}: max abs difference {err:.3g}"


def test_ddim_eta0_is_the_deterministic_ddim_update():
    """DDIM eta=0 from sigma to sigma': x0 + sigma' * eps, where eps = (x - x0) / sigma."""
    sig = get_sigmas("Automatic", 5, DS, default="DDIM")
    assert sig[-1] == pytest.approx(DS.sigma_min)       # ends at sigma(t=0), as set_alpha_to_one=False
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * sig[0]
    calls = []

    def model(x, s):
        calls.append((x.clone(), s))
        return toy_denoiser(x, s)

    out = S.sample_ddim(model, x.clone(), sig)
    xi, si = calls[-1]
    d = toy_denoiser(xi, si)
    expected = d + (xi - d) / si * sig[-1]
    assert torch.allclose(out, expected, atol=1e-6)


def test_ddim_eta_matches_ddim_sigma_t():
    """With eta > 0 the noise amplitude equals DDIM's sigma_t / sqrt(alpha_prev) (eq. 16)."""
    s, s_next, eta = 3.0, 1.2, 0.7
    a_t, a_prev = 1 / (1 + s ** 2), 1 / (1 + s_next ** 2)
    sigma_t = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    _, up = S.ancestral_step(s, s_next, eta)
    assert up == pytest.approx(sigma_t / math.sqrt(a_prev), rel=1e-12)


def test_lcm_jumps_to_denoised_then_renoises():
    sig = np.array([5.0, 2.0, 0.5, 0.0])
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1)) * 5
    noise = Recorder(x.shape, 3)
    out = S.sample_lcm(toy_denoiser, x.clone(), sig, noise=noise)
    assert noise.i == 2                                  # no noise after the last step
    xs = x
    for i in range(3):
        d = toy_denoiser(xs, sig[i])
        xs = d + (noise.draws[i] * sig[i + 1] if sig[i + 1] > 0 else 0)
    assert torch.allclose(out, xs, atol=1e-6)


def test_lms_coefficients_integrate_polynomials_exactly():
    sig = karras(10, 0.03, 14.6)
    for i in range(1, 9):
        for order in range(1, min(i + 1, 4) + 1):
            c = S.lms_coefficients(sig, i, order)
            nodes = [sig[i - k] for k in range(order)]
            # integrating p(s) = s^k over [s_i, s_{i+1}] through the nodes is exact for k < order
            for k in range(order):
                exact = (sig[i + 1] ** (k + 1) - sig[i] ** (k + 1)) / (k + 1)
                assert sum(cj * n ** k for cj, n in zip(c, nodes)) == pytest.approx(exact, rel=1e-9, abs=1e-12)


def test_stochastic_sampler_without_noise_source_is_an_error():
    with pytest.raises(ValueError, match="noise"):
        S.sample_euler_ancestral(toy_denoiser, torch.zeros(1, 4, 2, 2) + 1, np.array([2.0, 1.0, 0.0]))


@pytest.mark.parametrize("name,schedule,expect", [
    ("DPM++ 2M Karras", "Automatic", ("DPM++ 2M", "Karras")),
    ("dpm++ 2m sde exponential", "Automatic", ("DPM++ 2M SDE", "Exponential")),
    ("k_euler_a", "Uniform", ("Euler a", "Uniform")),
    ("Euler", "Karras", ("Euler", "Karras")),
])
def test_sampler_names(name, schedule, expect):
    spec, sched = S.resolve_sampler(name, schedule)
    assert (spec.name, sched) == expect


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError) as e:
        S.resolve_sampler("Euler b")
    assert "Euler a" in str(e.value) and "UniPC" in str(e.value)


@pytest.mark.parametrize("order,variant,steps", [(1, "bh2", 5), (2, "bh2", 6), (3, "bh2", 7), (2, "bh1", 4)])
def test_unipc_matches_diffusers_scheduler(order, variant, steps):
    """UniPC against diffusers' UniPCMultistepScheduler driven by the same toy model in its
    variance-preserving space (x_vp = x / sqrt(1 + sigma^2))."""
    from diffusers import UniPCMultistepScheduler
    final = "zero" if variant == "bh2" else "sigma_min"   # diffusers' bh1 is NaN at sigma 0
    sched = UniPCMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    solver_order=order, solver_type=variant, final_sigmas_type=final)
    sched.set_timesteps(steps)
    sig = sched.sigmas.double().numpy()
    noise = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    sample = noise.clone()
    for i, t in enumerate(sched.timesteps):
        s = float(sig[i])
        xk = sample * math.sqrt(1 + s * s)
        sample = sched.step((xk - toy_denoiser(xk, s)) / s, t, sample).prev_sample
    ours = S.sample_unipc(toy_denoiser, noise * math.sqrt(1 + sig[0] ** 2), sig, order=order, variant=variant)
    ours = ours / math.sqrt(1 + sig[-1] ** 2)
    assert (ours - sample).abs().max().item() <= 1e-5
