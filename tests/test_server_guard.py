"""The HTTP server's limits and doors (sdrt.serving.guard and the app): a body limit that holds
for chunked bodies, a deadline for slow bodies, HTTP Basic authentication as the web UI's
--api-auth, frozen settings, request ids and logged 500s, and the work of a client that went
away cancelled."""
from __future__ import annotations

import asyncio
import base64
import logging
import threading

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: scripts/setup.sh test installs it")
from fastapi.testclient import TestClient  # noqa: E402

import sdrt  # noqa: E402
from sdrt.serving.app import APIError, ServerState, Txt2Img, create_app  # noqa: E402
from sdrt.serving.config import ServerConfig  # noqa: E402
from sdrt.serving.guard import Guard, parse_auth  # noqa: E402

SMALL = {"steps": 3, "width": 64, "height": 64}


def _client(tiny, **config):
    state = ServerState(ServerConfig(max_wait=0.0, **config), pipe=sdrt.Pipeline(tiny.components, tiny.backend))
    return state, TestClient(create_app(state=state))


def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_a_chunked_body_over_the_limit_is_refused(tiny):
    state, client = _client(tiny, max_body_bytes=4096)
    with client:
        chunks = (b"x" * 1024 for _ in range(64))          # no content-length: transfer-encoding chunked
        r = client.post("/sdapi/v1/txt2img", content=chunks, headers={"content-type": "application/json"})
        ok = client.post("/sdapi/v1/txt2img", json={"prompt": "fits", "seed": 1, **SMALL})
    state.batcher.close()
    assert r.status_code == 413 and "at most 4096" in r.json()["detail"]
    assert ok.status_code == 200 and r.headers["x-request-id"] != ok.headers["x-request-id"]


def test_a_slow_body_gets_408_at_the_deadline():
    """One byte at a time, slower than the deadline allows (an ASGI conversation, no socket)."""
    async def run():
        sent = []

        async def app(scope, receive, send):              # never reached
            raise AssertionError("the app must not see a request whose body timed out")

        async def receive():
            await asyncio.sleep(0.2)
            return {"type": "http.request", "body": b"x", "more_body": True}

        async def send(message):
            sent.append(message)
        guard = Guard(app, max_body_bytes=1 << 20, body_timeout=0.5)
        await guard({"type": "http", "path": "/sdapi/v1/txt2img", "headers": []}, receive, send)
        return sent
    sent = asyncio.run(run())
    assert sent[0]["status"] == 408 and b"within 0.5 s" in sent[1]["body"]


def test_api_auth_as_the_web_ui_does_it(tiny):
    state, client = _client(tiny, api_auth="alice:s3cret,bob:hunter2")
    with client:
        none = client.get("/sdapi/v1/options")
        wrong = client.get("/sdapi/v1/options", headers=_basic("alice", "hunter2"))
        garbage = client.get("/sdapi/v1/options", headers={"Authorization": "Basic !!!"})
        alice = client.get("/sdapi/v1/options", headers=_basic("alice", "s3cret"))
        bob = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 1, **SMALL}, headers=_basic("bob", "hunter2"))
        health = client.get("/health")
    state.batcher.close()
    assert none.status_code == wrong.status_code == garbage.status_code == 401
    assert none.headers["www-authenticate"].startswith("Basic")
    assert alice.status_code == 200 and bob.status_code == 200 and health.status_code == 200


@pytest.mark.parametrize("spec", ["alice", "alice:", ":pw", "a:b,,c:d"])
def test_malformed_credentials_are_refused_before_loading(spec):
    with pytest.raises(ValueError, match="api_auth must be"):
        parse_auth(spec)
    with pytest.raises(ValueError, match="api_auth must be"):
        ServerState(ServerConfig(api_auth=spec, model="not-loaded-because-refused-first"))


def test_frozen_settings_refuse_changes_but_not_per_request_overrides(tiny):
    state, client = _client(tiny, freeze_settings=True)
    with client:
        frozen = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2})
        per_request = client.post("/sdapi/v1/txt2img", json={
            "prompt": "x", "seed": 1, "override_settings": {"CLIP_stop_at_last_layers": 2}, **SMALL})
        options = client.get("/sdapi/v1/options").json()
    state.batcher.close()
    assert frozen.status_code == 403 and "frozen" in frozen.json()["detail"]
    assert per_request.status_code == 200 and options["CLIP_stop_at_last_layers"] == 1


def test_a_500_is_logged_with_the_request_id_it_carries(tiny, caplog):
    pipe = sdrt.Pipeline(tiny.components, tiny.backend)

    def sample(job, cond, callback=None):
        raise RuntimeError("the device fell over")
    pipe.sample = sample
    state = ServerState(ServerConfig(max_wait=0.0), pipe=pipe)
    with TestClient(create_app(state=state)) as client, caplog.at_level(logging.ERROR, logger="sdrt.serving"):
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 1, **SMALL})
    state.batcher.close()
    rid = r.headers["x-request-id"]
    assert r.status_code == 500 and r.json()["request_id"] == rid and "fell over" in r.json()["detail"]
    assert any(rid in rec.getMessage() for rec in caplog.records)


def test_a_client_that_goes_away_has_its_work_cancelled(tiny):
    """Its requests are cancelled while running; the batcher takes the next request at once."""
    pipe = sdrt.Pipeline(tiny.components, tiny.backend)
    started, release = threading.Event(), threading.Event()
    real = pipe.sample

    def sample(job, cond, callback=None):
        def held(step, total):
            started.set()
            release.wait(0.05)                  # a slow step: long enough to notice the client left
            callback(step, total)
        return real(job, cond, held)
    pipe.sample = sample
    state = ServerState(ServerConfig(max_wait=0.0, max_batch_size=1), pipe=pipe)

    async def run():
        gone = asyncio.Event()

        async def disconnected():
            await asyncio.to_thread(started.wait, 30)
            gone.set()
        body = Txt2Img(prompt="nobody will read this", seed=1, steps=200, width=64, height=64)
        with pytest.raises(APIError) as e:
            await state.txt2img(body, disconnected())
        return e.value
    error = asyncio.run(run())
    assert error.status == 499
    after = state.batcher.submit(sdrt.Request("next", seed=2, **SMALL)).result(timeout=60)
    release.set()
    state.batcher.close()
    assert after.images and state.batcher.metrics["requests"]["cancelled"] == 1


def _alternations(chars: int) -> str:
    """The issue's prompt: alternations of every cycle length, one distinct text per step."""
    words, n = [], 2
    while sum(map(len, words)) < chars:
        words.append("[" + "|".join(f"w{i}" for i in range(n)) + "] ")
        n = n % 7 + 2
    return "".join(words)[:chars].rsplit(" ", 1)[0]


@pytest.mark.parametrize("body, limit", [
    ({"prompt": _alternations(19000), "steps": 600}, "max_text_windows"),
    ({"prompt": " AND ".join(["a cat"] * 2000), "steps": 3, "batch_size": 16}, "max_and_parts"),
    ({"prompt": "x", "steps": 1000, "batch_size": 4}, "max_image_steps"),
])
def test_requests_beyond_the_budget_are_refused_before_any_work(tiny, body, limit):
    state, client = _client(tiny, max_images=16)
    with client:
        r = client.post("/sdapi/v1/txt2img", json={"seed": 1, "width": 64, "height": 64, **body})
    state.batcher.close()
    assert r.status_code == 422 and limit in r.json()["detail"], r.text
    assert state.batcher.metrics["batches"] == 0


# the rest of the web UI's read-only API ----------------------------------------------------------------

def test_png_info_reads_back_what_txt2img_wrote(tiny):
    import io

    from PIL import Image
    state, client = _client(tiny, api_auth="u:p")
    auth = _basic("u", "p")
    with client:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a (red:1.2) boat", "seed": 77, **SMALL}, headers=auth)
        png = r.json()["images"][0]
        info = client.post("/sdapi/v1/png-info", json={"image": png}, headers=auth).json()
        data_url = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + png}, headers=auth)
        plain = io.BytesIO()
        Image.new("RGB", (4, 4)).save(plain, format="PNG")
        bare = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(plain.getvalue()).decode()},
                           headers=auth).json()
        not_b64 = client.post("/sdapi/v1/png-info", json={"image": "%%%"}, headers=auth)
        not_image = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(b"hello").decode()},
                                headers=auth)
        flags = client.get("/sdapi/v1/cmd-flags", headers=auth).json()
        lists = {n: client.get(f"/sdapi/v1/{n}", headers=auth).json()
                 for n in ("upscalers", "embeddings", "sd-vae", "hypernetworks", "prompt-styles", "face-restorers",
                           "realesrgan-models", "latent-upscale-modes")}
    state.batcher.close()
    assert info["info"] == json_infotexts(r)[0] and info["parameters"]["Seed"] == "77"
    assert info["parameters"]["Prompt"] == "a (red:1.2) boat" and "parameters" not in info["items"]
    assert data_url.json() == info and bare == {"info": "", "items": {}, "parameters": {}}
    assert not_b64.status_code == not_image.status_code == 422 and "base64 PNG" in not_image.json()["detail"]
    assert flags["api_auth"] == "***" and flags["max_images"] == 16
    assert lists["upscalers"][0]["name"] == "None" and lists["embeddings"] == {"loaded": {}, "skipped": {}}
    assert all(lists[n] == [] for n in ("sd-vae", "hypernetworks", "prompt-styles", "face-restorers",
                                        "realesrgan-models"))
    assert {"name": "Latent (nearest-exact)"} in lists["latent-upscale-modes"]


def json_infotexts(response) -> list:
    import json
    return json.loads(response.json()["info"])["infotexts"]
