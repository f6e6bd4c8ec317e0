"""A load generator for ``sdrt.Batcher``: closed-loop clients and an open-loop arrival rate,
per batching mode, side by side (``benchmarks/serving.py`` runs it)."""
from __future__ import annotations

import logging
import math
import statistics
import threading
import time

import numpy as np

from .record import latency_summary

logger = logging.getLogger("sdrt.bench")


def _closed_loop(engine, clients: int, per_client: int, request: dict) -> tuple[list[float], float]:
    """``clients`` threads, each sending ``per_client`` requests back to back (a new one as soon
    as its previous image arrives). Returns (latencies, wall seconds)."""
    from ..batcher import Request
    latencies, errors = [], []
    lock = threading.Lock()

    def client(c):
        for k in range(per_client):
            t0 = time.perf_counter()
            try:
                engine.submit(Request(prompt=f"client {c} request {k}", seed=1000 * c + k, **request)).result()
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed in the serving benchmark: {errors[:3]}")
    return latencies, time.perf_counter() - t0


def _open_loop(engine, rate: float, n: int, request: dict, seed: int = 0) -> tuple[list[float], float]:
    """``n`` requests arriving at random (Poisson, ``rate`` per second) whatever the server
    does. Returns (latencies, wall seconds until the last image)."""
    from ..batcher import Request
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    latencies, done = [], threading.Event()
    lock = threading.Lock()
    t0 = time.perf_counter()
    due = t0
    for k in range(n):
        due += gaps[k]
        time.sleep(max(0.0, due - time.perf_counter()))
        sent = time.perf_counter()

        def finished(f, sent=sent):
            with lock:
                latencies.append(time.perf_counter() - sent if f.exception() is None else math.inf)
                if len(latencies) == n:
                    done.set()
        engine.submit(Request(prompt=f"arrival {k}", seed=k, **request)).add_done_callback(finished)
    done.wait()
    if not all(math.isfinite(v) for v in latencies):
        raise RuntimeError("requests failed in the open-loop serving benchmark")
    return latencies, time.perf_counter() - t0


def run_serving(pipe, clients: int = 32, per_client: int = 2, rounds: int = 2,
                modes: dict | None = None, request: dict | None = None, log=None,
                open_rate: float | None = None, open_requests: int = 64) -> dict:
    """Throughput and latency of ``sdrt.Batcher`` under ``clients`` concurrent closed-loop clients,
    per batching mode, side by side (modes interleaved within each round), plus the latency of
    one request alone (called directly, and through an engine).

    modes: name -> (max_batch_size, max_wait seconds, engine threads or None). Each mode is
    compared with the one-at-a-time mode (max_batch_size 1) that uses the same threads."""
    log = log or logger.info
    from ..batcher import Batcher as Engine
    modes = modes or {"one-at-a-time": (1, 0.0, None), f"dynamic-{clients}": (clients, 0.01, None),
                      "one-at-a-time/1t": (1, 0.0, 1), f"dynamic-{clients}/1t": (clients, 0.01, 1)}
    request = request or dict(steps=20, width=64, height=64, sampler="Euler a")
    data = {name: {"latencies": [], "throughput": [], "batch_sizes": [], "open": []} for name in modes}
    single = {"direct": []}
    for r in range(rounds):
        pipe(prompt="warm up", seed=0, **request)
        for k in range(3):
            t0 = time.perf_counter()
            pipe(prompt=f"alone {k}", seed=k, **request)
            single["direct"].append(time.perf_counter() - t0)
        for name, (batch, wait, threads) in modes.items():
            with Engine(pipe, max_batch_size=batch, max_wait=wait, max_queue=clients * per_client + 1,
                        threads=threads) as engine:
                engine.generate(prompt="warm up", seed=0, **request)
                for k in range(3):
                    t0 = time.perf_counter()
                    engine.generate(prompt=f"alone {k}", seed=k, **request)
                    single.setdefault(f"engine threads={threads}", []).append(time.perf_counter() - t0)
                before = engine.metrics["batch_size"].count, engine.metrics["batch_size"].sum
                lat, wall = _closed_loop(engine, clients, per_client, request)
                hist = engine.metrics["batch_size"]
                after = hist.count, hist.sum
                if open_rate:
                    open_lat, _ = _open_loop(engine, open_rate, open_requests, request, seed=r)
                    data[name]["open"] += open_lat
            d = data[name]
            d["latencies"] += lat
            d["throughput"].append(len(lat) / wall)
            d["batch_sizes"].append((after[1] - before[1]) / max(after[0] - before[0], 1))
            log(f"round {r + 1} {name:18s} {len(lat) / wall:7.2f} images/s  p50 {np.percentile(lat, 50):.3f} s  "
                f"p99 {np.percentile(lat, 99):.3f} s  mean batch {d['batch_sizes'][-1]:.1f}")
    single_s = {k: statistics.median(v) for k, v in single.items()}
    out = {"clients": clients, "requests_per_client": per_client, "rounds": rounds, "request": request,
           "single_request_latency_s": single_s, "modes": {}}
    for name, d in data.items():
        batch, wait, threads = modes[name]
        out["modes"][name] = {"max_batch_size": batch, "max_wait_s": wait, "threads": threads,
                              "images_per_s": statistics.median(d["throughput"]),
                              "images_per_s_runs": d["throughput"], "mean_batch_size": statistics.mean(d["batch_sizes"]),
                              "latency_s": latency_summary(d["latencies"])}
        if d["open"]:
            out["modes"][name]["open_loop"] = {"rate_per_s": open_rate, "requests": len(d["open"]),
                                               "latency_s": latency_summary(d["open"])}
    for m in out["modes"].values():
        m["p99_over_single_request"] = m["latency_s"]["p99"] / single_s["direct"]
        if "open_loop" in m:
            m["open_loop"]["p99_over_single_request"] = m["open_loop"]["latency_s"]["p99"] / single_s["direct"]
        base = next((b for b in out["modes"].values() if b["max_batch_size"] == 1 and b["threads"] == m["threads"]),
                    None)
        if base is not None:
            m["throughput_vs_one_at_a_time"] = m["images_per_s"] / base["images_per_s"]
            m["p99_vs_one_at_a_time"] = m["latency_s"]["p99"] / base["latency_s"]["p99"]
    return out


def format_serving(record: dict) -> str:
    alone = ", ".join(f"{k} {v:.3f} s" for k, v in record["single_request_latency_s"].items())
    lines = [f"{record['clients']} closed-loop clients x {record['requests_per_client']} requests, "
             f"{record['rounds']} rounds; one request alone: {alone}",
             f"{'mode':18s} {'images/s':>9s} {'x one-at-a-time':>16s} {'p50 s':>7s} {'p99 s':>7s} "
             f"{'p99/alone':>9s} {'mean batch':>10s}"]
    for name, m in record["modes"].items():
        lines.append(f"{name:18s} {m['images_per_s']:9.2f} {m.get('throughput_vs_one_at_a_time', float('nan')):16.2f} "
                     f"{m['latency_s']['p50']:7.3f} {m['latency_s']['p99']:7.3f} {m['p99_over_single_request']:9.2f} "
                     f"{m['mean_batch_size']:10.1f}")
    opened = [(n, m["open_loop"]) for n, m in record["modes"].items() if "open_loop" in m]
    if opened:
        lines.append(f"open loop: {opened[0][1]['rate_per_s']:g} requests/s arriving at random")
        for name, o in opened:
            lines.append(f"{name:18s} p50 {o['latency_s']['p50']:7.3f} s  p99 {o['latency_s']['p99']:7.3f} s  "
                         f"p99/alone {o['p99_over_single_request']:6.2f}")
    return "\n".join(lines)
