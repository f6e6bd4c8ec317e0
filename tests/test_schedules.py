"""Schedules against k-diffusion's constructions and the SD 1.x discrete schedule."""
import numpy as np
import pytest
import torch

from sdrt.schedules import SCHEDULES, DiscreteSchedule, get_sigmas, normalize_schedule

DS = DiscreteSchedule.from_config()


def test_sd1_sigma_range():
    assert DS.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert DS.sigma_max == pytest.approx(14.6146, abs=1e-4)


def test_sigma_to_t_inverts_t_to_sigma():
    for t in [0.0, 1.0, 17.25, 500.5, 998.0, 999.0]:
        assert DS.sigma_to_t(float(DS.t_to_sigma(t))) == pytest.approx(t, abs=1e-9)
    assert DS.sigma_to_t(1e-4) == 0.0 and DS.sigma_to_t(100.0) == 999.0   # clamped at the ends


@pytest.mark.parametrize("n", [1, 2, 7, 20])
def test_against_k_diffusion(ksampling, n):
    from k_diffusion import external  # noqa: F401 - loaded through the ksampling fixture's package
    ac = torch.tensor(1 / (1 + DS.sigmas ** 2), dtype=torch.float32)
    kds = external.DiscreteEpsDDPMDenoiser(None, ac, quantize=False)
    cases = {
        "Karras": ksampling.get_sigmas_karras(n, DS.sigma_min, DS.sigma_max, device="cpu"),
        "Exponential": ksampling.get_sigmas_exponential(n, DS.sigma_min, DS.sigma_max, device="cpu"),
        "Polyexponential": ksampling.get_sigmas_polyexponential(n, DS.sigma_min, DS.sigma_max, device="cpu"),
        "Uniform": kds.get_sigmas(n),
    }
    for name, ref in cases.items():
        ours = get_sigmas(name, n, DS)
        assert ours.shape == (n + 1,) and ours[-1] == 0
        np.testing.assert_allclose(ours, ref.double().numpy(), rtol=2e-6, atol=1e-7, err_msg=name)


def test_sgm_uniform_excludes_the_endpoint():
    s = get_sigmas("SGM Uniform", 10, DS)
    assert s[0] == pytest.approx(DS.sigma_max) and s[-1] == 0 and s[-2] > DS.sigma_min
    ts = [DS.sigma_to_t(v) for v in s[:-1]]
    assert np.allclose(np.diff(ts), np.diff(ts)[0])    # evenly spaced in t


def test_discard_penultimate_and_automatic():
    s = get_sigmas("Automatic", 10, DS, default="Karras", discard_penultimate=True)
    full = get_sigmas("Karras", 11, DS)
    assert len(s) == 11 and np.allclose(s, np.concatenate([full[:-2], full[-1:]]))
    ddim = get_sigmas("Automatic", 20, DS, default="DDIM")
    assert np.allclose(ddim[:-1], DS.sigmas[np.arange(20)[::-1] * 50 + 1])


def test_schedule_names():
    assert normalize_schedule("sgm_uniform") == "SGM Uniform"
    assert normalize_schedule("karras") == "Karras"
    with pytest.raises(ValueError) as e:
        normalize_schedule("Cosine")
    assert all(s in str(e.value) for s in SCHEDULES)


def test_v_prediction_and_bad_config():
    assert DiscreteSchedule.from_config(prediction_type="v_prediction").prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        DiscreteSchedule.from_config(prediction_type="sample")
    with pytest.raises(ValueError, match="beta_schedule"):
        DiscreteSchedule.from_config(beta_schedule="squaredcos_cap_v2")
