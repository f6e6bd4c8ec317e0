"""``sdrt.Batcher`` (formerly ``sdrt.Engine``): many concurrent requests, batched dynamically
over one Pipeline.

    batcher = sdrt.Batcher(pipe, max_batch_size=8, max_wait=0.02)
    future = batcher.submit(sdrt.Request("a cat", seed=1, width=64, height=64))
    image = future.result().images[0]

A ``Request`` is ``sdrt.GenerationParams`` for one image plus a timeout. The batcher runs the
pipeline's public stages (``validate``, ``encode``, ``sample``, ``result``).

Requests queue up. A batch takes the oldest request and every queued request that can share
its UNet calls: every argument that is not per-image (``Job.batch_key``: size, steps, sampler,
schedule, CLIP skip, noise source, ENSD, variation strength, eta, emphasis, ...) and the number
of 77-token text windows (all texts of a batch are padded to one window count, so mixing counts
would change the images). The per-image arguments (prompts, negative prompts, seeds, subseeds,
CFG scales) may differ. Each request gets the image it would get
alone: its own seed's noise, its own conditioning and scale (up to float32 rounding: a batch
changes how the BLAS kernels block their sums, about 1e-6 on pixels in [0, 1]).

A batch runs once ``max_batch_size`` requests share a key, or ``max_wait`` seconds after its
oldest request arrived and the runner is free (so a busy runner lets the next batch fill up).
Two threads overlap the stages: the batcher encodes the text of a full next batch while the
runner denoises and decodes the current one.

Failures stay with their request: bad arguments fail at ``submit`` (the future holds the
ValueError); a request whose image holds NaN/Inf fails alone; if a batch raises, each of its
requests is retried on its own. A full queue answers ``BatcherBusy``; a request past its
timeout gets ``TimeoutError``; ``future.cancel()`` works while queued and while running (a
running batch stops early when every request in it was cancelled or timed out).
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import itertools
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .conditioning import Conditioning
from .params import GenerationParams, Job
from .result import GenerationResult, nan_error

if TYPE_CHECKING:                  # for annotations only: the pipeline imports this module
    from .pipeline import Pipeline


class BatcherBusy(RuntimeError):
    """The request queue is full: try again later (HTTP 503)."""


class BatcherClosed(RuntimeError):
    """The batcher was closed before the request ran."""


class Interrupted(RuntimeError):
    """The request was stopped by ``Batcher.interrupt`` or ``Batcher.skip`` (the web UI's
    interrupt and skip buttons)."""


@dataclass
class Request(GenerationParams):
    """One image: the arguments of ``sdrt.GenerationParams`` (batch_size 1, one prompt) and a
    timeout in seconds from submission (None: the batcher's default)."""

    timeout: float | None = None


class RequestFuture(concurrent.futures.Future):
    """A Future whose ``cancel()`` also works while the request runs: the batcher then stops
    the work when it can and the future raises CancelledError."""

    def __init__(self):
        super().__init__()
        self.abandoned = False

    def cancel(self) -> bool:
        if super().cancel():
            return True
        if self.running():
            self.abandoned = True
            return True
        return False


class Histogram:
    """Counts of observations per bucket (Prometheus style: cumulative ``le`` buckets)."""

    def __init__(self, buckets):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for le, n in zip([*map(repr, self.buckets), "+Inf"], self.counts):
            total += n
            out.append((le, total))
        return out


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class _Item:
    request: Request
    job: Job                      # the pipeline's validated arguments for this one image
    key: tuple
    future: RequestFuture
    submitted: float
    deadline: float
    id: int = 0
    interrupted: str | None = None   # why Batcher.interrupt/skip stopped it

    def gone(self, now: float) -> bool:
        """Cancelled by its client, interrupted, or past its deadline: no longer worth computing."""
        return self.future.abandoned or self.interrupted is not None or now > self.deadline


class _Abort(Exception):
    """Every request of the running batch was cancelled or timed out."""


@dataclass
class _Batch:
    items: list
    job: Job | None = None
    cond: Conditioning | None = None
    error: BaseException | None = None
    t_formed: float = field(default_factory=time.perf_counter)


class Batcher:
    """Dynamic batching over a Pipeline. Thread safe; see the module docstring.

    Args:
        pipe: the Pipeline (any backend).
        max_batch_size: most images in one batch (capped by a compiled backend's profile).
        max_wait: seconds a partial batch waits for more requests after its oldest arrived.
        max_queue: most requests waiting; beyond it ``submit`` answers BatcherBusy.
        timeout: default per-request timeout in seconds (None: none).
        overlap: encode the next batch's text while the current one denoises.
        threads: torch intra-op threads for the batcher's two worker threads (None: torch's
            default). With libgomp, once the main thread has run a parallel region, other
            threads' parallel regions wake their workers slowly: a tiny model (microsecond
            ops) ran 3x slower in a worker thread at 2 threads than at 1 here; SD 1.5's
            UNet ran as fast in a worker thread as in the main thread (README, Serving).
    """

    def __init__(self, pipe: Pipeline, max_batch_size: int = 8, max_wait: float = 0.02,
                 max_queue: int = 256, timeout: float | None = None, overlap: bool = True,
                 threads: int | None = None):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if not (isinstance(max_wait, (int, float)) and 0 <= max_wait < math.inf):
            raise ValueError(f"max_wait must be a number of seconds >= 0, got {max_wait!r}")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be an integer >= 1 or None, got {threads!r}")
        self.pipe, self.threads = pipe, threads
        profile = getattr(pipe.backend, "profile", None)
        self.max_batch_size = min(max_batch_size, profile.batch[2]) if profile is not None else max_batch_size
        self.max_wait, self.max_queue, self.timeout = float(max_wait), max_queue, timeout
        self._queue: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._ready: queue.Queue = queue.Queue(maxsize=1 if overlap else 0)
        self._overlap = overlap
        self._runner_idle = True         # a partial batch forms only when the runner can take it
        self._closed = False
        self._ids = itertools.count(1)
        self._stats_lock = threading.Lock()
        self.metrics = dict(
            requests=collections.Counter(),          # by outcome: ok, failed, busy, invalid, timeout, cancelled
            batch_size=Histogram(range(1, 65)),
            latency={s: Histogram(LATENCY_BUCKETS)     # "unet": the old name of "loop" (deprecated)
                     for s in ("queue", "text_encoder", "loop", "unet", "vae", "total")},
            batches=0)
        self._progress = dict(step=0, steps=0, batch=0, started=None, job_no=0)
        self._running: list[_Item] = []          # the batch being sampled (interrupt, skip)
        self._live: list[_Item] = []             # taken from the queue, not finished
        self._threads = [threading.Thread(target=self._batch_loop, name="sdrt-batcher", daemon=True),
                         threading.Thread(target=self._reap_loop, name="sdrt-reaper", daemon=True)]
        if overlap:
            self._threads.append(threading.Thread(target=self._run_loop, name="sdrt-runner", daemon=True))
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ public API

    def submit(self, request: Request | None = None, /, **kwargs) -> RequestFuture:
        """Queue one image. Returns a Future of a GenerationResult holding that one image.

        Pass a Request or its fields as keywords. Never raises for a bad request: the future
        holds ValueError (bad arguments), BatcherBusy (queue full) or BatcherClosed.
        """
        fut = RequestFuture()
        try:
            if request is None:
                request = Request(**kwargs)
            elif kwargs:
                raise ValueError("pass a Request or keyword arguments, not both")
            if not isinstance(request, Request):
                raise ValueError(f"submit takes an sdrt.Request, got {type(request).__name__}")
            item = self._validate(request, fut)
        except (ValueError, TypeError) as e:
            self._count("invalid")
            fut.set_exception(e if isinstance(e, ValueError) else ValueError(str(e)))
            return fut
        with self._cond:
            if self._closed:
                fut.set_exception(BatcherClosed("the batcher is closed"))
                return fut
            if len(self._queue) >= self.max_queue:
                self._count("busy")
                fut.set_exception(BatcherBusy(f"the queue is full ({self.max_queue} requests waiting); "
                                             "retry later"))
                return fut
            self._queue.append(item)
            self._cond.notify_all()
        return fut

    async def submit_async(self, request: Request | None = None, /, **kwargs) -> GenerationResult:
        """``await batcher.submit_async(...)``: the result, or the request's exception. Cancelling
        the awaiting task cancels the request."""
        return await asyncio.wrap_future(self.submit(request, **kwargs))

    def generate(self, request: Request | None = None, /, **kwargs) -> GenerationResult:
        """Submit and wait."""
        return self.submit(request, **kwargs).result()

    def queue_length(self) -> int:
        with self._cond:
            return len(self._queue)

    def progress(self) -> dict:
        """What runs now: {step, steps, batch (images), started (perf_counter or None), queued}."""
        with self._stats_lock:
            p = dict(self._progress)
        p["queued"] = self.queue_length()
        return p

    def interrupt(self) -> int:
        """The web UI's interrupt: the running batch stops at its next step and every queued
        request is dropped; their futures raise ``Interrupted``. Returns how many requests."""
        with self._cond:
            queued = list(self._queue)
            self._queue.clear()
            formed = [it for it in self._live if it not in self._running]    # batches waiting to run
        for it in formed:
            it.interrupted = "interrupted"
        for it in queued:
            it.interrupted = "interrupted"
            if it.future.set_running_or_notify_cancel():
                self._count("cancelled")
                it.future.set_exception(Interrupted("interrupted before it ran"))
        return len(queued) + len(formed) + self.skip()

    def skip(self) -> int:
        """The web UI's skip: the running batch stops at its next step (its futures raise
        ``Interrupted``); the queue goes on. Returns how many requests were stopped."""
        with self._cond:
            running = list(self._running)
        for it in running:
            it.interrupted = "skipped"
        return len(running)

    def close(self, cancel_pending: bool = True, wait: bool = True) -> None:
        """Stop accepting requests; queued ones fail with BatcherClosed (or run, with
        ``cancel_pending=False``); wait for the threads to finish."""
        with self._cond:
            self._closed = True
            if cancel_pending:
                while self._queue:
                    item = self._queue.popleft()
                    if item.future.set_running_or_notify_cancel():
                        item.future.set_exception(BatcherClosed("the batcher was closed before this request ran"))
            self._cond.notify_all()
        if wait:
            for t in self._threads:
                t.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ batching

    def _validate(self, request: Request, fut: RequestFuture) -> _Item:
        if not isinstance(request.prompt, str) or not isinstance(request.negative_prompt, str):
            raise ValueError("a Request's prompt and negative_prompt must be strings (one image per request)")
        if request.batch_size != 1:
            raise ValueError(f"a Request is one image: batch_size must be 1, got {request.batch_size!r} "
                             "(submit one request per image)")
        job = self.pipe.validate(request)
        timeout = request.timeout if request.timeout is not None else self.timeout
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        key = (*job.batch_key(), self.pipe.windows(job))
        now = time.perf_counter()
        return _Item(request, job, key, fut, now, now + timeout if timeout else math.inf, next(self._ids))

    def _take_batch(self) -> list[_Item] | None:
        """Wait for the next batch (None once closed and drained)."""
        with self._cond:
            while True:                   # expired requests: the reaper thread removes them
                if not self._queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                oldest = self._queue[0]
                same = [it for it in self._queue if it.key == oldest.key]
                due = oldest.submitted + self.max_wait
                now = time.perf_counter()
                # a full batch goes at once (its text encodes while the runner works); a partial
                # one waits max_wait and for the runner to be free, gathering what arrives meanwhile
                if len(same) >= self.max_batch_size or self._closed or (now >= due and self._runner_idle):
                    batch = same[:self.max_batch_size]
                    taken = {id(it) for it in batch}
                    self._queue = collections.deque(it for it in self._queue if id(it) not in taken)
                    return batch
                # woken by a submission, the runner going idle or the reaper
                self._cond.wait(timeout=due - now if now < due else None)

    def _sweep_expired(self) -> None:
        now = time.perf_counter()
        if not any(it.deadline <= now for it in self._queue):
            return
        keep = collections.deque()
        for it in self._queue:
            if it.deadline <= now:
                if it.future.set_running_or_notify_cancel():
                    self._count("timeout")
                    it.future.set_exception(TimeoutError(
                        f"request timed out after {now - it.submitted:.3f} s in the queue"))
            else:
                keep.append(it)
        self._queue = keep

    def _reap_loop(self) -> None:
        """Fails queued requests at their deadline, even while both stage threads are busy."""
        with self._cond:
            while not (self._closed and not self._queue):
                self._sweep_expired()
                deadlines = [it.deadline for it in self._queue if it.deadline < math.inf]
                wait = min(deadlines) - time.perf_counter() if deadlines else None
                self._cond.wait(timeout=None if wait is None else max(wait, 0.001))

    def _start(self, items: list[_Item]) -> list[_Item]:
        """Mark requests running; drop those cancelled while queued."""
        live = []
        for it in items:
            if it.future.set_running_or_notify_cancel():
                live.append(it)
            else:
                self._count("cancelled")
        return live

    def _encode(self, items: list[_Item]) -> _Batch:
        batch = _Batch(items)
        try:
            batch.job = Job.merge([it.job for it in items])
            batch.cond = self.pipe.encode(batch.job)
        except Exception as e:  # noqa: BLE001 - retried per request by the runner
            batch.error = e
        return batch

    def _set_threads(self) -> None:
        if self.threads is not None:
            import torch
            torch.set_num_threads(self.threads)       # per calling thread under OpenMP

    def _batch_loop(self) -> None:
        self._set_threads()
        while True:
            items = self._take_batch()
            if items is None:
                break
            items = self._start(items)
            if not items:
                continue
            with self._cond:
                self._live.extend(items)
            batch = self._encode(items)
            if self._overlap:
                self._ready.put(batch)
            else:
                self._run_safely(batch)
        if self._overlap:
            self._ready.put(None)

    def _run_loop(self) -> None:
        self._set_threads()
        while True:
            if self._ready.empty():
                self._set_runner_idle(True)
            batch = self._ready.get()
            self._set_runner_idle(False)
            if batch is None:
                break
            self._run_safely(batch)

    def _run_safely(self, batch: _Batch) -> None:
        """Run a batch; an unexpected error fails its unfinished requests, never the thread."""
        try:
            self._run(batch)
        except Exception as e:  # noqa: BLE001 - a worker thread that dies would hang every later request
            for it in batch.items:
                if not it.future.done():
                    self._fail(it, e)

    def _set_runner_idle(self, idle: bool) -> None:
        with self._cond:
            self._runner_idle = idle
            if idle:
                self._cond.notify_all()

    # ------------------------------------------------------------------ running

    def _run(self, batch: _Batch) -> None:
        now = time.perf_counter()
        if any(it.gone(now) for it in batch.items):
            self._drop([it for it in batch.items if it.gone(now)], "before it ran")
            live = [it for it in batch.items if not it.gone(now)]
            if not live:
                return
            batch = self._encode(live)           # re-plan without the dropped requests
        items = batch.items
        with self._cond:
            self._running = list(items)
        try:
            if batch.error is not None:
                raise batch.error
            out = self.pipe.sample(batch.job, batch.cond, self._callback(items))
            result = self.pipe.result(batch.job, batch.cond, out)
        except _Abort:
            self._drop(items, "while running")
            return
        except Exception as e:  # noqa: BLE001 - one request's failure must not fail the others
            if len(items) == 1:
                self._fail(items[0], e)
            else:
                for it in items:                       # find the request that fails, run the rest
                    self._run(self._encode([it]))
            return
        finally:
            with self._cond:
                self._running = []
                done = {id(it) for it in batch.items}
                self._live = [it for it in self._live if id(it) not in done]
            with self._stats_lock:
                self._progress.update(step=0, steps=0, batch=0, started=None)
        with self._stats_lock:
            self.metrics["batches"] += 1
            self.metrics["batch_size"].observe(len(items))
        for i, it in enumerate(items):
            if it.gone(time.perf_counter()):
                self._drop([it], "while running")
            elif not out.finite[i]:
                self._fail(it, nan_error([0], self.pipe.backend.dtype))     # image 0 of its request
            else:
                # queue: submission until its batch formed; total: submission until now
                timings = dict(result.timings, queue=max(0.0, batch.t_formed - it.submitted),
                               total=time.perf_counter() - it.submitted, batch_size=len(items))
                one = result.select(i, **timings)
                with self._stats_lock:
                    for stage, hist in self.metrics["latency"].items():
                        hist.observe(timings[stage])
                self._count("ok")
                it.future.set_result(one)

    def _callback(self, items: list[_Item]):
        with self._stats_lock:
            self._progress.update(step=0, steps=items[0].job.steps, batch=len(items),
                                  started=time.perf_counter())
            self._progress["job_no"] += 1

        def callback(step: int, total: int) -> None:
            with self._stats_lock:
                self._progress.update(step=step, steps=total)
            now = time.perf_counter()
            if all(it.gone(now) for it in items):
                raise _Abort()
        return callback

    def _drop(self, items: list[_Item], when: str) -> None:
        """Finish requests that are gone: cancelled ones, or timed out ``when``."""
        with self._cond:
            gone = {id(it) for it in items}
            self._live = [it for it in self._live if id(it) not in gone]
        for it in items:
            if it.future.abandoned:
                self._cancelled(it)
            elif it.interrupted is not None:
                self._count("cancelled")
                it.future.set_exception(Interrupted(f"{it.interrupted} {when}"))
            else:
                self._fail(it, TimeoutError(f"request timed out {when}"), outcome="timeout")

    def _cancelled(self, it: _Item) -> None:
        self._count("cancelled")
        it.future.set_exception(concurrent.futures.CancelledError("the request was cancelled while running"))

    def _fail(self, it: _Item, error: BaseException, outcome: str = "failed") -> None:
        self._count(outcome)
        it.future.set_exception(error)

    def _count(self, outcome: str) -> None:
        with self._stats_lock:
            self.metrics["requests"][outcome] += 1



# the names of the first release (deprecated; removed in the next)
Engine, EngineBusy, EngineClosed = Batcher, BatcherBusy, BatcherClosed
