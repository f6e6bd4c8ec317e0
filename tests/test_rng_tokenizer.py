"""Seeds and noise (the web UI's sources) and the CLIP tokenizer."""
import numpy as np
import pytest
import torch

from sdrt import rng
from sdrt.tokenizer import BOS_ID, EOS_ID, clip_tokenizer


def test_philox_reference_values():
    np.testing.assert_allclose(rng.philox_randn(0, (3, 4)).ravel()[:4],
                               [-0.92466259, -0.42534415, -2.6438457, 0.14518388], atol=1e-6)


def test_philox_is_standard_normal_and_offset_changes_it():
    a = rng.philox_randn(1234, (200_000,))
    assert abs(a.mean()) < 0.01 and abs(a.std() - 1) < 0.01
    assert not np.allclose(a[:10], rng.philox_randn(1234, (10,), offset=1))


def test_cpu_source_is_torch_generator_per_seed():
    g = rng.ImageRNG((4, 8, 8), [5, 6], source="cpu")
    x = g.next()
    np.testing.assert_array_equal(x[1], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(6)))
    # later draws continue each image's own generator
    gen = torch.Generator().manual_seed(5)
    torch.randn((4, 8, 8), generator=gen)
    np.testing.assert_array_equal(g.next()[0], torch.randn((4, 8, 8), generator=gen))


def test_ensd_reseeds_after_the_first_call():
    a = rng.ImageRNG((4, 4, 4), [7], source="cpu", eta_noise_seed_delta=31337)
    b = rng.ImageRNG((4, 4, 4), [7], source="cpu")
    np.testing.assert_array_equal(a.next(), b.next())          # initial noise unchanged
    expected = torch.randn((4, 4, 4), generator=torch.Generator().manual_seed(7 + 31337))
    np.testing.assert_array_equal(a.next()[0], expected)


def test_nv_source_and_subseed_and_resize():
    g = rng.ImageRNG((4, 8, 8), [3], source="nv")
    np.testing.assert_allclose(g.next()[0].numpy(), rng.philox_randn(3, (4, 8, 8)), atol=0)
    s = rng.ImageRNG((4, 8, 8), [3], subseeds=[9], subseed_strength=1.0, source="cpu").next()
    np.testing.assert_allclose(s[0], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(9)), atol=1e-5)
    r = rng.ImageRNG((4, 8, 8), [3], seed_resize_from=(32, 32), source="cpu").next()
    small = torch.randn((4, 4, 4), generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(r[0, :, 2:6, 2:6], small)


@pytest.mark.parametrize("bad", [2 ** 32, -2, 1.5, "x", None])
def test_bad_seeds(bad):
    with pytest.raises(ValueError, match="seed"):
        rng.check_seed(bad)


def test_random_seed():
    assert 0 <= rng.check_seed(-1) <= rng.MAX_SEED
    assert rng.check_seed(2 ** 32 - 1) == 2 ** 32 - 1


def test_tokenizer_ids():
    t = clip_tokenizer()
    assert t("a photo of a cat").input_ids == [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID]
    assert len(t.get_vocab()) == 49408
    assert t.pad_token_id == EOS_ID and t.model_max_length == 77


ARGS = dict(width=64, height=64, steps=4, seed=11)


def test_ensd_changes_only_sampler_noise(tiny):
    euler = [tiny("x", sampler="Euler", eta_noise_seed_delta=d, **ARGS).pixels for d in (0, 31337)]
    np.testing.assert_array_equal(euler[0], euler[1])            # no sampler noise: no change
    ancestral = [tiny("x", sampler="Euler a", eta_noise_seed_delta=d, **ARGS) for d in (0, 31337)]
    assert np.abs(ancestral[0].pixels - ancestral[1].pixels).max() > 1e-4
    assert "ENSD: 31337" in ancestral[1].infotexts[0] and "ENSD" not in ancestral[0].infotexts[0]


def test_rng_sources_in_the_pipeline(tiny):
    cpu = tiny("x", sampler="Euler", rng="cpu", **ARGS)
    gpu = tiny("x", sampler="Euler", rng="gpu", **ARGS)        # on a CPU device: the same generator
    nv = tiny("x", sampler="Euler", rng="nv", **ARGS)
    np.testing.assert_array_equal(cpu.pixels, gpu.pixels)
    assert np.abs(cpu.pixels - nv.pixels).max() > 1e-3
    assert "RNG: NV" in nv.infotexts[0] and "RNG: CPU" in cpu.infotexts[0] and "RNG" not in gpu.infotexts[0]


def test_variation_seed_and_resize_in_the_pipeline(tiny):
    base = tiny("x", sampler="Euler", **ARGS).pixels
    var = tiny("x", sampler="Euler", subseed=3, subseed_strength=0.3, **ARGS)
    assert np.abs(base - var.pixels).max() > 1e-4 and "Variation seed: 3, Variation seed strength: 0.3" in var.infotexts[0]
    resized = tiny("x", sampler="Euler", seed_resize_from=(32, 32), **ARGS)
    assert np.abs(base - resized.pixels).max() > 1e-4 and "Seed resize from: 32x32" in resized.infotexts[0]
