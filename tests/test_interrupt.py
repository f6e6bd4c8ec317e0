"""The web UI's interrupt and skip: Batcher.interrupt stops the running batch at its next step and
drops everything queued or formed; Batcher.skip stops only the running batch; over HTTP an
interrupted request answers 200 with the images that were finished, as the web UI does."""
from __future__ import annotations

import json
import threading
import time

import pytest

import sdrt

SMALL = dict(steps=30, width=64, height=64)


def _slow_pipe(tiny, started: threading.Event, release: threading.Event):
    """A pipeline whose steps wait on ``release`` once the first step of a batch ran."""
    pipe = sdrt.Pipeline(tiny.components, tiny.backend)
    real = pipe.sample

    def sample(job, cond, callback=None):
        def cb(step, total):
            started.set()
            release.wait(0.05)
            if callback:
                callback(step, total)
        return real(job, cond, cb)
    pipe.sample = sample
    return pipe


def test_skip_stops_the_running_batch_and_the_queue_goes_on(tiny):
    started, release = threading.Event(), threading.Event()
    with sdrt.Batcher(_slow_pipe(tiny, started, release), max_batch_size=1, max_wait=0.0) as b:
        first = b.submit(sdrt.Request("one", seed=1, **SMALL))
        second = b.submit(sdrt.Request("two", seed=2, steps=2, width=64, height=64))
        assert started.wait(30)
        assert b.skip() == 1
        with pytest.raises(sdrt.Interrupted, match="skipped"):
            first.result(timeout=60)
        release.set()
        assert second.result(timeout=60).images                 # the queue went on


def test_interrupt_stops_everything(tiny):
    started, release = threading.Event(), threading.Event()
    with sdrt.Batcher(_slow_pipe(tiny, started, release), max_batch_size=1, max_wait=0.0) as b:
        futures = [b.submit(sdrt.Request(f"p{i}", seed=i, **SMALL)) for i in range(4)]
        assert started.wait(30)
        assert b.interrupt() >= 3
        for f in futures:
            with pytest.raises(sdrt.Interrupted):
                f.result(timeout=60)
        assert b.metrics["requests"]["cancelled"] == 4
        later = b.submit(sdrt.Request("later", seed=9, steps=2, width=64, height=64))
        release.set()
        assert later.result(timeout=60).images                  # the batcher still works


def test_interrupt_over_http_answers_with_what_was_finished(tiny):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sdrt.server import ServerConfig, ServerState, create_app
    started, release = threading.Event(), threading.Event()
    pipe = _slow_pipe(tiny, started, release)
    state = ServerState(ServerConfig(max_batch_size=1, max_wait=0.0, max_images=4), pipe=pipe)
    with TestClient(create_app(state=state)) as client:
        out = {}

        def call():
            out["r"] = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 5, "batch_size": 3, **SMALL})
        t = threading.Thread(target=call)
        t.start()
        assert started.wait(30)
        time.sleep(0.2)
        assert client.post("/sdapi/v1/interrupt").status_code == 200
        t.join(60)
        r = out["r"]
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert len(r.json()["images"]) == len(info["all_seeds"]) < 3
        assert client.post("/sdapi/v1/skip").status_code == 200          # nothing running: a no-op
        release.set()
        assert client.post("/sdapi/v1/txt2img", json={"prompt": "y", "seed": 1, "steps": 2, "width": 64,
                                                      "height": 64}).status_code == 200
    state.engine.close()
