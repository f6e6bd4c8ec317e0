"""The benchmark harness: the same generation on every backend and on the references, side by
side in one process, with per-stage times, memory, quality against the torch float32 image,
and every row as a ratio against diffusers' StableDiffusionPipeline measured in the same run.

    sdrt bench --model random:sd15 --backends torch,onnxruntime --steps 20 --height 256 --width 256
    sdrt bench --suite cpu-quick
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..backends import sync
from .record import PeakRSS, machine, versions

REFERENCES = ("diffusers", "openvino")   # openvino: the CPU peer (sdrt.bench.openvino_peer)
SUITES_FILE = Path(__file__).resolve().parent / "suites.json"        # package data

# diffusers scheduler (class, kwargs) implementing each sdrt sampler + schedule with the same sigmas
_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
DIFFUSERS_SCHEDULERS = {
    ("Euler", "Karras"): ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, timestep_spacing="linspace")),
    ("DDIM", "Automatic"): ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
}

logger = logging.getLogger("sdrt.bench")


@dataclass
class Settings:
    model: str = "random:tiny"
    backends: tuple = ("torch",)
    references: tuple = ("diffusers",)
    steps: int = 20
    height: int = 64
    width: int = 64
    batch: int = 1
    repeat: int = 3
    warmup: int = 1
    sampler: str = "Euler"
    schedule: str = "Karras"
    dtype: str = "float32"
    device: str = "cpu"
    engine_dir: str | None = None
    prompt: str = "a photo of an astronaut riding a horse on mars"
    seed: int = 1


@dataclass
class Row:
    name: str
    status: str = "ok"
    runs: list = field(default_factory=list)            # per-run dicts of seconds
    peak_rss_mb: float | None = None
    peak_device_mb: float | None = None
    max_abs_diff: float | None = None
    psnr_db: float | None = None
    pixels: np.ndarray | None = None

    def stat(self, key: str) -> dict:
        vals = [r[key] for r in self.runs if r.get(key) is not None]
        if not vals:
            return {}
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

def _generate(pipe, s: Settings, steps: int, batch: int, height: int, width: int):
    """The benchmark's generation on an sdrt pipeline (CPU noise, so every backend starts alike)."""
    return pipe(s.prompt, steps=steps, sampler=s.sampler, schedule=s.schedule, seed=s.seed, width=width,
                height=height, batch_size=batch, rng="cpu", cfg_scale=7.0)


class _Timed:
    """Accumulates the time spent in a callable (synchronising a CUDA device around it)."""

    def __init__(self, fn, device):
        self.fn, self.device, self.total, self.calls = fn, device, 0.0, 0

    def __call__(self, *a, **k):
        sync(self.device)
        t0 = time.perf_counter()
        out = self.fn(*a, **k)
        sync(self.device)
        self.total += time.perf_counter() - t0
        self.calls += 1
        return out


def _sdrt_runner(s: Settings, backend: str, components):
    import sdrt

    from ..backends import create_backend

    pipe = sdrt.Pipeline(components, create_backend(backend, components, s.device, s.dtype, s.engine_dir))
    timed = _Timed(pipe.backend.unet, s.device)
    pipe.backend.unet = timed

    def run(steps: int, batch: int, height: int, width: int):
        timed.total, timed.calls = 0.0, 0
        r = _generate(pipe, s, steps, batch, height, width)
        t = r.timings
        return {"text_encoder": t["text_encoder"], "unet_all": timed.total, "unet_calls": timed.calls,
                "vae": t["vae"], "loop_overhead": t["loop"] - timed.total, "total": t["total"]}, r.pixels
    return run


def diffusers_pipeline(components, scheduler, device, dtype: torch.dtype):
    """diffusers' StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL, which zeroes an
    absent negative prompt as the web UI zeroes an empty one) over the same modules (no safety
    checker, no progress bar): the reference sdrt is timed and compared against."""
    import diffusers
    c = components
    if c.is_sdxl:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
            tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device, dtype)
    pipe = diffusers.StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                             unet=c.unet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def _diffusers_runner(s: Settings, components):
    import diffusers

    key = (s.sampler, s.schedule)
    if key not in DIFFUSERS_SCHEDULERS:
        raise LookupError(f"no diffusers scheduler is mapped to sampler {s.sampler!r} with schedule "
                          f"{s.schedule!r}; mapped: {', '.join(f'{a} + {b}' for a, b in DIFFUSERS_SCHEDULERS)}")
    cls, kw = DIFFUSERS_SCHEDULERS[key]
    sched = getattr(diffusers, cls)(**_BETAS, **kw)
    dtype = torch.float16 if s.dtype == "float16" else torch.float32
    pipe = diffusers_pipeline(components, sched, s.device, dtype)
    f = components.latent_factor
    targets = [("text_encoder", pipe.text_encoder, "forward"), ("unet_all", pipe.unet, "forward"),
               ("vae", pipe.vae, "decode")]
    if components.is_sdxl:
        targets.append(("text_encoder_2", pipe.text_encoder_2, "forward"))

    def run(steps: int, batch: int, height: int, width: int):
        # the modules are shared with sdrt's backends: time them only during this run
        hooks = {}
        for key, module, attr in targets:
            hooks[key] = _Timed(getattr(module, attr), s.device)
            setattr(module, attr, hooks[key])
        try:
            noise = torch.stack([torch.randn((4, height // f, width // f),
                                             generator=torch.Generator().manual_seed(s.seed + i))
                                 for i in range(batch)]).to(s.device, dtype)
            sync(s.device)
            t0 = time.perf_counter()
            out = pipe([s.prompt] * batch, num_inference_steps=steps, guidance_scale=7.0, height=height,
                       width=width, latents=noise, output_type="np").images
            sync(s.device)
            total = time.perf_counter() - t0
        finally:
            for _, module, attr in targets:
                delattr(module, attr)           # back to the class's method
        m = {k: h.total for k, h in hooks.items()}
        m["text_encoder"] += m.pop("text_encoder_2", 0.0)
        m["unet_calls"] = hooks["unet_all"].calls
        m["loop_overhead"] = total - m["text_encoder"] - m["unet_all"] - m["vae"]
        m["total"] = total
        return m, np.asarray(out, dtype=np.float32)
    return run


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def run_benchmark(s: Settings, log=None) -> dict:
    """Measure every backend and reference of ``s``; a failing one is reported, the rest run."""
    log = log or logger.info
    from ..backends import BACKENDS
    from ..models import load_model

    log(f"loading {s.model} ...")
    components = load_model(s.model)
    rows: list[Row] = []
    runners = []
    for name in list(s.backends) + list(s.references):
        row = Row(name)
        rows.append(row)
        try:
            if name in BACKENDS:
                runners.append((row, _sdrt_runner(s, name, components)))
            elif name == "diffusers":
                runners.append((row, _diffusers_runner(s, components)))
            elif name == "openvino":
                if torch.device(s.device).type != "cpu":
                    raise ValueError(f"the OpenVINO peer runs on the CPU, not on {s.device!r}")
                from .openvino_peer import openvino_components
                runners.append((row, _diffusers_runner(s, openvino_components(components, log=log))))
            else:
                raise LookupError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS + REFERENCES)}")
        except (LookupError, ValueError, ImportError, RuntimeError) as e:
            row.status = f"skipped: {e}"
            log(f"{name}: {row.status}")
    # warm up everything, then interleave the timed runs (round robin) so that a slow drift of
    # the machine is shared by every backend instead of biasing one
    live = []
    for row, run in runners:
        try:
            for _ in range(s.warmup):
                run(min(s.steps, 2), s.batch, s.height, s.width)
            live.append((row, run))
        except (ValueError, RuntimeError, FloatingPointError, LookupError) as e:
            row.status = f"failed: {e}"
            log(f"{row.name}: {row.status}")
    peaks = {row.name: 0.0 for row, _ in live}
    for i in range(s.repeat):
        for row, run in list(live):
            try:
                if str(s.device).startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                with PeakRSS() as mem:
                    m, pixels = run(s.steps, s.batch, s.height, s.width)
                row.runs.append(m)
                row.pixels = pixels
                peaks[row.name] = max(peaks[row.name], mem.peak)
                row.peak_rss_mb = peaks[row.name]
                if str(s.device).startswith("cuda"):
                    row.peak_device_mb = max(row.peak_device_mb or 0.0, torch.cuda.max_memory_allocated() / 2 ** 20)
                log(f"{row.name}: run {i + 1}/{s.repeat}: {m['total']:.3f} s")
            except (ValueError, RuntimeError, FloatingPointError, LookupError) as e:
                row.status = f"failed: {e}"
                log(f"{row.name}: {row.status}")
                live.remove((row, run))
    _quality(s, rows, components, log)
    return _record(s, rows)


def _quality(s: Settings, rows, components, log):
    """Max abs difference and PSNR of each row's images against the torch float32 image."""
    ref = next((r.pixels for r in rows if r.name == "torch" and r.pixels is not None and s.dtype == "float32"), None)
    if ref is None and any(r.pixels is not None for r in rows):
        try:
            import sdrt
            # float32 on the benchmark's own device (a CPU reference at 512 px would take minutes);
            # this moves the shared modules to float32, so it runs after every measurement
            if str(s.device).startswith("cuda"):
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
            pipe = sdrt.Pipeline(components, sdrt.backends.create_backend("torch", components, s.device, "float32"))
            ref = _generate(pipe, s, s.steps, s.batch, s.height, s.width).pixels
        except (ValueError, RuntimeError) as e:
            log(f"quality reference failed: {e}")
            return
    for r in rows:
        if r.pixels is not None and ref is not None and r.pixels.shape == ref.shape:
            r.max_abs_diff = float(np.abs(r.pixels - ref).max())
            r.psnr_db = _psnr(r.pixels, ref)


def _record(s: Settings, rows) -> dict:
    ref = next((r for r in rows if r.name == "diffusers" and r.runs), None)
    ref_total = ref.stat("total")["median"] if ref else None
    out_rows = []
    for r in rows:
        d = {"name": r.name, "status": r.status}
        if r.runs:
            stats = {k: r.stat(k) for k in ("text_encoder", "unet_all", "vae", "loop_overhead", "total")}
            total = stats["total"]["median"]
            calls = r.runs[-1].get("unet_calls") or s.steps
            d.update(stats=stats, unet_per_call=stats["unet_all"]["median"] / calls, unet_calls=calls,
                     images_per_s=s.batch / total, it_per_s=s.steps / total,
                     peak_rss_mb=r.peak_rss_mb, peak_device_mb=r.peak_device_mb,
                     max_abs_diff=r.max_abs_diff, psnr_db=r.psnr_db,
                     speedup_vs_diffusers=(ref_total / total) if ref_total else None,
                     runs=r.runs)
        out_rows.append(d)
    return {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.__dict__.items()},
            "rows": out_rows, "machine": machine(), "versions": versions(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def format_table(record: dict) -> str:
    head = ("backend", "total s", "min", "max", "text s", "unet/step s", "unet all s", "vae s", "overhead s",
            "img/s", "it/s", "vs diffusers", "peak RSS MB", "max|diff|", "PSNR dB")
    lines = [head]
    for r in record["rows"]:
        if "stats" not in r:
            lines.append((r["name"], r["status"]) + ("",) * (len(head) - 2))
            continue
        st = r["stats"]

        def f(v, spec=".3f"):
            return "-" if v is None else ("inf" if v == math.inf else format(v, spec))
        lines.append((r["name"], f(st["total"]["median"]), f(st["total"]["min"]), f(st["total"]["max"]),
                      f(st["text_encoder"].get("median")), f(r["unet_per_call"], ".4f"),
                      f(st["unet_all"]["median"]), f(st["vae"]["median"]), f(st["loop_overhead"]["median"]),
                      f(r["images_per_s"]), f(r["it_per_s"]),
                      f(r["speedup_vs_diffusers"], ".3f") + ("x" if r["speedup_vs_diffusers"] else ""),
                      f(r["peak_rss_mb"], ".0f"), f(r["max_abs_diff"], ".2e"), f(r["psnr_db"], ".1f")))
    full = [line for line in lines if len(line) == len(head) and (line is head or line[2] != "")]
    widths = [max(len(str(line[i])) for line in full) for i in range(len(head))]
    body = []
    for line in lines:
        if line in full:
            body.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
        else:
            body.append(f"{line[0].ljust(widths[0])}  {line[1]}")
    return "\n".join(body)


def chart(record: dict, path: str | Path, sweep: dict | None = None) -> Path:
    """A PNG of per-stage latency per backend (stacked bars), and the sweep when there is one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in record["rows"] if "stats" in r]
    n = 2 if sweep else 1
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.2))
    ax = axes[0] if n == 2 else axes
    bottom = np.zeros(len(rows))
    for stage in ("text_encoder", "unet_all", "vae", "loop_overhead"):
        vals = np.array([max(r["stats"][stage].get("median", 0.0), 0.0) for r in rows])
        ax.bar([r["name"] for r in rows], vals, bottom=bottom, label=stage)
        bottom += vals
    st = record["settings"]
    ax.set_ylabel("seconds per generation (median)")
    ax.set_title(f"{st['model']} {st['width']}x{st['height']}, {st['steps']} steps, batch {st['batch']}, {st['dtype']}")
    ax.legend()
    if sweep:
        ax2 = axes[1]
        for name, pts in sweep["points"].items():
            xs, ys = zip(*pts)
            fit = sweep["fits"].get(name)
            label = name + (f" ({fit['slope'] * 1e3:.3g} ms/{sweep['unit']})" if fit else "")
            ax2.plot(xs, ys, "o-", label=label)
        ax2.set_xlabel(sweep["axis"])
        ax2.set_ylabel("seconds (median)")
        ax2.set_title(f"scaling with {sweep['axis']}")
        ax2.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_sweep(s: Settings, axis: str, values: list[int], log=None) -> dict:
    """Latency against steps, batch or resolution, with a least-squares line per backend:
    the per-step, per-image or per-pixel cost (slope) and the fixed cost (intercept)."""
    log = log or logger.info
    from dataclasses import replace
    if axis not in ("steps", "batch", "resolution"):
        raise ValueError(f"sweep axis {axis!r} is unknown; valid: steps, batch, resolution")
    points: dict[str, list] = {}
    failures: dict[str, list] = {}
    for v in values:
        cur = s
        if axis == "steps":
            cur = replace(cur, steps=v)
        elif axis == "batch":
            cur = replace(cur, batch=v)
        else:
            cur = replace(cur, height=v, width=v)
        rec = run_benchmark(cur, log=log)
        x = v * v if axis == "resolution" else v
        for r in rec["rows"]:
            if "stats" in r:
                points.setdefault(r["name"], []).append((x, r["stats"]["total"]["median"]))
            else:
                failures.setdefault(r["name"], []).append({axis: v, "status": r["status"]})
    fits = {}
    for name, pts in points.items():
        if len(pts) >= 2:
            xs, ys = np.array(pts, dtype=np.float64).T
            slope, intercept = np.polyfit(xs, ys, 1)
            fits[name] = {"slope": float(slope), "intercept": float(intercept)}
    unit = {"steps": "step", "batch": "image", "resolution": "pixel"}[axis]
    return {"axis": "pixels" if axis == "resolution" else axis, "unit": unit, "values": values,
            "points": points, "fits": fits, "failures": failures}


def load_suite(name: str) -> dict:
    suites = json.loads(SUITES_FILE.read_text()) if SUITES_FILE.is_file() else {}
    if name not in suites:
        raise ValueError(f"suite {name!r} is unknown; valid: {', '.join(suites) or '(no suites file)'}")
    return suites[name]


def main_bench(args) -> int:
    """``sdrt bench``: see ``sdrt bench --help``."""
    from dataclasses import replace
    s = Settings()
    suite = load_suite(args.suite) if args.suite else {}
    fields = {k: v for k, v in suite.items() if k in Settings.__dataclass_fields__}
    for key in ("backends", "references"):
        if key in fields:
            fields[key] = tuple(fields[key])
    s = replace(s, **fields)
    over = {"model": args.model, "steps": args.steps, "height": args.height, "width": args.width, "batch": args.batch,
            "repeat": args.repeat, "sampler": args.sampler, "schedule": args.schedule, "dtype": args.dtype,
            "device": args.device, "engine_dir": args.engine_dir, "warmup": args.warmup}
    s = replace(s, **{k: v for k, v in over.items() if v is not None})
    if args.backends:
        s = replace(s, backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()))
    if args.references is not None:
        s = replace(s, references=tuple(b.strip() for b in args.references.split(",") if b.strip()))
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    record = run_benchmark(s, log=log)
    sweep_spec = args.sweep or suite.get("sweep")
    sweep = None
    if sweep_spec:
        axis, _, vals = sweep_spec.partition("=")
        sweep = run_sweep(s, axis, [int(v) for v in vals.split(",")], log=log)
        record["sweep"] = sweep
    if args.suite:
        record["suite"] = args.suite
    print(format_table(record))
    if sweep:
        for name, fit in sweep["fits"].items():
            print(f"{name}: {fit['slope']:.4g} s per {sweep['unit']} + {fit['intercept']:.3f} s fixed")
        for name, fails in sweep["failures"].items():
            for f in fails:
                print(f"{name}: not measured at {sweep['axis']} {f}: {f['status']}"[:300])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2, default=float))
        print(f"wrote {args.json}")
    if args.chart:
        print(f"wrote {chart(record, args.chart, sweep)}")
    return 0 if any("stats" in r for r in record["rows"]) else 1
