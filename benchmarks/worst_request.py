"""The memory of the worst text a default `sdrt serve` accepts: distinct texts x 77-token windows
just under its `max_text_windows`, encoded on random:sd15 (the text encoder's activations and the
conditioning the loop keeps), beside the server's limit:

    python benchmarks/worst_request.py

Writes benchmarks/results/worst-request-<date>.json with the machine it ran on.
"""
from __future__ import annotations

import time

import sdrt
from sdrt.bench import write_result
from sdrt.bench.record import PeakRSS, _rss_mb
from sdrt.conditioning import ENCODE_WINDOWS
from sdrt.denoiser import plan_contexts
from sdrt.serving.config import ServerConfig


def main() -> None:
    cfg = ServerConfig()
    pipe = sdrt.Pipeline.from_pretrained("random:sd15")
    # prompt editing gives several distinct texts; long ones fill many windows each
    words = ", ".join(f"word{i}" for i in range(700))
    prompt = f"[{words} red:{words} blue:0.25] [x:y:0.5] [p:q:0.75]"
    job = pipe.validate(sdrt.GenerationParams(prompt, steps=20, width=256, height=256, sampler="Euler"))
    cost = pipe.cost(job)
    assert cost.text_windows <= cfg.max_text_windows, cost
    base = _rss_mb()
    t = time.perf_counter()
    with PeakRSS() as mem:
        cond = pipe.encode(job)
        distinct, _ = plan_contexts(cond.conds, cond.uncond, job.steps, pipe.backend.device, pipe.backend.dtype)
    record = {"model": "random:sd15", "prompt_chars": len(prompt), "distinct_texts": cost.texts,
              "windows_per_text": cost.windows, "text_windows": cost.text_windows,
              "max_text_windows": cfg.max_text_windows, "encode_windows_per_call": ENCODE_WINDOWS,
              "rss_before_mb": base, "peak_increase_mb": mem.peak - base,
              "contexts_mb": sum(c.numel() * c.element_size() for c in distinct) / 2 ** 20,
              "encode_seconds": time.perf_counter() - t}
    print(record)
    write_result("worst-request", record)


if __name__ == "__main__":
    main()
