"""The hires fix (sdrt.hires): the second pass against a two-pass reference made of sdrt's own
public pieces (txt2img, a Lanczos resize, img2img with the fixed-steps rule), the latent path,
sizes, prompt editing across both passes, the static loop, the infotext and the HTTP API."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.params import GenerationParams, plan_hires

ARGS = dict(prompt="a cat", steps=6, seed=3, width=64, height=64, sampler="Euler", rng="cpu")


def test_pixel_upscaler_equals_txt2img_then_img2img(tiny):
    hires = tiny(enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos", denoising_strength=0.5,
                 hr_second_pass_steps=4, **ARGS)
    first = tiny(**ARGS).images[0]
    up = first.resize((96, 96), resample=Image.Resampling.LANCZOS)
    ref = tiny(**dict(ARGS, width=96, height=96, steps=4), init_images=up, denoising_strength=0.5,
               img2img_fix_steps=True)
    assert hires.images[0].size == (96, 96)
    assert np.array_equal(np.asarray(hires.images[0]), np.asarray(ref.images[0]))


def test_latent_upscaler_starts_from_the_interpolated_latents(tiny, monkeypatch):
    params = GenerationParams(enable_hr=True, hr_scale=2.0, hr_upscaler="Latent (bicubic antialiased)",
                              denoising_strength=0.6, **ARGS)
    job = tiny.validate(params)
    first = tiny.denoise(job.__class__(**{**job.__dict__, "hires": None}), tiny.encode(job))
    want = torch.nn.functional.interpolate(first, size=(16, 16), mode="bicubic", antialias=True)
    seen = {}
    real = tiny.hires_job

    def spy(job, init_images=None, init_latents=None):
        seen["latents"] = init_latents
        return real(job, init_images=init_images, init_latents=init_latents)
    monkeypatch.setattr(tiny, "hires_job", spy)
    steps = []
    r = tiny(params, callback=lambda i, n: steps.append((i, n)))
    assert torch.allclose(seen["latents"], want, atol=1e-5)
    assert r.images[0].size == (128, 128) and steps[-1] == (12, 12)


def test_second_pass_runs_its_steps_from_a_schedule_planned_for_steps_over_strength(tiny):
    job = tiny.validate(GenerationParams(enable_hr=True, hr_second_pass_steps=5, denoising_strength=0.5, **ARGS))
    hr = tiny.hires_job(job, init_latents=torch.zeros((1, 4, 16, 16)))
    assert len(hr.sigmas) - 1 == 5                      # exactly the hires steps
    full = tiny.validate(GenerationParams(**dict(ARGS, steps=10, width=128, height=128))).sigmas
    assert np.allclose(hr.sigmas, full[5:])             # of a 10-step schedule (5 / 0.5)
    assert hr.seeds == job.seeds and (hr.params.width, hr.params.height) == (128, 128)


@pytest.mark.parametrize("prompt,ends", [("a [cat:dog:1.5]", [3, 6]),      # half way through the second pass
                                         ("a [cat:dog:0.5]", [6]),          # switched in the first pass
                                         ("a [cat:dog:8]", [2, 6])])        # step 8 = the second's 2nd
def test_prompt_editing_spans_both_passes(tiny, prompt, ends):
    job = tiny.validate(GenerationParams(enable_hr=True, **dict(ARGS, prompt=prompt)))
    hr = tiny.hires_job(job, init_latents=torch.zeros((1, 4, 16, 16)))
    pos, _, _ = tiny._prompt_schedules(hr)
    assert [end for end, _ in pos[0]] == ends
    assert pos[0][-1][1] == "a dog"


@pytest.mark.parametrize("kw,upscale_to,size", [
    (dict(hr_scale=1.5), (120, 88), (120, 88)),                             # 120x90, rounded down
    (dict(hr_resize_x=128), (128, 96), (128, 96)),
    (dict(hr_resize_y=72), (96, 72), (96, 72)),
    (dict(hr_resize_x=128, hr_resize_y=128), (168, 128), (128, 128)),       # covers, then the centre
    (dict(hr_scale=1.3), (104, 72), (104, 72)),
])
def test_sizes(kw, upscale_to, size):
    p = GenerationParams(enable_hr=True, **dict(ARGS, width=80, height=60, **kw))
    plan = plan_hires(p, 80, 60, 8)
    assert plan.upscale_to == upscale_to and plan.size == size


def test_errors():
    for kw, match in [(dict(hr_upscaler="4x-UltraSharp"), "hr_upscaler '4x-UltraSharp' is unknown"),
                      (dict(denoising_strength=0.0), "denoising_strength must be > 0"),
                      (dict(hr_scale=0.5), "hr_scale must be in"),
                      (dict(hr_resize_x=9000), "hr_resize_x must be in"),
                      (dict(hr_sampler_name="Bogus"), "sampler 'Bogus' is unknown")]:
        with pytest.raises(ValueError, match=match):
            plan_hires(GenerationParams(enable_hr=True, **ARGS, **kw), 64, 64, 8)


def test_infotext_and_the_static_loop(torch_pipe):
    args = dict(ARGS, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=3, hr_sampler_name="DPM++ 2M",
                hr_scheduler="Karras", hr_prompt="a dog", denoising_strength=0.55)
    torch_pipe.set_fast_path(False)
    eager = torch_pipe(**args)
    try:
        torch_pipe.set_fast_path()
        fast = torch_pipe(**args)
        assert len(torch_pipe.loops) == 1      # the second pass (a latent upscaler needs the first pass's latents:
        torch_pipe(**dict(args, hr_upscaler="Lanczos"))       # eager); a pixel upscaler runs the first pass there
        assert len(torch_pipe.loops) == 2      # too (the second pass's loop is the same one)
    finally:
        torch_pipe.set_fast_path(False)
    assert np.abs(eager.pixels - fast.pixels).max() < 1e-3
    text = eager.infotexts[0]
    for part in ("Size: 64x64", "Denoising strength: 0.55", "Hires upscale: 1.5", "Hires steps: 3",
                 "Hires upscaler: Latent", "Hires sampler: DPM++ 2M", "Hires schedule type: Karras",
                 "Hires prompt: a dog"):
        assert part in text, part


def test_hires_over_http(tiny):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    import sdrt
    from sdrt.server import ServerConfig, ServerState, create_app
    state = ServerState(ServerConfig(max_wait=0.0, max_images=4, max_side=128),
                        pipe=sdrt.Pipeline(tiny.components, tiny.backend))
    with TestClient(create_app(state=state)) as client:
        body = {"prompt": "a cat", "steps": 4, "width": 64, "height": 64, "seed": 2, "enable_hr": True,
                "hr_scale": 1.5, "denoising_strength": 0.5, "hr_upscaler": "Latent"}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["denoising_strength"] == 0.5 and "Hires upscale: 1.5" in info["infotexts"][0]
        want = tiny("a cat", steps=4, width=64, height=64, seed=2, enable_hr=True, hr_scale=1.5,
                    denoising_strength=0.5, sampler="Euler")
        assert info["infotexts"][0] == want.infotexts[0]
        r = client.post("/sdapi/v1/txt2img", json=dict(body, hr_scale=4))
        assert r.status_code == 422 and "upscale to 256x256" in r.json()["detail"]
    state.engine.close()


def test_both_passes_within_one_tensorrt_profile(torch_pipe, trt_engines):
    """The fake engines' one dynamic profile (64..96 px) serves the first pass at 64 and the
    second at 96: no second engine."""
    import tensorrt_fake as fake

    import sdrt
    from sdrt.backends import tensorrt_backend as tb
    backend = tb.TensorRTBackend(torch_pipe.components, torch.device("cpu"), torch.float32, trt_engines,
                                 trt=fake.module(), arch="sm_90", log=lambda m: None)
    pipe = sdrt.Pipeline(torch_pipe.components, backend)
    args = dict(ARGS, enable_hr=True, hr_scale=1.5, denoising_strength=0.5, hr_second_pass_steps=3)
    assert np.abs(pipe(**args).pixels - torch_pipe(**args).pixels).max() < 1e-4
    with pytest.raises(ValueError, match="profile"):
        pipe.validate(GenerationParams(**dict(args, hr_scale=2.0)))   # 128 px: outside, refused before running
