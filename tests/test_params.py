"""The generation arguments (sdrt.params), the pipeline's public stages and its lifecycle, and
the one declaration of each linear sampler's step that both loops run."""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

import sdrt
from sdrt import samplers
from sdrt.fastpath import STEP_SAMPLERS, step_table, unsupported_reason
from sdrt.params import GenerationParams, Job, validate

SMALL = dict(steps=3, width=64, height=64)


def test_the_python_call_takes_params_or_keywords_alike(tiny):
    p = GenerationParams("a red cube", sampler="Euler", seed=5, **SMALL)
    a, b = tiny(p), tiny("a red cube", sampler="Euler", seed=5, **SMALL)
    assert np.array_equal(a.pixels, b.pixels) and a.infotexts == b.infotexts
    c = tiny(p, seed=6)                                 # keywords replace fields of the params
    assert c.seeds == [6] and p.seed == 5
    with pytest.raises(TypeError):
        tiny(p, "extra positional")


def test_stages_by_hand_give_the_call_s_image(tiny):
    params = GenerationParams(["a cat", "a dog"], negative_prompt="blurry", sampler="DPM++ 2M", seed=3, **SMALL)
    job = tiny.validate(params)
    assert isinstance(job, Job) and job.batch_size == 2 and job.seeds == [3, 4]
    assert len(job.sigmas) == 4 and job.params.sampler == "DPM++ 2M" and job.params.schedule == "Automatic"
    cond = tiny.encode(job)
    assert len(cond.conds) == 2 and cond.plain and cond.seconds >= 0
    out = tiny.sample(job, cond)
    assert out.pixels.shape == (2, 64, 64, 3) and out.finite == [True, True] and out.bad == []
    result = tiny.result(job, cond, out)
    assert np.array_equal(result.pixels, tiny(params).pixels)
    assert result.infotexts[1] == tiny.infotext(job, 1) and "Seed: 4" in result.infotexts[1]
    # denoise + decode is the eager half of sample
    latents = tiny.denoise(job, cond)
    assert np.abs(tiny.decode(latents).pixels - out.pixels).max() < 1e-6


@pytest.mark.parametrize("changes, message", [
    (dict(seed_resize_from=(64,)), "seed_resize_from must be"),
    (dict(seed_resize_from=(64, -1)), "seed_resize_from height"),
    (dict(sigmas=["a", "b"]), "sigmas must be"),
    (dict(sigmas=[1.0, 2.0]), "sigmas must be"),
    (dict(emphasis="loud"), "emphasis 'loud' is unknown"),
    (dict(cfg_scale=[1.0, 2.0]), "cfg_scale must be a number or a list of 1"),
    (dict(steps=1.5), "steps must be an integer"),
])
def test_bad_arguments_name_themselves(tiny, changes, message):
    with pytest.raises(ValueError, match=message):
        tiny.validate(GenerationParams("x", **dict(SMALL, **changes)))


def test_explicit_sigmas_set_the_steps(tiny):
    job = tiny.validate(GenerationParams("x", sigmas=[5.0, 1.0, 0.0], width=64, height=64))
    assert job.steps == 2 and np.array_equal(job.sigmas, [5.0, 1.0, 0.0])


def test_batch_key_is_every_shared_argument():
    """Requests differing only in per-image arguments share a key; any other argument splits."""
    def key(**kw):       # latent factor 8, a 2-layer text encoder
        return validate(GenerationParams("x", **kw), 8, 2).batch_key()
    assert key(seed=1, cfg_scale=3.0, negative_prompt="a") == key(seed=2, cfg_scale=9.0, negative_prompt="b")
    shared = [f.name for f in GenerationParams.fields() if not f.metadata["per_image"]]
    assert {"steps", "sampler", "width", "clip_skip", "eta", "emphasis", "rng"} <= set(shared)
    for change in (dict(steps=21), dict(sampler="Euler"), dict(width=520), dict(eta=0.5), dict(rng="cpu")):
        assert key(**change) != key()


def test_a_request_is_one_image(tiny):
    with sdrt.Batcher(tiny, max_wait=0.0) as batcher:
        bad = batcher.submit(sdrt.Request("x", batch_size=2, **SMALL))
        with pytest.raises(ValueError, match="batch_size must be 1"):
            bad.result(timeout=30)
        got = batcher.submit(sdrt.Request("x", seed=7, **SMALL)).result(timeout=60)
    assert got.seeds == [7] and got.timings["batch_size"] == 1 and "loop" in got.timings


def test_close_frees_the_pipeline_and_refuses_later_calls(tiny):
    def batcher_threads():
        return [t for t in threading.enumerate() if t.name.startswith("sdrt-")]
    before = len(batcher_threads())
    with sdrt.Pipeline(tiny.components, tiny.backend) as pipe:
        pipe.set_fast_path()
        pipe("x", seed=1, sampler="Euler", **SMALL)
        future = pipe.submit(sdrt.Request("y", seed=2, **SMALL))         # starts its default batcher
        assert future.result(timeout=60).seeds == [2] and len(batcher_threads()) == before + 3
    assert pipe.closed and pipe.loops is None and len(batcher_threads()) == before
    with pytest.raises(RuntimeError, match="closed"):
        pipe("x", **SMALL)
    assert tiny("x", seed=1, **SMALL).images          # the shared backend still serves others


# ---------------------------------------------------------------- one copy of the sampler math

def test_linear_samplers_run_their_one_declaration():
    """The eager sampler of every static-loop sampler is sample_linear over the spec's own step,
    and the static loop's table holds the same coefficients."""
    assert set(STEP_SAMPLERS) == {"Euler", "Euler a", "DDIM", "DPM++ 2M", "DPM++ 2M SDE", "LCM"}
    sig = np.array([14.6, 7.0, 2.5, 0.9, 0.2, 0.0])
    for name in STEP_SAMPLERS:
        spec = samplers.SAMPLERS[name]
        assert spec.fn.func is samplers.sample_linear and spec.fn.keywords["step"] is spec.linear_step
        eta = spec.eta_default or 0.0
        table, draws = step_table(name, sig)
        steps = samplers.linear_steps(spec.linear_step, sig, eta=eta)
        assert np.array_equal(table[:, 2:6], [[c.a, c.b, c.e, c.n] for c in steps])
        assert draws == [c.draw for c in steps]


def test_a_new_sampler_runs_on_the_static_loop_or_says_why_not(tiny, monkeypatch):
    """A sampler added to the table with a linear step runs on the static loop (same image as
    its eager loop); one without says why it stays eager."""
    def halfway_step(s, i, **_):      # x' = D + (x - D) * sqrt(s'/s): a made-up but valid update
        a = (s[i + 1] / s[i]) ** 0.5 if s[i + 1] else 0.0
        return samplers.LinearStep(a=a, b=1.0 - a)
    spec = samplers.SamplerSpec("Halfway", samplers.linear_sampler(halfway_step, "Halfway"), linear_step=halfway_step)
    plain = dataclasses.replace(spec, name="Halfway eager", linear_step=None)
    monkeypatch.setitem(samplers.SAMPLERS, spec.name, spec)
    monkeypatch.setitem(samplers.SAMPLERS, plain.name, plain)
    monkeypatch.setattr("sdrt.fastpath.STEP_SAMPLERS", (*STEP_SAMPLERS, spec.name))
    args = dict(prompt="a [cat:dog:0.5]", seed=4, **SMALL)
    pipe = sdrt.Pipeline(tiny.components, tiny.backend)
    eager = pipe(sampler="Halfway", **args)
    pipe.set_fast_path()
    static = pipe(sampler="Halfway", **args)
    assert len(pipe.loops) == 1 and np.abs(static.pixels - eager.pixels).max() <= 1e-4
    job = pipe.validate(GenerationParams(sampler="Halfway eager", **args))
    assert "declares no linear step" in unsupported_reason(job, pipe.encode(job))
    assert np.array_equal(pipe(sampler="Halfway eager", **args).pixels, eager.pixels)
    assert len(pipe.loops) == 1
    pipe.close()
