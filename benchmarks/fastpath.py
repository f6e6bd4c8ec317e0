"""The fast path, side by side in one run: the eager loop, the static loop (torch ops or the fused
kernel; one CUDA graph on a GPU), cross-attention K/V once per conditioning, and diffusers.

    python benchmarks/fastpath.py [--model random:sd15] [--size 256] [--steps 10] [--batch 1]
                                  [--device cpu|cuda] [--dtype float32|float16] [--repeat 3]

On a CPU it measures what can be measured there (eager vs static loop, K/V cache); the GPU
suite (benchmarks/gpu/run.py) calls the same functions plus the kernel checks. Timed runs are
interleaved round robin after a full-length warm-up of every variant (so a graph is captured
before timing starts). Writes benchmarks/results/fastpath-<device>-<date>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import statistics
import time

import numpy as np
import torch

from sdrt.backends import sync
from sdrt.backends.torch_backend import UNTUNED

PROMPT = "a photo of an astronaut riding a horse on mars"


@functools.lru_cache(maxsize=2)
def _load(model: str):
    """Loaded once per process: random:sd15 takes a while to initialise."""
    from sdrt.models import load_model
    return load_model(model)

# name -> (fast path, fused step kernel, kv cache, cross-attention kernel); graph capture follows
# the device
VARIANTS = {
    "eager": (False, False, False, False),
    "eager+kv": (False, False, True, False),
    "static-ops": (True, False, False, False),
    "static-ops+kv": (True, False, True, False),
    "static-kernel": (True, True, False, False),
    "static-kernel+kv": (True, True, True, False),
    "static-kernel+kv+attn": (True, True, True, True),
}


def _diffusers_pipe(components, device, dtype):
    import diffusers

    from sdrt.bench import _BETAS, diffusers_pipeline
    return diffusers_pipeline(components, diffusers.EulerDiscreteScheduler(**_BETAS), device, dtype)


_PEERS: dict = {}


def _noise(components, size: int, batch: int) -> torch.Tensor:
    """The initial noise every variant and peer starts from: image i from seed 1 + i (CPU)."""
    f = components.latent_factor
    return torch.stack([torch.randn((4, size // f, size // f), generator=torch.Generator().manual_seed(1 + i))
                        for i in range(batch)])


def _time_diffusers(pipe, latents: torch.Tensor, steps: int, size: int, device) -> tuple[float, np.ndarray]:
    """(seconds, images (B, H, W, 3) float32) of one diffusers generation from ``latents``."""
    sync(device)
    t0 = time.perf_counter()
    out = pipe([PROMPT] * latents.shape[0], num_inference_steps=steps, guidance_scale=7.0, height=size, width=size,
               latents=latents, output_type="np").images
    sync(device)
    return time.perf_counter() - t0, np.asarray(out, dtype=np.float32)


def compiled_peer(model: str, device, dtype: str, mode: str):
    """The peer a user would put beside sdrt on a GPU: diffusers' pipeline with the recipe its
    docs give (``docs/source/en/optimization/fp16.md``): its own copy of the UNet in
    channels_last, with fused QKV projections, under ``torch.compile(mode, fullgraph=True)``
    ("reduce-overhead" and "max-autotune" capture CUDA graphs; max-autotune's GEMM/conv
    autotuning and the inductor flags the docs add (coordinate descent) take minutes more, so the
    suite's one call uses reduce-overhead). The text encoder and VAE are the shared modules (eager).
    One per (model, device, dtype, mode) per process: compiled once per batch size."""
    key = (model, str(device), dtype, mode)
    if key not in _PEERS:
        from diffusers.models.attention_processor import AttnProcessor2_0
        components = _load(model)
        torch_dtype = torch.float16 if dtype == "float16" else torch.float32
        unet = copy.deepcopy(components.unet).to(device, torch_dtype)
        unet.set_attn_processor(AttnProcessor2_0())         # not sdrt's K/V processors, if installed
        unet.to(memory_format=torch.channels_last)
        unet.fuse_qkv_projections()
        pipe = _diffusers_pipe(dataclasses.replace(components, unet=unet), device, torch_dtype)
        from sdrt.backends.torch_backend import allow_recompiles
        allow_recompiles()                  # the peer's UNet shares its code objects with sdrt's
        pipe.unet = torch.compile(unet, mode=mode, fullgraph=True, dynamic=False)   # one shape per batch size
        _PEERS[key] = pipe
    return _PEERS[key]


def peer_in_process(model="random:sd15", size=512, steps=50, batches=(1, 4), device="cuda", dtype="float16",
                    mode="reduce-overhead", repeat=3, on_batch=None, log=print) -> dict:
    """The compiled peer (``compiled_peer``) timed per batch size in THIS process: the
    end-to-end seconds (medians of ``repeat`` after a full-length warm-up that compiles and
    captures), its UNet alone, and the max abs pixel difference against diffusers eager on the
    same weights and noise (random models are seeded: a second process builds the same weights)."""
    components = _load(model)
    torch_dtype = torch.float16 if dtype == "float16" else torch.float32
    eager = _diffusers_pipe(components, device, torch_dtype)
    peer = compiled_peer(model, device, dtype, mode)
    out = {}
    for batch in batches:
        noise = _noise(components, size, batch)

        def run(pipe):
            return _time_diffusers(pipe, noise.to(device, torch_dtype), steps, size, device)
        t0 = time.perf_counter()
        run(peer)
        warm = time.perf_counter() - t0
        runs = [run(peer)[0] for _ in range(repeat)]
        _, img = run(peer)
        _, ref = run(eager)
        x, t, ctx = _unet_inputs(components, _Device(device, torch_dtype), size, batch)
        with torch.inference_mode():
            unet = _median_seconds(lambda: peer.unet(x, t, encoder_hidden_states=ctx, return_dict=False), device)
        med = statistics.median(runs)
        out[str(batch)] = dict(median_s=med, runs=runs, it_per_s=steps / med, unet_alone_s=unet,
                               warmup_and_compile_s=warm, max_abs_diff_vs_diffusers=float(np.abs(img - ref).max()))
        log(f"diffusers-compiled ({mode}) batch {batch}: {med:.3f} s, {steps / med:.1f} it/s, UNet alone "
            f"{1e3 * unet:.2f} ms (warm-up with compilation {warm:.0f} s)")
        if on_batch is not None:
            on_batch(dict(model=model, size=size, steps=steps, mode=mode, batches={str(batch): out[str(batch)]}))
    return dict(model=model, size=size, steps=steps, mode=mode, recipe="channels_last, fused QKV, "
                f"torch.compile(mode={mode!r}, fullgraph=True); text encoder and VAE eager", batches=out)


@dataclasses.dataclass
class _Device:
    device: str
    dtype: torch.dtype


def peer_subprocess(model="random:sd15", size=512, steps=50, batches=(1, 4), device="cuda", dtype="float16",
                    mode="reduce-overhead", repeat=3, timeout=400, on_batch=None, log=print) -> dict:
    """``peer_in_process`` in a child process. On a GPU the compiled peer's CUDA graphs (inductor's
    cudagraph trees) clear cuBLAS's workspaces before they record, and a CUDA graph that sdrt
    captured earlier in the same process still points into them: replaying it then crashed the
    suite (segmentation fault, H200, 2026-11-30). Apart, neither can corrupt the other.
    The child's log lines are passed on as they come, and each batch size's result as soon as it
    is measured (``on_batch(partial_result)``), so a call cut short keeps what was measured."""
    import json
    import subprocess
    import sys
    cmd = [sys.executable, __file__, "--peer", mode, "--model", model, "--size", str(size), "--steps", str(steps),
           "--batches", *map(str, batches), "--device", str(device), "--dtype", dtype, "--repeat", str(repeat)]
    result = dict(model=model, size=size, steps=steps, mode=mode, batches={})
    tail = []
    deadline = time.monotonic() + timeout
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        try:
            for line in proc.stderr:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the peer's process ran past {timeout} s")
                line = line.rstrip("\n")
                if line.startswith(_PEER_RESULT):
                    part = json.loads(line[len(_PEER_RESULT):])
                    result.update({k: v for k, v in part.items() if k != "batches"})
                    result["batches"].update(part["batches"])
                    if on_batch is not None:
                        on_batch(result)
                    continue
                tail = (tail + [line])[-30:]
                if line.startswith("diffusers-compiled"):
                    log(line)
        finally:
            if proc.poll() is None:
                proc.kill()
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"the peer's process exited {rc}: " + "\n".join(tail)[-1500:])
    return result


_PEER_RESULT = "PEER-RESULT "


def end_to_end(model="random:sd15", size=256, steps=10, batch=1, device="cpu", dtype="float32",
               repeat=3, variants=None, diffusers_ref=True, tune=None, log=print) -> dict:
    """Total seconds per generation of each variant (Euler, uniform schedule, CFG 7), medians of
    ``repeat`` interleaved runs, with UNet iterations per second and the max abs pixel difference
    against the eager loop's image. ``tune``: TorchBackend.tune options for every variant (the
    weight layout and cuDNN's autotuning reach diffusers' run too: the modules are shared; the
    SDPA order only sdrt's); they are reset afterwards. diffusers eager (``diffusers_ref``) runs
    in the same rotation, its UNet alone timed too. The compiled peer never runs here: its CUDA
    graph trees would invalidate the graphs sdrt captured in this process (``peer_subprocess``)."""
    import sdrt
    from sdrt.backends import create_backend

    variants = list(variants or VARIANTS)
    if torch.device(device).type == "cpu":
        variants = [v for v in variants if "kernel" not in v]     # on a CPU the step is the torch reference
    components = _load(model)
    backend = create_backend("torch", components, device, dtype)
    try:
        backend.tune(**(tune or {}))
        args = dict(prompt=PROMPT, steps=steps, sampler="Euler", schedule="Uniform", seed=1, width=size,
                    height=size, batch_size=batch, rng="cpu", cfg_scale=7.0)
        # one pipeline per variant over the shared backend, so each keeps its own captured graph
        pipes = {}
        for name in variants:
            fast, kernel = VARIANTS[name][:2]
            pipes[name] = sdrt.Pipeline(components, backend)
            if fast:
                pipes[name].set_fast_path(use_kernel=kernel)

        def configure(name):
            backend.enable_kv_cache(VARIANTS[name][2], custom_kernel=VARIANTS[name][3])   # eager runs and captures see this
            return pipes[name]

        runs = {v: [] for v in variants}
        pixels = {}
        errors = {}
        peers = {}
        torch_dtype = torch.float16 if dtype == "float16" else torch.float32
        if diffusers_ref:
            peers["diffusers"] = _diffusers_pipe(components, device, torch_dtype)
        noise = _noise(components, size, batch)

        def run_peer(ref):
            backend.enable_kv_cache(False)      # the modules are shared: diffusers' own processors
            return _time_diffusers(ref, noise.to(device, torch_dtype), steps, size, device)

        for name in list(variants):         # warm-up at full length: captures the graphs
            try:
                configure(name)(**args)
                log(f"{name}: warmed up")
            except Exception as e:  # noqa: BLE001 - a failing variant is reported, the others still run
                errors[name] = f"{type(e).__name__}: {e}"
                log(f"{name}: FAILED: {errors[name]}")
                variants.remove(name)
                del runs[name]
        for name, ref in list(peers.items()):
            try:
                run_peer(ref)
                runs[name] = []
                log(f"{name}: warmed up")
            except Exception as e:  # noqa: BLE001 - a failing peer is reported, the others still run
                errors[name] = f"{type(e).__name__}: {str(e)[:500]}"
                log(f"{name}: FAILED: {errors[name]}")
                del peers[name]
        for i in range(repeat):
            for name in variants:
                pipe = configure(name)
                sync(device)
                t0 = time.perf_counter()
                r = pipe(**args)
                sync(device)
                runs[name].append(time.perf_counter() - t0)
                pixels[name] = r.pixels
                log(f"{name}: run {i + 1}/{repeat}: {runs[name][-1]:.3f} s")
            for name, ref in peers.items():
                t, pixels[name] = run_peer(ref)
                runs[name].append(t)
                log(f"{name}: run {i + 1}/{repeat}: {t:.3f} s")
        base = statistics.median(runs["eager"])
        dref = statistics.median(runs["diffusers"]) if "diffusers" in peers else None
        rows = {}
        for name, ts in runs.items():
            med = statistics.median(ts)
            rows[name] = dict(median_s=med, min_s=min(ts), runs=ts, it_per_s=steps / med,
                              speedup_vs_eager=base / med, speedup_vs_diffusers=(dref / med) if dref else None,
                              max_abs_diff_vs_eager=float(np.abs(pixels[name] - pixels["eager"]).max()))
            log(f"{name:18s} {med:8.3f} s  {steps / med:7.2f} it/s  x{base / med:.3f} vs eager"
                + (f"  x{dref / med:.3f} vs diffusers" if dref else "")
                + f"  max|diff| {rows[name]['max_abs_diff_vs_eager']:.2e}")
        if not components.is_sdxl:
            x, t, ctx = _unet_inputs(components, backend, size, batch)
            for name, ref in peers.items():     # the peers' UNet alone, as their pipelines call it
                with torch.inference_mode():
                    rows[name]["unet_alone_s"] = _median_seconds(
                        lambda ref=ref: ref.unet(x, t, encoder_hidden_states=ctx, return_dict=False), device)
    finally:
        backend.enable_kv_cache(False)
        backend.tune(**UNTUNED)
    from diffusers.models.attention_processor import Attention
    kv_layers = sum(isinstance(m, Attention) and m.is_cross_attention for m in components.unet.modules())
    return dict(model=model, size=size, steps=steps, batch=batch, device=str(device), dtype=dtype, repeat=repeat,
                sampler="Euler", schedule="Uniform", rows=rows, kv_layers=kv_layers, tune=tune or {}, errors=errors,
                peers=list(peers))


def _unet_inputs(components, be, size: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents, timesteps, context) of one CFG UNet call (2 * batch rows) on ``be``'s device."""
    f = components.latent_factor
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2 * batch, 4, size // f, size // f), generator=g).to(be.device, be.dtype)
    t = torch.full((2 * batch,), 500.0, device=be.device)
    ctx = torch.randn((2 * batch, 77, components.text_encoder.config.hidden_size), generator=g).to(be.device, be.dtype)
    return x, t, ctx


def unet_step_kv(model="random:sd15", size=256, batch=1, device="cpu", dtype="float32", repeat=5, log=print) -> dict:
    """One CFG UNet call with and without cached cross-attention K/V, interleaved."""
    from sdrt.backends import create_backend

    components = _load(model)
    be = create_backend("torch", components, device, dtype)
    x, t, ctx = _unet_inputs(components, be, size, batch)
    times = {"per-step K/V": [], "K/V once": []}
    outs = {}
    for i in range(repeat + 1):
        for name in times:
            be.enable_kv_cache(name == "K/V once")
            if be.kv is not None:
                be.kv.precompute([ctx])
            sync(device)
            t0 = time.perf_counter()
            outs[name] = be.unet(x, t, ctx)
            sync(device)
            if i:                                   # the first round warms up
                times[name].append(time.perf_counter() - t0)
    be.enable_kv_cache(False)
    a, b = (statistics.median(v) for v in times.values())
    diff = float((outs["per-step K/V"].float() - outs["K/V once"].float()).abs().max())
    log(f"UNet call: per-step K/V {a:.4f} s, K/V once {b:.4f} s: x{a / b:.3f}; max|diff| {diff:.2e}")
    return dict(model=model, size=size, batch=batch, device=str(device), dtype=dtype, repeat=repeat,
                median_s={k: statistics.median(v) for k, v in times.items()}, speedup=a / b, max_abs_diff=diff)


def kernel_check(device="cuda", log=print) -> dict:
    """The fused step kernel against the torch reference (float64 formula for the reference is
    in tests/test_kernels.py) on fresh random inputs: odd and real latent sizes, batch 1..4,
    float32 and float16 storage, every row of Euler a, DPM++ 2M and DDIM (eta 0.5) tables.
    Returns the largest relative error per dtype and whether every output element was written."""
    from sdrt.fastpath import step_table
    from sdrt.kernels import fused_step
    sigmas = np.array([14.6, 6.0, 2.1, 0.7, 0.03, 0.0])
    worst = {}
    written = True
    for dtype in (torch.float32, torch.float16):
        err = 0.0
        for b, shape in ((1, (4, 64, 64)), (3, (4, 17, 23)), (4, (4, 96, 64))):
            for sampler in ("Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DDIM"):
                table, _ = step_table(sampler, sigmas, eta=0.5 if sampler == "DDIM" else None)
                for row in table:
                    g = torch.Generator(device=device).manual_seed(len(worst) * 1000 + b)
                    r = lambda *sh: torch.randn(*sh, generator=g, device=device)   # noqa: E731
                    out = r(2 * b, *shape).to(dtype)
                    x, d_prev, noise = r(b, *shape), r(b, *shape), r(b, *shape)
                    scale = torch.rand(b, generator=g, device=device) * 10 + 1
                    coef = torch.tensor(row, dtype=torch.float32, device=device)
                    ref = [x.clone(), d_prev.clone(), torch.full_like(out, float("nan"))]
                    got = [x.clone(), d_prev.clone(), torch.full_like(out, float("nan"))]   # poisoned
                    fused_step(out, *ref[:3], noise, coef, scale, use_kernel=False)
                    fused_step(out, *got[:3], noise, coef, scale, use_kernel=True)
                    torch.cuda.synchronize(device)
                    for a_, k_ in zip(ref, got):
                        written &= bool(torch.isfinite(k_).all())
                        err = max(err, float((a_.float() - k_.float()).norm() / a_.float().norm()))
        worst[str(dtype).replace("torch.", "")] = err
        log(f"fused step kernel vs reference, {dtype}: max relative error {err:.2e}")
    return dict(max_rel_error=worst, all_written=written)


def _median_seconds(fn, device, iters=20, warmup=3) -> float:
    """Median seconds per call: CUDA events on a GPU, the host clock elsewhere."""
    if torch.device(device).type == "cuda":
        return _time_cuda(fn, iters, warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_cuda(fn, iters=200, warmup=20) -> float:
    """Median seconds per call of ``fn`` (CUDA events around each of ``iters`` calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def kernel_speed(size=512, batches=(1, 4), dtype=torch.float16, device="cuda", log=print) -> dict:
    """One fused step launch against the unfused torch ops it replaces (the reference: CFG
    combine, denoised, update, input scaling), launched eagerly and inside CUDA graphs of 50
    steps (per-step time = graph time / 50)."""
    from sdrt.fastpath import step_table
    from sdrt.kernels import fused_step
    rows = {}
    row = torch.tensor(step_table("DPM++ 2M", np.array([10.0, 5.0, 1.0, 0.0]))[0][1], dtype=torch.float32,
                       device=device)
    for b in batches:
        shape = (4, size // 8, size // 8)
        out = torch.randn(2 * b, *shape, device=device).to(dtype)
        x, d_prev, noise = (torch.randn(b, *shape, device=device) for _ in range(3))
        x_in, scale = torch.empty_like(out), torch.full((b,), 7.0, device=device)
        res = {}
        for name, kernel in (("torch ops", False), ("fused kernel", True)):
            step = lambda: fused_step(out, x, d_prev, x_in, noise, row, scale, use_kernel=kernel)  # noqa: E731
            eager = _time_cuda(step)
            step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(50):
                    step()
            res[name] = dict(eager_s=eager, graph_s_per_step=_time_cuda(graph.replay, iters=50) / 50)
        rows[f"batch {b}"] = dict(res, speedup_eager=res["torch ops"]["eager_s"] / res["fused kernel"]["eager_s"],
                                  speedup_graph=res["torch ops"]["graph_s_per_step"]
                                  / res["fused kernel"]["graph_s_per_step"])
        log(f"fused step, batch {b}, {size}px: torch ops {1e6 * res['torch ops']['eager_s']:.1f} us, "
            f"kernel {1e6 * res['fused kernel']['eager_s']:.1f} us (x{rows[f'batch {b}']['speedup_eager']:.1f}); "
            f"in a graph x{rows[f'batch {b}']['speedup_graph']:.1f}")
    return rows


# SD 1.5 attention at 512x512 (latent 64x64): (query length, key length, head dim), 8 heads
SD15_ATTENTION = [(4096, 4096, 40), (4096, 77, 40), (1024, 1024, 80), (1024, 77, 80),
                  (256, 256, 160), (256, 77, 160), (64, 64, 160), (64, 77, 160)]


def attention_backends(batch=2, heads=8, dtype=torch.float16, device="cuda", log=print) -> dict:
    """PyTorch SDPA per backend (flash, cuDNN, memory-efficient, math) for Stable Diffusion's
    attention shapes: what a custom attention kernel would have to beat."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    rows = {}
    for lq, lk, d in SD15_ATTENTION:
        q = torch.randn(batch, heads, lq, d, device=device, dtype=dtype)
        k, v = (torch.randn(batch, heads, lk, d, device=device, dtype=dtype) for _ in range(2))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        row = {}
        for name, b in backends.items():
            try:
                with sdpa_kernel([b]):
                    out = F.scaled_dot_product_attention(q, k, v)
                    err = float((out.float() - ref).norm() / ref.norm())
                    row[name] = dict(seconds=_time_cuda(lambda: F.scaled_dot_product_attention(q, k, v), iters=50),
                                     rel_error=err)
            except RuntimeError as e:           # a backend that does not take this shape
                row[name] = dict(error=str(e).splitlines()[0][:200])
        if lk == 77:             # a whole cross-attention layer: SDPA with its transposes vs sdrt's kernel
            from sdrt.kernels import cross_attention, cross_attention_reference
            q_lin = q.transpose(1, 2).reshape(batch, lq, heads * d).contiguous()
            kc, vc = k.contiguous(), v.contiguous()
            ref_lin = cross_attention_reference(q_lin.float(), kc.float(), vc.float(), heads).float()

            def sdpa_layer():
                return F.scaled_dot_product_attention(q_lin.view(batch, lq, heads, d).transpose(1, 2), kc, vc) \
                    .transpose(1, 2).reshape(batch, lq, heads * d)
            for name, fn in (("sdpa layer", sdpa_layer), ("sdrt kernel", lambda: cross_attention(q_lin, kc, vc, heads))):
                try:
                    out = fn()
                    row[name] = dict(seconds=_time_cuda(fn, iters=50),
                                     rel_error=float((out.float() - ref_lin).norm() / ref_lin.norm()))
                except (RuntimeError, ValueError) as e:
                    row[name] = dict(error=str(e).splitlines()[0][:200])
        timed = {n: r["seconds"] for n, r in row.items() if "seconds" in r}
        best = min(timed, key=timed.get) if timed else None
        rows[f"q{lq} k{lk} d{d}"] = dict(row, fastest=best)
        log(f"attention q{lq} k{lk} d{d}: " + ", ".join(f"{n} {1e6 * t:.1f} us" for n, t in timed.items())
            + f" -> {best}")
    return rows


def unet_graph_seconds(model="random:sd15", size=512, batch=1, device="cuda", dtype="float16",
                       kv: bool | None = None, tune: dict | None = None) -> float:
    """Seconds per CFG UNet call replayed alone from a CUDA graph: the floor the loop's per-step
    time is compared with (loop overhead = step time - this). ``tune``: TorchBackend.tune
    options, reset afterwards; with ``compile`` among them (e.g. "default") the UNet compiles
    during the warm-up and the K/V cache is off (``kv`` defaults to on otherwise)."""
    from sdrt.backends import create_backend
    components = _load(model)
    be = create_backend("torch", components, device, dtype)
    compiling = bool((tune or {}).get("compile"))
    try:
        be.enable_kv_cache(not compiling if kv is None else kv)
        be.tune(**(tune or {}))
        return _unet_graph_time(be, components, size, batch)
    finally:
        be.enable_kv_cache(False)
        be.tune(**UNTUNED)


def _unet_graph_time(be, components, size: int, batch: int) -> float:
    """Seconds per CFG UNet call of backend ``be`` as it is tuned, replayed alone from a CUDA graph."""
    compiling = bool(be.options.get("compile"))
    with torch.inference_mode():
        x, t, ctx = _unet_inputs(components, be, size, batch)
        if be.kv is not None:
            be.kv.precompute([ctx])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3 if compiling else 1):      # compilation and autotuning happen here
                be.unet(x, t, ctx)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            be.unet(x, t, ctx)
        seconds = _time_cuda(graph.replay, iters=30, warmup=5)
    del graph
    return seconds


FP8_SHAPES = ((8192, 320, 320), (8192, 320, 2560), (32768, 640, 640), (32768, 1280, 10240))


def fp8_check(device="cuda", dtype=torch.float16, shapes=FP8_SHAPES, log=print) -> dict:
    """Float8Linear on this device against a float64 reference on fresh random inputs (relative
    error, every element written), and its speed against the float16 layer on SD 1.5's largest
    linear shapes at 512 px (rows = 2 x 4096 tokens at batch 1 and 4; eager and compiled)."""
    from sdrt.quantize import Float8Linear, check_fp8_device, quantize_rows
    check_fp8_device(device)
    g = torch.Generator().manual_seed(int(time.time()))
    rows = {}
    for m, k, n in shapes:
        lin = torch.nn.Linear(k, n).to(device, dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=g).to(device, dtype) * 0.05)
        x = torch.randn(m, k, generator=g).to(device, dtype)
        f8 = Float8Linear(lin)
        with torch.inference_mode():
            ref = x.double() @ lin.weight.double().t() + lin.bias.double()
            y = f8(x)
            err = (torch.linalg.norm(y.double() - ref) / torch.linalg.norm(ref)).item()
            if not torch.isfinite(y).all() or err > 0.08:
                raise AssertionError(f"Float8Linear {m}x{k}x{n}: relative error {err:.3g} (or non-finite)")
            fp16_s = _median_seconds(lambda: lin(x), device, iters=50, warmup=10)
            fp8_s = _median_seconds(lambda: f8(x), device, iters=50, warmup=10)
            comp = torch.compile(f8)
            fp8c_s = _median_seconds(lambda: comp(x), device, iters=50, warmup=10)
            # the float8 product alone (operands already quantized): per-row against one scale per tensor
            xq, sx = quantize_rows(x)
            one = torch.ones((), device=device)
            raw = {"rowwise": lambda: torch._scaled_mm(xq, f8.weight_fp8.t(), scale_a=sx, scale_b=f8.weight_scale,
                                                        out_dtype=f8.direct_dtype or torch.bfloat16),
                   "tensorwise": lambda: torch._scaled_mm(xq, f8.weight_fp8.t(), scale_a=one, scale_b=one,
                                                           out_dtype=dtype)}
            raw_s = {}
            for name, fn in raw.items():
                try:
                    raw_s[name] = _median_seconds(fn, device, iters=50, warmup=10)
                except RuntimeError as e:
                    raw_s[name] = f"{type(e).__name__}: {str(e)[:200]}"
        flops = 2 * m * k * n
        rows[f"{m}x{k}x{n}"] = dict(rel_err=err, fp16_s=fp16_s, fp8_s=fp8_s, fp8_compiled_s=fp8c_s,
                                    fp16_tflops=flops / fp16_s / 1e12, fp8_compiled_tflops=flops / fp8c_s / 1e12,
                                    speedup_compiled=fp16_s / fp8c_s, direct_output=f8.direct_dtype is not None,
                                    scaled_mm_s=raw_s)
        log(f"fp8 linear {m}x{k}x{n}: rel err {err:.2e}; {dtype} {1e6 * fp16_s:.0f} us, fp8 eager {1e6 * fp8_s:.0f} "
            f"us, compiled {1e6 * fp8c_s:.0f} us (x{fp16_s / fp8c_s:.2f}); the float8 product alone: "
            + ", ".join(f"{n} {1e6 * v:.0f} us" if isinstance(v, float) else f"{n} {v}" for n, v in raw_s.items())
            + f"; output written directly: {f8.direct_dtype is not None}")
    return rows


def quantized(model="random:sd15", size=512, steps=50, batch=4, device="cuda", dtype="float16", compile="default",
              repeat=3, log=print) -> dict:
    """sdrt's UNet as it is against its float8 linear layers (``tune(quantize="fp8")``), side by
    side: both on the static loop (with the fused step kernel on a GPU), channels_last, under
    ``torch.compile(compile)`` (None: the eager modules with the K/V cache). Seconds per
    generation and it/s (medians of ``repeat`` interleaved runs), the UNet alone (graph replay),
    and the float8 image's max abs difference and PSNR against the image of the same seed."""
    import sdrt
    from sdrt.backends import create_backend
    components = _load(model)
    kernel = torch.device(device).type == "cuda"
    args = dict(prompt=PROMPT, steps=steps, sampler="Euler", schedule="Uniform", seed=1, width=size, height=size,
                batch_size=batch, rng="cpu", cfg_scale=7.0)
    pipes = {}
    try:
        for name, q in ((dtype, False), ("fp8", "fp8")):
            be = create_backend("torch", components, device, dtype)
            be.tune(channels_last=True, compile=compile or False, quantize=q)
            be.enable_kv_cache(not compile)
            pipes[name] = sdrt.Pipeline(components, be)
            pipes[name].set_fast_path(use_kernel=kernel)
        unet = {name: _unet_graph_time(p.backend, components, size, batch) for name, p in pipes.items()}
        runs, pixels = {name: [] for name in pipes}, {}
        for name, p in pipes.items():
            p(**args)                                   # warm-up at full length: captures the loop
            log(f"{name}: warmed up")
        for i in range(repeat):
            for name, p in pipes.items():
                sync(device)
                t0 = time.perf_counter()
                pixels[name] = p(**args).pixels
                sync(device)
                runs[name].append(time.perf_counter() - t0)
                log(f"{name}: run {i + 1}/{repeat}: {runs[name][-1]:.3f} s")
    finally:
        for p in pipes.values():
            p.backend.enable_kv_cache(False)
            p.backend.tune(**UNTUNED)
    ref = pixels[dtype].astype(np.float64)
    mse = float(np.mean((pixels["fp8"] - ref) ** 2))
    rows = {}
    for name, ts in runs.items():
        med = statistics.median(ts)
        rows[name] = dict(median_s=med, runs=ts, it_per_s=steps / med, unet_alone_s=unet[name],
                          speedup=statistics.median(runs[dtype]) / med, unet_speedup=unet[dtype] / unet[name])
    rows["fp8"].update(max_abs_diff=float(np.abs(pixels["fp8"] - ref).max()),
                       psnr_db=float("inf") if mse == 0 else 10 * np.log10(1.0 / mse))
    log(f"float8 at batch {batch}: x{rows['fp8']['speedup']:.3f} end to end, x{rows['fp8']['unet_speedup']:.3f} "
        f"UNet alone ({1e3 * unet[dtype]:.2f} -> {1e3 * unet['fp8']:.2f} ms), PSNR {rows['fp8']['psnr_db']:.1f} dB")
    return dict(model=model, size=size, steps=steps, batch=batch, dtype=dtype, compile=compile, rows=rows)


def compiled_unet(model="random:sd15", size=512, batch=1, device="cuda", dtype="float16", mode="default",
                  inductor: dict | None = None, log=print) -> dict:
    """The UNet alone (graph replay, K/V cache off, channels_last) eager and under
    torch.compile(mode), side by side, with the compilation time. ``inductor``: settings of
    ``torch._inductor.config`` in force while it compiles (e.g. ``conv_1x1_as_mm=True``); the
    compiled code is then thrown away before and after, so neither the flags' code nor code
    compiled without them is reused by mistake."""
    from sdrt.backends import torch_backend
    base = dict(channels_last=True)
    eager = unet_graph_seconds(model, size, batch, device, dtype, kv=False, tune=base)
    if inductor:
        import torch._inductor.config as inductor_config
        flags = inductor_config.patch(inductor)          # an unknown setting raises on entry
    else:
        flags = contextlib.nullcontext()

    def forget():
        torch._dynamo.reset()
        torch_backend._COMPILED.clear()
    try:
        if inductor:
            forget()
        with flags:
            t0 = time.perf_counter()
            compiled = unet_graph_seconds(model, size, batch, device, dtype, kv=False, tune=dict(base, compile=mode))
            wall = time.perf_counter() - t0
            again = unet_graph_seconds(model, size, batch, device, dtype, kv=False, tune=dict(base, compile=mode))
    finally:
        if inductor:
            forget()
    eager2 = unet_graph_seconds(model, size, batch, device, dtype, kv=False, tune=base)
    e, c = min(eager, eager2), min(compiled, again)
    log(f"UNet batch {batch}, channels_last, no K/V cache: eager {1e3 * e:.2f} ms, torch.compile({mode}"
        f"{', ' + str(inductor) if inductor else ''}) {1e3 * c:.2f} ms: x{e / c:.3f} "
        f"(first compile + timing {wall:.0f} s)")
    return dict(mode=mode, inductor=inductor or {}, eager_s=e, compiled_s=c,
                runs=dict(eager=[eager, eager2], compiled=[compiled, again]), speedup=e / c, compile_and_time_s=wall)


CUDNN_FIRST = ("cudnn", "flash", "efficient", "math")
# name -> TorchBackend.tune options, measured on the UNet alone (graph replay)
LEVERS = {
    "baseline": {},
    "cudnn_benchmark": dict(cudnn_benchmark=True),
    "channels_last": dict(channels_last=True),
    "channels_last+cudnn_benchmark": dict(channels_last=True, cudnn_benchmark=True),
    "sdpa_cudnn_first": dict(sdpa_order=CUDNN_FIRST),
    "all": dict(channels_last=True, cudnn_benchmark=True, sdpa_order=CUDNN_FIRST),
}


def unet_levers(model="random:sd15", size=512, batch=1, device="cuda", dtype="float16", levers=None,
                log=print) -> dict:
    """Seconds per CFG UNet call (K/V once, graph replay) under each of ``LEVERS``, measured twice
    in rotation; the fastest lever and its gain over the baseline."""
    levers = levers or LEVERS
    times = {name: [] for name in levers}
    errors = {}
    for _ in range(2):
        for name, opts in levers.items():
            if name in errors:
                continue
            try:
                times[name].append(unet_graph_seconds(model, size, batch, device, dtype, tune=opts))
            except Exception as e:  # noqa: BLE001 - a lever that fails is reported, the others still run
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                log(f"UNet lever {name}: FAILED: {errors[name]}")
    rows = {name: dict(seconds=min(ts), runs=ts, tune=levers[name]) for name, ts in times.items() if ts}
    base = rows["baseline"]["seconds"]
    for r in rows.values():
        r["speedup"] = base / r["seconds"]
    best = min(rows, key=lambda n: rows[n]["seconds"])
    log(f"UNet levers, batch {batch}: " + ", ".join(f"{n} {1e3 * r['seconds']:.2f} ms" for n, r in rows.items())
        + f" -> {best} (x{rows[best]['speedup']:.3f})")
    return dict(rows=rows, best=best, best_tune=levers[best], errors=errors)


def decode_text_seconds(model="random:sd15", size=512, batch=1, device="cuda", dtype="float16") -> dict:
    """The per-generation work outside the denoising loop: the VAE decode replayed from a CUDA
    graph, and the text encoder (eager, cond + uncond) as the pipeline runs it."""
    from sdrt.backends import create_backend
    components = _load(model)
    be = create_backend("torch", components, device, dtype)
    f = components.latent_factor
    with torch.inference_mode():
        lat = torch.randn((batch, 4, size // f, size // f), device=device)
        ids = torch.randint(0, 49407, (2 * batch, 77), device="cpu")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            be.decode(lat)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            be.decode(lat)
        vae = _time_cuda(graph.replay, iters=10, warmup=3)
        text = _time_cuda(lambda: be.encode_text(ids), iters=20, warmup=3)
    return dict(vae_decode_s=vae, text_encode_s=text)


def main(argv=None) -> int:
    from sdrt.bench import write_result
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:sd15")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--peer", default=None, metavar="MODE",
                    help="only time diffusers compiled with MODE (peer_in_process) at --batches; JSON to --out")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    args = ap.parse_args(argv)
    if args.peer:               # the child of peer_subprocess: results as PEER-RESULT lines on stderr
        import json
        import sys

        def say(m):
            print(m, file=sys.stderr, flush=True)
        peer_in_process(args.model, args.size, args.steps, args.batches or [args.batch], args.device, args.dtype,
                        args.peer, args.repeat, on_batch=lambda r: say(_PEER_RESULT + json.dumps(r)), log=say)
        return 0
    record = dict(unet_kv=unet_step_kv(args.model, args.size, args.batch, args.device, args.dtype),
                  end_to_end=end_to_end(args.model, args.size, args.steps, args.batch, args.device, args.dtype,
                                        args.repeat, diffusers_ref=not args.no_diffusers))
    write_result(f"fastpath-{torch.device(args.device).type}", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
