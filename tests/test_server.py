"""The web UI's HTTP API over sdrt.Engine (FastAPI in process; tests/test_serve_ray.py runs it
under Ray Serve with the webuiapi client)."""
import base64
import io
import json
import re
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: scripts/setup.sh test installs it")
from fastapi.testclient import TestClient  # noqa: E402

import sdrt  # noqa: E402
from sdrt import infotext  # noqa: E402
from sdrt.serve import Scaling, deployment_options  # noqa: E402
from sdrt.server import ServerConfig, ServerState, create_app  # noqa: E402

SMALL = {"steps": 4, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def client(tiny):
    state = ServerState(ServerConfig(max_wait=0.1, max_images=8), pipe=sdrt.Pipeline(tiny.components, tiny.backend))
    with TestClient(create_app(state=state)) as c:
        yield c
    state.engine.close()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_txt2img_returns_the_pipelines_images_with_infotext(client, tiny):
    body = {"prompt": "a (red:1.2) boat", "negative_prompt": "fog", "seed": 40, "batch_size": 2, "n_iter": 2,
            "sampler_name": "DPM++ 2M", "scheduler": "karras", "cfg_scale": 5.5, **SMALL}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert info["all_seeds"] == [40, 41, 42, 43] and info["seed"] == 40
    assert out["parameters"]["prompt"] == body["prompt"] and len(out["images"]) == 4
    want = tiny(body["prompt"], negative_prompt="fog", seed=40, batch_size=4, sampler="DPM++ 2M",
                schedule="Karras", cfg_scale=5.5, **SMALL)
    for i, b64 in enumerate(out["images"]):
        image = decode(b64)
        assert image.info["parameters"] == info["infotexts"][i] == want.infotexts[i]
        diff = np.abs(np.asarray(image, dtype=int) - np.asarray(want.images[i], dtype=int))
        assert diff.max() <= 1               # batched differently: float32 rounding, then uint8
    params = infotext.parse(info["infotexts"][3])
    assert params["Seed"] == "43" and params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras"


def test_variation_seed_rule_and_override_settings(client):
    r = client.post("/sdapi/v1/txt2img", json={
        "prompt": "a hill", "seed": 7, "subseed": 100, "subseed_strength": 0.25, "batch_size": 2,
        "override_settings": {"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337, "randn_source": "CPU"},
        "sampler_name": "Euler a", **SMALL})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [7, 7] and info["all_subseeds"] == [100, 101]
    p = infotext.parse(info["infotexts"][1])
    assert (p["Clip skip"], p["ENSD"], p["RNG"], p["Variation seed"]) == ("2", "31337", "CPU", "101")


def test_listing_routes(client, tiny):
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {}} in samplers
    assert len(samplers) == len(sdrt.samplers.SAMPLERS)
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert [s["name"] for s in schedulers] == ["automatic", "uniform", "karras", "exponential",
                                                "polyexponential", "sgm_uniform"]
    models = client.get("/sdapi/v1/sd-models").json()
    assert models[0]["hash"] == tiny.components.model_hash
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == models[0]["title"]
    progress = client.get("/sdapi/v1/progress").json()
    assert set(progress) >= {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    assert client.get("/health").json()["status"] == "ok"


def test_options_post_sets_the_replicas_defaults(client):
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
    try:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 1, **SMALL})
        assert json.loads(r.json()["info"])["clip_skip"] == 2
        bad = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 99})
        assert bad.status_code == 422 and "CLIP_stop_at_last_layers" in bad.json()["detail"]
    finally:
        client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})


def test_options_keeps_the_web_uis_other_options(client):
    """A web UI option sdrt does not implement is kept as set and returned (clients save and restore
    the whole options object); a request's override_settings still refuses one, since it would have
    no effect on the image it asks for."""
    r = client.post("/sdapi/v1/options", json={"send_seed": False, "samples_format": "png",
                                               "CLIP_stop_at_last_layers": 1})
    assert r.status_code == 200, r.text
    options = client.get("/sdapi/v1/options").json()
    assert options["send_seed"] is False and options["samples_format"] == "png"
    assert options["CLIP_stop_at_last_layers"] == 1
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL, "override_settings": {"send_seed": True}})
    assert r.status_code == 422 and "send_seed" in r.json()["detail"]
    bad = client.post("/sdapi/v1/options", json={"send_seed": True, "CLIP_stop_at_last_layers": 99})
    assert bad.status_code == 422 and client.get("/sdapi/v1/options").json()["send_seed"] is False   # nothing set


@pytest.mark.parametrize("body, status, message", [
    ('{"prompt": "x", ', 400, "not valid JSON"),
    ("[1, 2]", 422, "valid dictionary"),
    ('{"prompt": "x", "steps": "many"}', 422, "steps"),
    ('{"prompt": "x", "sampler_name": "Bogus"}', 422, "sampler 'Bogus' is unknown"),
    ('{"prompt": "x", "scheduler": "bogus"}', 422, "schedule 'bogus' is unknown"),
    ('{"prompt": "x", "width": 100000}', 422, "width must be in 1..2048"),
    ('{"prompt": "x", "width": 60, "height": 64, "steps": 2}', 422, "multiple of"),
    ('{"prompt": "x", "batch_size": 9}', 422, "at most|between 1 and 8"),
    ('{"prompt": "x", "n_iter": 0}', 422, "between 1 and 8"),
    ('{"prompt": "x", "steps": 0}', 422, "steps must be in 1..10000"),
    ('{"prompt": "x", "seed": 99999999999}', 422, "seed must be in"),
    ('{"prompt": "x", "cfg_scale": "NaN"}', 422, "cfg_scale must be a finite number"),
    ('{"prompt": "x", "enable_hr": true, "hr_upscaler": "R-ESRGAN 4x+"}', 422, "hr_upscaler 'R-ESRGAN 4x\\+' is unknown"),
    ('{"prompt": "x", "restore_faces": true}', 422, "restore_faces=True is not supported"),
    ('{"prompt": "x", "alwayson_scripts": {"controlnet": {}}}', 422, "alwayson_scripts"),
    ('{"prompt": "x", "override_settings": {"sd_vae": "x.pt"}}', 422, "VAE 'x.pt' was not found"),
    ('{"prompt": "x", "override_settings": {"sd_model_checkpoint": "other.safetensors"}}', 422, "not one this server offers"),
])
def test_bad_requests_get_a_clear_4xx(client, body, status, message):
    r = client.post("/sdapi/v1/txt2img", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"error", "detail"}
    assert re.search(message, err["detail"]), err


def test_huge_prompts_and_bodies_are_refused_and_the_server_lives_on(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "word " * 5000, **SMALL})
    assert r.status_code == 422 and "at most 20000" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", content=b"{" + b" " * (2 << 20) + b"}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "at most" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "still alive", "seed": 1, **SMALL})
    assert r.status_code == 200
    metrics = client.get("/metrics").text
    assert 'sdrt_http_responses_total{path="/sdapi/v1/txt2img",status="413"}' in metrics
    assert "sdrt_batch_size_bucket" in metrics and 'sdrt_stage_seconds_count{stage="unet"}' in metrics


def test_an_overflowing_request_is_refused_before_it_runs(client):
    """It used to run and end as a 500 (NaN or Inf image): now a 422 naming the bound."""
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "cfg_scale": 1e38, "seed": 1, **SMALL})
    assert r.status_code == 422 and "max_cfg_scale" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a (cat:" + "9" * 300 + ")", "seed": 1, **SMALL})
    assert r.status_code == 422 and "max_attention_weight" in r.json()["detail"]
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 1, **SMALL}).status_code == 200


def test_full_queue_answers_503_with_retry_after(tiny):
    pipe = sdrt.Pipeline(tiny.components, tiny.backend)
    gate = threading.Event()
    real = pipe.sample

    def sample(job, cond, callback=None):
        gate.wait(30)
        return real(job, cond, callback)
    pipe.sample = sample
    state = ServerState(ServerConfig(max_batch_size=1, max_wait=0.0, max_queue=1), pipe=pipe)
    with TestClient(create_app(state=state)) as c:
        # fill the engine directly until it refuses: one runs (held by the gate), one or two wait
        # encoded between the stages, one fills the queue
        held = []
        for i in range(10):
            f = state.engine.submit(sdrt.Request(f"p{i}", seed=i, **SMALL))
            if f.done() and isinstance(f.exception(), sdrt.EngineBusy):
                break
            held.append(f)
            time.sleep(0.3)                   # let the batcher take what it can
        assert 2 <= len(held) <= 4 and state.engine.queue_length() == 1
        busy = c.post("/sdapi/v1/txt2img", json={"prompt": "one too many", "seed": 9, **SMALL})
        gate.set()
        assert all(f.result(timeout=60).images for f in held)
        after = c.post("/sdapi/v1/txt2img", json={"prompt": "room again", "seed": 9, **SMALL})
    state.engine.close()
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text
    assert "queue is full" in busy.json()["detail"]
    assert after.status_code == 200


def test_ray_deployment_options():
    fixed = deployment_options(ServerConfig(max_queue=100, max_batch_size=8), Scaling(replicas=3))
    assert fixed["num_replicas"] == 3 and fixed["max_ongoing_requests"] == 108
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    auto = deployment_options(ServerConfig(device="cuda"), Scaling(min_replicas=1, max_replicas=4,
                                                                  target_ongoing_requests=8))
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    assert "num_replicas" not in auto and auto["ray_actor_options"]["num_gpus"] == 1.0
    with pytest.raises(ValueError, match="both"):
        deployment_options(ServerConfig(), Scaling(min_replicas=1))


def test_old_combined_sampler_names_set_the_schedule(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 3, "sampler_name": "DPM++ 2M Karras", **SMALL})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["sampler_name"] == "DPM++ 2M" and info["extra_generation_params"]["Schedule type"] == "Karras"
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in info["infotexts"][0]


def test_server_with_the_fast_path_serves_the_same_images(tiny):
    state = ServerState(ServerConfig(fast_path=True, max_wait=0.0))
    try:
        with TestClient(create_app(state=state)) as c:
            r = c.post("/sdapi/v1/txt2img", json={"prompt": "a boat", "seed": 5, "sampler_name": "Euler a", **SMALL})
        assert r.status_code == 200, r.text
        assert len(state.pipe.loops) == 1                          # it ran on the static loop
        want = tiny("a boat", seed=5, sampler="Euler a", **SMALL)
        got = decode(r.json()["images"][0])
        assert np.abs(np.asarray(got, dtype=int) - np.asarray(want.images[0], dtype=int)).max() <= 1
    finally:
        state.engine.close()
