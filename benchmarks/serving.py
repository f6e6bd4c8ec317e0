"""Serving benchmark: sdrt.Batcher's dynamic batching against one request at a time, for 32
concurrent clients on random:tiny, side by side in one run (images per second, p50/p99 latency),
then an open loop (requests arriving at random at a fixed rate) for latency under moderate load.

    python benchmarks/serving.py [--clients 32] [--per-client 2] [--rounds 2]

Writes benchmarks/results/serving-<date>.json with the machine it ran on.
"""
from __future__ import annotations

import argparse

import sdrt
from sdrt.bench import format_serving, run_serving, write_result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--open-rate", type=float, default=10.0,
                    help="also an open loop: requests/s arriving at random (0: none)")
    ap.add_argument("--open-requests", type=int, default=48)
    args = ap.parse_args()
    pipe = sdrt.Pipeline.from_pretrained(args.model)
    record = run_serving(pipe, clients=args.clients, per_client=args.per_client, rounds=args.rounds,
                         request=dict(steps=args.steps, width=args.size, height=args.size, sampler="Euler a"),
                         open_rate=args.open_rate or None, open_requests=args.open_requests)
    print(format_serving(record))
    record["model"] = args.model
    write_result("serving", record)


if __name__ == "__main__":
    main()
