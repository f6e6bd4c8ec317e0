"""The cost of a LoRA swap (torch backend, or onnxruntime: the merge plus the sessions with the
changed initializers), beside the generation it serves.

A kohya-layout LoRA (rank 16) over every attention projection, feed-forward and projection
layer of the UNet's transformer blocks and the text encoder's attention and MLP (what kohya's
scripts train by default) is written from random weights; then, on one pipeline, side by side:
the generation without LoRA, the first merge (backups taken), swaps between two LoRAs, taking a
LoRA out, and the generation with a LoRA. Writes benchmarks/results/lora-swap-<model>-<date>.json.

    python benchmarks/lora_swap.py [--model random:sd15] [--backend torch|onnxruntime] [--size 256]
                                   [--steps 20] [--repeat 3]
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:sd15")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--engine-dir", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    import lora_files

    import sdrt
    from sdrt.bench import machine, versions
    lora_files.UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
    lora_files.TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "mlp.fc1", "mlp.fc2")
    folder = Path(tempfile.mkdtemp())
    pipe = sdrt.Pipeline.from_pretrained(args.model, backend=args.backend, engine_dir=args.engine_dir, lora_dir=folder)
    layers = {}
    for i, name in enumerate(("a", "b")):
        layers[name] = lora_files.kohya(pipe.components, folder / f"{name}.safetensors", rank=args.rank, seed=i,
                                        conv=False)
    pipe.loras.refresh()
    gen = dict(steps=args.steps, width=args.size, height=args.size, seed=1, sampler="Euler")
    def switch(job) -> float:
        """Both parts to ``job``'s LoRA set, as a generation does it (merge, and the backend's sync)."""
        t0 = time.perf_counter()
        for part in ("text", "unet"):
            pipe._apply_loras(part, job)
        return time.perf_counter() - t0

    rows = {k: [] for k in ("generate_plain", "generate_lora", "first_merge", "swap", "take_out", "parse")}
    pipe("warm up", **dict(gen, steps=2))
    for r in range(args.repeat):
        t0 = time.perf_counter()
        pipe("a cat", **gen)
        rows["generate_plain"].append(time.perf_counter() - t0)
        pipe.loras.refresh()                      # parsing and matching the files again
        t0 = time.perf_counter()
        job = pipe.validate(sdrt.GenerationParams("a cat <lora:a:0.8>", **gen))
        rows["parse"].append(time.perf_counter() - t0)
        rows["first_merge"].append(switch(job))
        rows["swap"].append(switch(pipe.validate(sdrt.GenerationParams("a cat <lora:b:0.8>", **gen))))
        t0 = time.perf_counter()
        pipe("a cat <lora:a:0.8>", **gen)
        rows["generate_lora"].append(time.perf_counter() - t0)
        rows["take_out"].append(switch(pipe.validate(sdrt.GenerationParams("a cat", **gen))))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in rows.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    record = dict(model=args.model, backend=args.backend, size=args.size, steps=args.steps, rank=args.rank,
                  lora_layers=len(layers["a"]), seconds=rows, median=med,
                  swap_vs_generation=med["swap"] / med["generate_plain"], machine=machine(), versions=versions(),
                  date=datetime.date.today().isoformat())
    out = Path(args.out) / f"lora-swap-{args.model.replace(':', '-')}-{args.backend}-{record['date']}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"{len(layers['a'])} layers, rank {args.rank}: swap {1e3 * med['swap']:.0f} ms, first merge "
          f"{1e3 * med['first_merge']:.0f} ms, take out {1e3 * med['take_out']:.0f} ms, parse {1e3 * med['parse']:.0f} ms; "
          f"generation {med['generate_plain']:.2f} s plain, {med['generate_lora']:.2f} s with a LoRA "
          f"(swap = {100 * record['swap_vs_generation']:.1f}% of a generation); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
