"""Runtime-core benchmark: the loop's own overhead per step, and the torch backend against
diffusers' StableDiffusionPipeline on the same weights, measured side by side in one run.

    python benchmarks/core.py overhead          # random:tiny, seconds
    python benchmarks/core.py vs-diffusers      # random:sd15 at 256x256, 20 steps (minutes on a CPU)

Writes benchmarks/results/core-<what>-<date>.json with the machine it ran on.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import sdrt

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def overhead(steps=20, repeat=5) -> dict:
    """Per-step time of everything but the UNet: sampler math, CFG, input scaling, bookkeeping."""
    pipe = sdrt.Pipeline.from_pretrained("random:tiny")
    be = pipe.backend
    unet = be.unet
    spent = []

    def timed_unet(*a):
        t0 = time.perf_counter()
        out = unet(*a)
        spent.append(time.perf_counter() - t0)
        return out

    be.unet = timed_unet
    rows = {}
    for sampler in ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "Heun", "UniPC", "DDIM"]:
        pipe("warm up", sampler=sampler, steps=2, width=64, height=64, seed=1)
        per_step = []
        for r in range(repeat):
            spent.clear()
            res = pipe("a photo of a cat", sampler=sampler, steps=steps, width=64, height=64, seed=r)
            per_step.append((res.timings["unet"] - sum(spent)) / steps)
        rows[sampler] = {"overhead_ms_per_step_median": 1e3 * statistics.median(per_step),
                         "overhead_ms_per_step_min": 1e3 * min(per_step),
                         "unet_calls_per_run": len(spent)}
        print(f"{sampler:14s} loop overhead {rows[sampler]['overhead_ms_per_step_median']:.3f} ms/step "
              f"(min {rows[sampler]['overhead_ms_per_step_min']:.3f})")
    be.unet = unet
    return {"model": "random:tiny", "size": "64x64", "steps": steps, "repeat": repeat, "samplers": rows}


def vs_diffusers(steps=20, size=256, repeat=1, model="random:sd15") -> dict:
    """Same weights, noise, prompt and algorithm (Euler, Karras sigmas), alternating runs."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = sdrt.Pipeline.from_pretrained(model)
    c = pipe.components
    ref = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                  scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                                   beta_schedule="scaled_linear",
                                                                   use_karras_sigmas=True,
                                                                   timestep_spacing="linspace"),
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    prompt, seed, f = "a photo of an astronaut riding a horse on mars", 1, c.latent_factor

    def run_sdrt(n):
        t0 = time.perf_counter()
        r = pipe(prompt, steps=n, sampler="Euler", schedule="Karras", seed=seed, width=size, height=size,
                 rng="cpu", cfg_scale=7.0)
        return time.perf_counter() - t0, r.pixels, r.timings

    def run_diffusers(n):
        noise = torch.randn((1, 4, size // f, size // f), generator=torch.Generator().manual_seed(seed))
        t0 = time.perf_counter()
        out = ref(prompt, num_inference_steps=n, guidance_scale=7.0, height=size, width=size, latents=noise,
                  output_type="np").images
        return time.perf_counter() - t0, out, None

    run_sdrt(2), run_diffusers(2)          # warm-up, excluded
    ours, theirs, stages = [], [], []
    for _ in range(repeat):
        t, a, timings = run_sdrt(steps)
        ours.append(t)
        stages.append(timings)
        t, b, _ = run_diffusers(steps)
        theirs.append(t)
    diff = float(np.abs(a - b).max())
    o, d = statistics.median(ours), statistics.median(theirs)
    print(f"sdrt torch {o:.2f} s, diffusers {d:.2f} s, ratio diffusers/sdrt {d / o:.3f}, max abs diff {diff:.2e}")
    return {"model": model, "size": f"{size}x{size}", "steps": steps, "sampler": "Euler + Karras",
            "repeat": repeat, "sdrt_torch_s": ours, "diffusers_s": theirs, "sdrt_stages_s": stages,
            "speedup_vs_diffusers": d / o, "max_abs_pixel_diff": diff}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["overhead", "vs-diffusers"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=None)
    args = ap.parse_args()
    if args.what == "overhead":
        data = overhead(args.steps, args.repeat or 5)
    else:
        data = vs_diffusers(args.steps, args.size, args.repeat or 1)
    data.update(machine=machine(), sdrt=sdrt.__version__, date=datetime.datetime.now().isoformat(timespec="seconds"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"core-{args.what}-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(data, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
