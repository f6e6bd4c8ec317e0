"""Property-based fuzzing (hypothesis) of the prompt parser and of the HTTP API's JSON: no
exception escapes the parser, and no request body makes the server answer 500; every answer is
a success or a clear 4xx/503. Bounded: a fixed number of examples, small images and few steps."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdrt import prompts

PROMPT_ALPHABET = list("()[]{}:|\\ ,.0123456789abcxyz-+") + ["AND", "BREAK", ":1.5", ":0.5", "::", "\\(", "\n"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PROMPT_ALPHABET), max_size=200).map("".join), st.integers(1, 60))
def test_the_prompt_parser_never_raises(text, steps):
    pieces = prompts.parse_attention(text)
    assert pieces and all(isinstance(p, str) and isinstance(w, float) for p, w in pieces)
    for part, weight in prompts.split_and(text):
        assert isinstance(part, str) and isinstance(weight, float)
    sched = prompts.schedules([text], steps)[0]
    assert sched and sched[-1][0] >= steps - 1 and all(isinstance(t, str) for _, t in sched)


pytest.importorskip("fastapi", reason="the serve extra is not installed: scripts/setup.sh test installs it")
from fastapi.testclient import TestClient  # noqa: E402

import sdrt  # noqa: E402
from sdrt.serving.app import ServerState, create_app  # noqa: E402
from sdrt.serving.config import ServerConfig  # noqa: E402

KEYS = ["prompt", "negative_prompt", "steps", "cfg_scale", "seed", "subseed", "subseed_strength", "width", "height",
        "batch_size", "n_iter", "sampler_name", "sampler_index", "scheduler", "eta", "seed_resize_from_w",
        "seed_resize_from_h", "override_settings", "enable_hr", "styles", "tiling", "send_images", "hr_scale",
        "hr_upscaler", "denoising_strength", "hr_second_pass_steps", "hr_resize_x"]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 70), st.integers(-2 ** 64, 2 ** 64),
    st.floats(allow_nan=False, allow_infinity=False, width=32), st.sampled_from([1e308, -1e308, 0.0, 64, 8, 1, 2]),
    st.lists(st.sampled_from(PROMPT_ALPHABET), max_size=20).map("".join),
    st.sampled_from(["Euler", "DPM++ 2M", "karras", "Bogus", "", "GPU", "Latent", "Lanczos"]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.sampled_from(["CLIP_stop_at_last_layers", "randn_source", "eta_noise_seed_delta",
                                     "emphasis", "sd_vae", "bogus"]),
                    st.one_of(st.integers(-3, 5), st.sampled_from(["CPU", "NV", "x", "No norm"])), max_size=2),
)


@pytest.fixture(scope="module")
def client(tiny):
    config = ServerConfig(max_wait=0.0, max_images=2, max_side=64, max_image_steps=8)
    state = ServerState(config, pipe=sdrt.Pipeline(tiny.components, tiny.backend))
    with TestClient(create_app(state=state)) as c:
        yield c
    state.batcher.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=8))
def test_no_request_body_makes_a_500(client, body):
    r = client.post("/sdapi/v1/txt2img", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 413, 422, 503), (body, r.status_code, r.text[:500])
    if r.status_code != 200:
        assert set(r.json()) == {"error", "detail"}
