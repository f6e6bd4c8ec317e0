"""sdrt.Engine: dynamic batching gives each request the image it gets alone; failures,
cancellation, timeouts and back-pressure stay with their request."""
import asyncio
import concurrent.futures
import threading
import time

import numpy as np
import pytest

import sdrt
from sdrt.engine import Engine, EngineBusy, EngineClosed, Request

SMALL = dict(steps=4, width=64, height=64)
# batched vs alone: the same arithmetic except BLAS blocking over a larger batch
PIXEL_TOL = 1e-4


def solo(pipe, r: Request):
    return pipe(r.prompt, negative_prompt=r.negative_prompt, steps=r.steps, cfg_scale=r.cfg_scale,
                sampler=r.sampler, schedule=r.schedule, seed=r.seed, width=r.width, height=r.height,
                clip_skip=r.clip_skip, subseed=r.subseed, subseed_strength=r.subseed_strength,
                eta_noise_seed_delta=r.eta_noise_seed_delta)


def fresh(tiny):
    """A Pipeline over the session's tiny model whose methods tests may patch."""
    return sdrt.Pipeline(tiny.components, tiny.backend)


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DPM++ 2M SDE", "Heun"])
def test_batched_requests_equal_their_solo_images(tiny, sampler):
    requests = [
        Request("a red fox in the snow", seed=11, cfg_scale=7.0, sampler=sampler, **SMALL),
        Request("(a lighthouse:1.3), night", negative_prompt="blurry", seed=12, cfg_scale=3.5,
                sampler=sampler, **SMALL),
        Request("[a cat:a dog:0.5] on a sofa", negative_prompt="ugly, lowres", seed=4000000000,
                cfg_scale=11.0, sampler=sampler, **SMALL),
        Request("a cat AND a hat:0.6", seed=13, cfg_scale=6.0, sampler=sampler, subseed=99,
                subseed_strength=0.3, **SMALL),
    ]
    with Engine(tiny, max_batch_size=8, max_wait=0.5) as engine:
        futures = [engine.submit(r) for r in requests]
        results = [f.result(timeout=120) for f in futures]
    # the variation request has another batch key (subseed strength); the other three share one
    assert [r.timings["batch_size"] for r in results] == [3, 3, 3, 1]
    for r, got in zip(requests, results):
        want = solo(tiny, r)
        assert got.seeds == want.seeds
        assert got.infotexts == want.infotexts
        assert np.abs(got.pixels - want.pixels).max() < PIXEL_TOL
        diff = np.abs(np.asarray(got.images[0], dtype=int) - np.asarray(want.images[0], dtype=int))
        assert diff.max() <= 1        # truncation to uint8 may flip on a 1e-6 difference


def test_requests_that_cannot_share_a_batch_run_apart(tiny):
    long_prompt = ", ".join(f"word{i}" for i in range(60))          # > 75 tokens: two windows
    requests = [Request("short one", seed=1, **SMALL), Request(long_prompt, seed=2, **SMALL),
                Request("short two", seed=3, **SMALL), Request("other size", seed=4, steps=4, width=32, height=64),
                Request("other steps", seed=5, steps=3, width=64, height=64)]
    with Engine(tiny, max_batch_size=8, max_wait=0.5) as engine:
        results = [f.result(timeout=120) for f in [engine.submit(r) for r in requests]]
    assert [r.timings["batch_size"] for r in results] == [2, 1, 2, 1, 1]
    for r, got in zip(requests, results):
        assert np.abs(got.pixels - solo(tiny, r).pixels).max() < PIXEL_TOL
    assert results[3].images[0].size == (32, 64)


def test_random_seed_is_resolved_and_reported(tiny):
    with Engine(tiny) as engine:
        got = engine.submit(prompt="a boat", seed=-1, **SMALL).result(timeout=60)
    seed = got.seeds[0]
    assert 0 <= seed < 2 ** 32 and f"Seed: {seed}," in got.infotexts[0]
    assert np.abs(got.pixels - solo(tiny, Request("a boat", seed=seed, **SMALL)).pixels).max() < PIXEL_TOL


def test_bad_requests_fail_alone_at_submit(tiny):
    with Engine(tiny, max_wait=0.2) as engine:
        good = engine.submit(Request("fine", seed=1, **SMALL))
        bad = [engine.submit(Request("x", steps=0)), engine.submit(Request("x", sampler="Nope", **SMALL)),
               engine.submit(Request("x", width=63, height=64, steps=4)),
               engine.submit(Request(["a", "b"], **SMALL)), engine.submit("not a request"),
               engine.submit(prompt="x", bogus=1), engine.submit(Request("x", timeout=-1, **SMALL))]
        for f in bad:
            assert f.done() and isinstance(f.exception(), ValueError)
        assert "steps must be in 1..10000" in str(bad[0].exception())
        assert "sampler 'Nope' is unknown" in str(bad[1].exception())
        assert good.result(timeout=60).images[0].size == (64, 64)
        assert engine.metrics["requests"]["invalid"] == len(bad)


def test_nan_image_fails_only_its_request(tiny):
    ok = Request("a quiet harbour", seed=21, **SMALL)
    with Engine(tiny, max_batch_size=4, max_wait=0.5) as engine:
        f_ok = engine.submit(ok)
        f_nan = engine.submit(Request("a quiet harbour", seed=22, cfg_scale=1e38, **SMALL))  # overflows to inf
        got = f_ok.result(timeout=60)
        with pytest.raises(FloatingPointError, match="NaN or Inf"):
            f_nan.result(timeout=60)
    assert got.timings["batch_size"] == 2
    assert np.abs(got.pixels - solo(tiny, ok).pixels).max() < PIXEL_TOL


def test_a_batch_that_raises_is_retried_request_by_request(tiny):
    pipe = fresh(tiny)
    real = pipe.encode

    def encode(job):
        if any("boom" in p for p in job.prompts):
            raise RuntimeError("the text encoder failed on boom")
        return real(job)
    pipe.encode = encode
    with Engine(pipe, max_batch_size=4, max_wait=0.5) as engine:
        futures = [engine.submit(Request(p, seed=i, **SMALL)) for i, p in enumerate(["one", "boom", "three"])]
        with pytest.raises(RuntimeError, match="boom"):
            futures[1].result(timeout=60)
        for f in (futures[0], futures[2]):
            assert f.result(timeout=60).timings["batch_size"] == 1


class Gate:
    """Holds the runner inside a batch until opened; records the steps each batch ran."""

    def __init__(self, pipe):
        self.open, self.entered, self.steps = threading.Event(), threading.Event(), []
        real = pipe.sample

        def sample(job, cond, callback=None):
            self.entered.set()
            assert self.open.wait(30)
            seen = []

            def cb(step, total):
                seen.append(step)
                callback(step, total)
            try:
                return real(job, cond, cb)
            finally:
                self.steps.append(seen)
        pipe.sample = sample


def test_full_queue_answers_busy_and_recovers(tiny):
    pipe = fresh(tiny)
    gate = Gate(pipe)
    with Engine(pipe, max_batch_size=1, max_wait=0.0, max_queue=2, overlap=False) as engine:
        first = engine.submit(Request("a", seed=1, **SMALL))
        assert gate.entered.wait(30)                        # running, out of the queue
        queued = [engine.submit(Request("b", seed=2, **SMALL)), engine.submit(Request("c", seed=3, **SMALL))]
        busy = engine.submit(Request("d", seed=4, **SMALL))
        assert isinstance(busy.exception(timeout=5), EngineBusy)
        assert "queue is full" in str(busy.exception())
        gate.open.set()
        for f in [first, *queued]:
            assert f.result(timeout=60).images
        assert engine.submit(Request("e", seed=5, **SMALL)).result(timeout=60).images   # accepts again
        assert engine.metrics["requests"]["busy"] == 1


def test_cancel_while_queued_and_while_running(tiny):
    pipe = fresh(tiny)
    gate = Gate(pipe)
    with Engine(pipe, max_batch_size=1, max_wait=0.0, overlap=False) as engine:
        running = engine.submit(Request("a", seed=1, steps=20, width=64, height=64))
        assert gate.entered.wait(30)
        queued = engine.submit(Request("b", seed=2, **SMALL))
        assert queued.cancel() and queued.cancelled()
        assert running.cancel()                               # running: stops at the next step
        gate.open.set()
        with pytest.raises(concurrent.futures.CancelledError):
            running.result(timeout=60)
        after = engine.submit(Request("c", seed=3, **SMALL)).result(timeout=60)
    assert after.images and gate.steps[0] == [1]            # the cancelled batch stopped after one step
    assert engine.metrics["requests"]["cancelled"] == 2


def test_timeouts_in_queue_and_while_running(tiny):
    pipe = fresh(tiny)
    gate = Gate(pipe)
    with Engine(pipe, max_batch_size=1, max_wait=0.0, overlap=False) as engine:
        running = engine.submit(Request("a", seed=1, timeout=0.5, **SMALL))
        assert gate.entered.wait(30)
        queued = engine.submit(Request("b", seed=2, timeout=0.2, **SMALL))
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError, match="in the queue"):
            queued.result(timeout=30)          # failed at its deadline while the runner is blocked
        assert time.perf_counter() - t0 < 5
        time.sleep(0.5)
        gate.open.set()
        with pytest.raises(TimeoutError, match="while running"):
            running.result(timeout=60)
        assert engine.submit(Request("c", seed=3, **SMALL)).result(timeout=60).images


def test_async_submit_and_pipeline_submit(tiny):
    pipe = fresh(tiny)
    with Engine(pipe, max_batch_size=4, max_wait=0.2) as engine:
        async def main():
            return await asyncio.gather(*[engine.submit_async(Request(f"p{i}", seed=i, **SMALL)) for i in range(3)])
        results = asyncio.run(main())
    assert [r.seeds for r in results] == [[0], [1], [2]]
    assert {r.timings["batch_size"] for r in results} == {3}
    got = pipe.submit(Request("p1", seed=1, **SMALL)).result(timeout=60)
    assert np.abs(got.pixels - results[1].pixels).max() < PIXEL_TOL
    pipe.close()


def test_close_fails_pending_and_refuses_new(tiny):
    pipe = fresh(tiny)
    gate = Gate(pipe)
    engine = Engine(pipe, max_batch_size=1, max_wait=0.0, overlap=False)
    running = engine.submit(Request("a", seed=1, **SMALL))
    assert gate.entered.wait(30)
    pending = engine.submit(Request("b", seed=2, **SMALL))
    closer = threading.Thread(target=engine.close)
    closer.start()
    with pytest.raises(EngineClosed):
        pending.result(timeout=30)
    gate.open.set()
    closer.join(30)
    assert running.result(timeout=30).images                 # what already ran completes
    assert isinstance(engine.submit(Request("c", **SMALL)).exception(), EngineClosed)


def test_engine_arguments_are_checked(tiny):
    for kwargs in (dict(max_batch_size=0), dict(max_wait=-1), dict(max_queue=0)):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            Engine(tiny, **kwargs)


def test_pipeline_seed_rules_follow_the_web_ui(tiny):
    # image i gets seed + i; with a variation every image keeps the seed and subseeds count up
    plain = tiny("a", seed=10, subseed=50, batch_size=2, **SMALL)
    varied = tiny("a", seed=10, subseed=50, subseed_strength=0.5, batch_size=2, **SMALL)
    assert plain.seeds == [10, 11] and varied.seeds == [10, 10]
    assert "Variation seed: 51," in varied.infotexts[1]
    listed = tiny(["a", "b"], seed=[7, 3], cfg_scale=[2.0, 9.0], **SMALL)
    assert listed.seeds == [7, 3] and "CFG scale: 9.0," in listed.infotexts[1]
    alone = tiny("b", seed=3, cfg_scale=9.0, **SMALL)
    assert np.abs(listed.pixels[1] - alone.pixels[0]).max() < PIXEL_TOL
    with pytest.raises(ValueError, match="list of 2"):
        tiny(["a", "b"], seed=[1], **SMALL)
    with pytest.raises(ValueError, match="cfg_scale"):
        tiny(["a", "b"], cfg_scale=[1.0, float("nan")], **SMALL)
