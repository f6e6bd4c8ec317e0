"""The pipeline end to end on random:tiny: seeds, batches, the CFG loop, errors, model folders."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import sdrt
from sdrt.samplers import SAMPLERS

ARGS = dict(width=64, height=64, steps=6, seed=42)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_generates(tiny, sampler):
    r = tiny("a red cube on a table", sampler=sampler, **ARGS)
    assert len(r.images) == 1 and r.images[0].size == (64, 64) and r.images[0].mode == "RGB"
    assert np.isfinite(r.pixels).all() and r.pixels.std() > 0.01
    assert set(r.timings) == {"text_encoder", "loop", "unet", "vae", "total"} and r.timings["unet"] == r.timings["loop"]
    assert r.timings["total"] >= r.timings["unet"] > 0


def test_same_seed_same_image_and_batch_seeds(tiny):
    a = tiny("a house", batch_size=3, sampler="Euler a", **ARGS)
    assert a.seeds == [42, 43, 44]
    b = tiny("a house", sampler="Euler a", **dict(ARGS, seed=43))
    # image 1 of the batch is the image of seed 43 alone (per-image generators)
    np.testing.assert_allclose(a.pixels[1], b.pixels[0], atol=1e-5)
    assert np.abs(a.pixels[0] - a.pixels[1]).max() > 1e-3


def test_cfg_scale_and_prompt_matter(tiny):
    base = tiny("a dog", sampler="DPM++ 2M", **ARGS).pixels
    assert np.abs(base - tiny("a dog", sampler="DPM++ 2M", cfg_scale=1.5, **ARGS).pixels).max() > 1e-3
    assert np.abs(base - tiny("a cat", sampler="DPM++ 2M", **ARGS).pixels).max() > 1e-3


def test_cfg_one_equals_conditional_only(tiny):
    """cfg_scale 1 gives the conditional prediction alone: the negative prompt has no effect."""
    a = tiny("a dog", negative_prompt="", cfg_scale=1.0, sampler="Euler", **ARGS).pixels
    b = tiny("a dog", negative_prompt="ugly", cfg_scale=1.0, sampler="Euler", **ARGS).pixels
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_denoiser_guides_on_the_unet_output(tiny):
    """One CFG call: D(x, s) = x - s * (u + g (c - u)) from a single UNet call at batch 2B."""
    from sdrt.conditioning import encode_texts
    from sdrt.denoiser import CFGDenoiser
    c, be = tiny.components, tiny.backend
    emb = encode_texts(be, c.tokenizer, ["a", ""], 1)
    calls = []
    orig = be.unet

    def spy(x, t, ctx):
        calls.append((x.shape[0], float(t[0])))
        return orig(x, t, ctx)

    be.unet = spy
    try:
        d = CFGDenoiser(be, c.schedule, [[(1.0, [(10, emb["a"])])]], [[(10, emb[""])]], 5.0, (4, 8, 8), 4)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3.0
        out = d(x, 3.0)
    finally:
        be.unet = orig
    assert calls == [(2, pytest.approx(c.schedule.sigma_to_t(3.0), rel=1e-6))]
    xin = (x / math.sqrt(10.0)).repeat(2, 1, 1, 1)
    t = torch.full((2,), c.schedule.sigma_to_t(3.0))
    eps = orig(xin, t, torch.stack([emb["a"], emb[""]]))
    expected = x - 3.0 * (eps[1:] + 5.0 * (eps[:1] - eps[1:]))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_callback_counts_steps(tiny):
    seen = []
    tiny("x", sampler="Heun", callback=lambda i, n: seen.append((i, n)), **ARGS)
    assert seen == [(i, 6) for i in range(1, 7)]


def test_prompt_list_sets_batch(tiny):
    r = tiny(["a cat", "a dog"], negative_prompt=["", "blurry"], sampler="Euler", **ARGS)
    assert len(r.images) == 2 and r.seeds == [42, 43]
    alone = tiny("a dog", negative_prompt="blurry", sampler="Euler", **dict(ARGS, seed=43))
    np.testing.assert_allclose(r.pixels[1], alone.pixels[0], atol=1e-5)


def test_long_prompt_runs_in_two_windows(tiny):
    long = ", ".join(["a very detailed photograph of a mountain lake"] * 12)   # > 75 tokens
    r = tiny(long, sampler="Euler", **ARGS)
    assert np.isfinite(r.pixels).all()


def test_random_seed_is_reported(tiny):
    r = tiny("x", sampler="Euler", width=64, height=64, steps=1, seed=-1)
    assert 0 <= r.seeds[0] < 2 ** 32
    assert f"Seed: {r.seeds[0]}," in r.infotexts[0]


@pytest.mark.parametrize("kwargs,name", [
    (dict(width=60), "width"), (dict(height=0), "height"), (dict(width=64.5), "width"),
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"),
    (dict(sampler="Euler b"), "sampler"), (dict(schedule="Cosine"), "schedule"),
    (dict(cfg_scale=float("nan")), "cfg_scale"), (dict(cfg_scale="7"), "cfg_scale"),
    (dict(batch_size=0), "batch_size"), (dict(seed=2 ** 32), "seed"), (dict(seed="abc"), "seed"),
    (dict(clip_skip=0), "clip_skip"), (dict(rng="tpu"), "rng"), (dict(subseed_strength=1.5), "subseed_strength"),
    (dict(eta=-1.0), "eta"), (dict(sigmas=[1.0, 2.0]), "sigmas"), (dict(negative_prompt=["a", "b"]), "negative_prompt"),
    (dict(prompt=42), "prompt"), (dict(prompt=[]), "number of prompts"), (dict(prompt=["a", 3]), "prompt"),
])
def test_bad_input_is_a_value_error_naming_the_argument(tiny, kwargs, name):
    calls = []
    orig = tiny.backend.encode_text
    tiny.backend.encode_text = lambda *a: calls.append(a) or orig(*a)
    try:
        with pytest.raises(ValueError, match=name):
            tiny(**dict(dict(prompt="x", width=64, height=64, steps=2), **kwargs))
    finally:
        tiny.backend.encode_text = orig
    assert not calls, "the error comes before any network runs"


def test_unknown_sampler_error_lists_valid_ones(tiny):
    with pytest.raises(ValueError) as e:
        tiny("x", sampler="nope", width=64, height=64)
    assert "DPM++ 2M" in str(e.value) and "Euler a" in str(e.value)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="backend"):
        sdrt.Pipeline.from_pretrained("random:tiny", backend="jax")
    with pytest.raises(ValueError, match="device"):
        sdrt.Pipeline.from_pretrained("random:tiny", device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        sdrt.Pipeline.from_pretrained("random:tiny", dtype="int8")
    with pytest.raises(ValueError, match="random:tiny"):
        sdrt.Pipeline.from_pretrained("random:huge")
    with pytest.raises(ValueError, match="not found"):
        sdrt.Pipeline.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError) as e:
        sdrt.Pipeline.from_pretrained(str(tmp_path))
    assert "vae/" in str(e.value) and "text_encoder/" in str(e.value) and "scheduler/" in str(e.value)
    assert "unet/" not in str(e.value).split("missing")[1].split("(")[0]


def test_diffusers_folder_round_trip(tiny, tmp_path):
    """A model saved in diffusers format loads back and gives the same image."""
    from sdrt.models import save_diffusers_folder
    save_diffusers_folder(tiny.components, tmp_path / "m")
    pipe = sdrt.Pipeline.from_pretrained(str(tmp_path / "m"))
    assert pipe.components.model_hash == tiny.components.model_hash
    a = tiny("a boat", sampler="DPM++ 2M", **ARGS)
    b = pipe("a boat", sampler="DPM++ 2M", **ARGS)
    np.testing.assert_array_equal(a.pixels, b.pixels)


def test_diffusers_folder_with_broken_weights(tiny, tmp_path):
    from sdrt.models import save_diffusers_folder
    save_diffusers_folder(tiny.components, tmp_path / "m")
    for f in (tmp_path / "m" / "unet").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not load"):
        sdrt.Pipeline.from_pretrained(str(tmp_path / "m"))


def test_png_carries_infotext(tiny, tmp_path):
    r = tiny("a tree", negative_prompt="fog", sampler="DPM++ 2M Karras", cfg_scale=6.5, **ARGS)
    path = r.save(tmp_path / "x.png")
    text = Image.open(path).text["parameters"]
    assert text == r.infotexts[0]
    assert text.startswith("a tree\nNegative prompt: fog\nSteps: 6, Sampler: DPM++ 2M, Schedule type: Karras, "
                           "CFG scale: 6.5, Seed: 42, Size: 64x64, Model hash: ")


def test_cli_generate_writes_png(tmp_path, capsys):
    from sdrt.cli import main
    out = tmp_path / "out.png"
    rc = main(["generate", "a lighthouse", "--model", "random:tiny", "--steps", "3", "--sampler", "DPM++ 2M",
               "--schedule", "Karras", "--seed", "1", "-o", str(out), "-q"])
    assert rc == 0 and out.is_file()
    img = Image.open(out)
    assert img.size == (64, 64) and "Seed: 1," in img.text["parameters"]
    assert main(["generate", "x", "--width", "63", "-o", str(tmp_path / "bad.png"), "-q"]) == 2
    assert "width" in capsys.readouterr().err
