"""The GPU suite, one call of under 8 minutes on a machine with a CUDA GPU:

1. builds the kernels (nvcc, for this GPU) and checks the fused step kernel against the torch
   reference on fresh random inputs (float32 and float16, odd sizes, every table row);
2. times the fused step against the unfused torch ops it replaces (eager and in a graph), and
   PyTorch's SDPA backends on SD 1.5's attention shapes (what a custom kernel must beat);
3. per batch size: the UNet alone (graph replay) under each speed option of
   TorchBackend.tune (channels_last, cuDNN autotuning, SDPA backend order: fastpath.LEVERS);
   the VAE decode (graph) and text encoder alone;
4. end to end on random:sd15, 512x512, 50 steps, float16, batch 1 and 4, side by side:
   diffusers (eager, SDPA), sdrt's eager loop, the static loop as one CUDA graph with torch
   ops, with the fused kernel, and with the kernel + cross-attention K/V once per conditioning;
   it/s, ratios, max abs pixel difference against sdrt's eager image, diffusers' UNet alone;
   again with the fastest option from 3 where it gained over 2%; with --peer-compile MODE the
   strongest peer, after the batch sections, in its own process (fastpath.peer_subprocess: two
   owners of CUDA graphs in one process crashed it): diffusers with its documented recipe (its
   own UNet copy in channels_last, fused QKV, torch.compile(MODE, fullgraph=True)), end to end
   and its UNet alone, and the summary's ratio of sdrt's best to the best peer;
5. the loop's overhead outside the networks: graph-replay step time minus one UNet call
   replayed alone from a graph minus (VAE decode + text encoder) / steps;
6. with --compile MODE, per batch size (--compile-batches): the UNet alone eager against
   torch.compile(mode) (channels_last, no K/V cache), and end to end with the compiled UNet;
   with --fp8 [B ...], float8 linear layers (tune(quantize="fp8")) against float16 at those
   batch sizes, both compiled (fastpath.quantized): speed, and PSNR against the float16 image;
7. with --inductor KEY=VALUE ... (and --compile), last: the UNet alone at the largest batch
   compiled again with those torch._inductor.config settings (e.g. conv_1x1_as_mm=True
   coordinate_descent_tuning=True), against eager;
8. SDXL (random:sdxl, the real 2.6B-parameter UNet) at 1024x1024, 50 steps, batch 1, float16:
   diffusers' StableDiffusionXLPipeline, sdrt's eager loop and the static loop with the fused
   kernel (and K/V once per conditioning) side by side (``--sdxl-size``, ``--no-sdxl``);
9. the interrogator (random:interrogator, float32): term-list features per second, the caption
   against transformers' generate on the same modules, a classic interrogation
   (benchmarks/interrogator.py; ``--no-interrogator``).

Writes benchmarks/results/gpu-<card>-<date>.json and prints a summary table last.

    python benchmarks/gpu/run.py [--steps 50] [--repeat 3] [--batches 1 4] [--quick]
                                 [--compile MODE [--inductor KEY=VALUE ...]] [--compile-batches B ...]
                                 [--peer-compile MODE] [--fp8 [B ...]] [--only PREFIX ...] [--out DIR]

The sections run batch by batch (everything for batch 1, then batch 4, ...), then SDXL, then the
--inductor section; each is saved as it finishes, so a call cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"


def _fp8_pays(check: dict | None, device: str, log) -> bool:
    """The float8 end-to-end section runs when the float8 layer works and, on a GPU, its compiled
    layer beats float16 on the largest shape checked (else its compile minutes measure nothing new)."""
    if not check:
        return False
    if not str(device).startswith("cuda"):
        return True
    largest = max(check.values(), key=lambda r: r["fp16_s"])
    if largest["speedup_compiled"] <= 1.0:
        log(f"float8 end to end skipped: the compiled float8 layer ran x{largest['speedup_compiled']:.2f} of "
            f"float16 on the largest shape")
        return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--model", default="random:sd15")
    ap.add_argument("--quick", action="store_true", help="random:tiny, 64 px, 8 steps (a smoke run)")
    ap.add_argument("--compile", default=None, metavar="MODE",
                    help="also time the UNet under torch.compile(mode=MODE), e.g. default, alone and end to end, "
                         "per batch size (about a minute of compilation each on a 16-core host)")
    ap.add_argument("--compile-batches", type=int, nargs="+", default=None, metavar="B",
                    help="with --compile: the batch sizes to compile at (default: all of --batches)")
    ap.add_argument("--peer-compile", default=None, metavar="MODE",
                    help="also run diffusers compiled (channels_last, fused QKV, torch.compile(MODE)) in the "
                         "end-to-end sections, e.g. reduce-overhead (about a minute per batch size)")
    ap.add_argument("--fp8", type=int, nargs="*", default=None, metavar="B",
                    help="float8 linear layers against float16 (compiled with --compile's mode) at these batch "
                         "sizes (none given: all of --batches); needs compute capability 8.9+")
    ap.add_argument("--inductor", nargs="+", default=None, metavar="KEY=VALUE",
                    help="with --compile: also compile the UNet at the largest batch with these "
                         "torch._inductor.config settings (values are Python literals), last")
    ap.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                    help="end-to-end variants (benchmarks/fastpath.py VARIANTS; default all); eager always runs")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)   # cpu: tests, with a fake graph API
    ap.add_argument("--dtype", default="float16", help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="+", default=None, metavar="PREFIX",
                    help="run only the sections whose names start with one of these (e.g. kernel unet_graph)")
    ap.add_argument("--sdxl-size", type=int, default=1024, help="SDXL's end-to-end section: image size")
    ap.add_argument("--sdxl-steps", type=int, default=None, help="SDXL's steps (default: --steps)")
    ap.add_argument("--no-sdxl", dest="sdxl", action="store_false", help="leave out the SDXL section")
    ap.add_argument("--no-interrogator", dest="interrogator", action="store_false",
                    help="leave out the interrogator section")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/gpu/run.py: refusing to run: no CUDA GPU is visible on this machine "
              "(torch.cuda.is_available() is False); use benchmarks/fastpath.py on a CPU", file=sys.stderr)
        return 2
    sdxl_model = "random:sdxl"
    if args.quick:
        args.model, args.size, args.steps, args.repeat = "random:tiny", 64, 8, 1
        sdxl_model, args.sdxl_size = "random:sdxl-tiny", 64
    import fastpath

    from sdrt import kernels
    from sdrt.bench import machine, versions

    log = lambda m: print(m, file=sys.stderr, flush=True)   # noqa: E731
    variants = list(fastpath.VARIANTS)
    if args.variants:
        unknown = [v for v in args.variants if v not in fastpath.VARIANTS]
        if unknown:
            log(f"unknown variants {unknown}; valid: {', '.join(fastpath.VARIANTS)}")
            return 2
        variants = ["eager"] + [v for v in args.variants if v != "eager"]
    # under torch.compile the K/V cache is off: each variant without it
    inductor = {}
    for item in args.inductor or []:
        key, sep, value = item.partition("=")
        try:
            if not sep or not hasattr(torch._inductor.config, key):
                raise ValueError(key)
            inductor[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            log(f"--inductor {item}: give KEY=VALUE with a torch._inductor.config setting and a Python literal")
            return 2
    if inductor and not args.compile:
        log("--inductor needs --compile MODE")
        return 2
    compiled_variants = sorted({v.split("+kv")[0] for v in variants}, key=list(fastpath.VARIANTS).index)
    common = dict(model=args.model, size=args.size, device=args.device, dtype=args.dtype)
    t0 = time.perf_counter()
    record = dict(suite="gpu", card=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability(),
                  settings=vars(args), machine=machine(), versions=versions(), sections={}, errors={})

    card = re.sub(r"[^A-Za-z0-9]+", "-", record["card"]).strip("-").lower()
    stem = Path(args.out) / f"gpu-{card}-{datetime.date.today().isoformat()}"
    if args.only:
        stem = stem.with_name(stem.name + "-" + "-".join(re.sub(r"[^A-Za-z0-9_]+", "", p) for p in args.only))
    stem.parent.mkdir(parents=True, exist_ok=True)

    def save():
        record["wall_seconds"] = time.perf_counter() - t0
        Path(f"{stem}.json").write_text(json.dumps(record, indent=2, default=float))

    def section(name, fn):
        if args.only and not any(name.startswith(p) for p in args.only):
            return
        t = time.perf_counter()
        try:
            result = record["sections"][name] = fn()
            if isinstance(result, dict):    # e.g. one end-to-end variant that failed
                record["errors"].update({f"{name}/{part}": err for part, err in result.get("errors", {}).items()})
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others
            record["errors"][name] = f"{type(e).__name__}: {e}"
            log(f"{name}: FAILED: {record['errors'][name]}")
        log(f"{name}: {time.perf_counter() - t:.0f} s")
        save()                      # a run cut short by its time limit keeps what it measured

    compile_batches = args.compile_batches or args.batches
    fp8_batches = (args.fp8 or args.batches) if args.fp8 is not None else []
    section("fatbin", lambda: str(kernels.find_fatbin()))
    section("kernel_check", lambda: fastpath.kernel_check(log=log))
    section("kernel_speed", lambda: fastpath.kernel_speed(size=args.size, batches=args.batches, log=log))
    section("attention_backends", lambda: fastpath.attention_backends(log=log))
    if fp8_batches:                # the float8 layer alone first: its end-to-end sections need it working
        shapes = ((64, 32, 32), (96, 64, 128)) if args.quick else fastpath.FP8_SHAPES[1::2]
        section("fp8_check", lambda: fastpath.fp8_check(device=args.device, dtype=getattr(torch, args.dtype),
                                                        shapes=shapes, log=log))
    e2e = dict(common, steps=args.steps, repeat=args.repeat, log=log)
    for b in args.batches:
        section(f"unet_levers_batch{b}", lambda b=b: fastpath.unet_levers(batch=b, log=log, **common))
        section(f"decode_text_batch{b}", lambda b=b: fastpath.decode_text_seconds(batch=b, **common))
        section(f"end_to_end_batch{b}", lambda b=b: fastpath.end_to_end(
            batch=b, variants=variants, **e2e))
        levers = record["sections"].get(f"unet_levers_batch{b}")
        if levers and levers["best"] != "baseline" and levers["rows"][levers["best"]]["speedup"] > 1.02:
            # the levers that measurably helped the UNet, end to end (side by side with diffusers again)
            section(f"end_to_end_tuned_batch{b}", lambda b=b: fastpath.end_to_end(
                batch=b, variants=variants, tune=levers["best_tune"], **e2e))
        section(f"unet_graph_batch{b}", lambda b=b: fastpath.unet_graph_seconds(batch=b, **common))
        if args.compile and b in compile_batches:   # compilation takes about a minute per batch size
            section(f"compile_batch{b}", lambda b=b: fastpath.compiled_unet(batch=b, mode=args.compile, log=log,
                                                                             **common))
            section(f"end_to_end_compiled_batch{b}", lambda b=b: fastpath.end_to_end(
                batch=b, variants=compiled_variants, tune=dict(channels_last=True, compile=args.compile), **e2e))
        if b in fp8_batches and _fp8_pays(record["sections"].get("fp8_check"), args.device, log):
            section(f"fp8_batch{b}", lambda b=b: fastpath.quantized(
                batch=b, compile=args.compile, steps=args.steps, repeat=args.repeat, log=log, **common))
    if args.peer_compile:          # in its own process: see fastpath.peer_subprocess
        def partial(result):       # saved per batch size: a call cut short keeps what was measured
            record["sections"]["peer_compiled"] = result
            save()
        section("peer_compiled", lambda: fastpath.peer_subprocess(
            model=args.model, size=args.size, steps=args.steps, batches=compile_batches if args.compile else
            args.batches, device=args.device, dtype=args.dtype, mode=args.peer_compile, repeat=args.repeat,
            on_batch=partial, log=log))
    if args.sdxl:                  # SDXL at its own size, batch 1: the peers' headline configuration
        section("sdxl_end_to_end_batch1", lambda: fastpath.end_to_end(
            model=sdxl_model, size=args.sdxl_size, steps=args.sdxl_steps or args.steps, batch=1,
            variants=[v for v in variants if v in ("eager", "static-ops+kv", "static-kernel", "static-kernel+kv")],
            device=args.device, dtype=args.dtype, repeat=args.repeat, log=log))
    if args.interrogator:
        import interrogator as interrogator_bench  # benchmarks/interrogator.py
        section("interrogator", lambda: interrogator_bench.gpu_section(
            model="random:interrogator-tiny" if args.quick else "random:interrogator", device=args.device,
            terms=64 if args.quick else 2048, repeat=args.repeat, images=1 if args.quick else 2))
    if inductor:                   # after everything else: its compile time is the least known
        b = max(args.batches)
        section(f"compile_inductor_batch{b}", lambda: fastpath.compiled_unet(
            batch=b, mode=args.compile, inductor=inductor, log=log, **common))

    # summary: it/s and ratios; loop overhead = graph step time - UNet-alone graph time - (VAE
    # decode + text encoder) / steps
    lines = [f"{record['card']}  {args.model} {args.size}px {args.steps} steps {args.dtype}"]
    for b in args.batches:
        unet = record["sections"].get(f"unet_graph_batch{b}")
        other = record["sections"].get(f"decode_text_batch{b}")
        levers = record["sections"].get(f"unet_levers_batch{b}")
        if levers:
            lines.append(f"  batch {b} UNet levers: " + ", ".join(
                f"{n} x{r['speedup']:.3f}" for n, r in levers["rows"].items()))
        for key in (f"compile_batch{b}", f"compile_inductor_batch{b}"):
            c = record["sections"].get(key)
            if c:
                lines.append(f"  batch {b} UNet alone, torch.compile({c['mode']}) {c['inductor'] or ''}: "
                             f"{1e3 * c['compiled_s']:.2f} ms vs eager {1e3 * c['eager_s']:.2f} ms, "
                             f"x{c['speedup']:.3f}")
        keys = [f"end_to_end_batch{b}", f"end_to_end_tuned_batch{b}", f"end_to_end_compiled_batch{b}"]
        if b == 1:
            keys.append("sdxl_end_to_end_batch1")
        for key in keys:
            e2e = record["sections"].get(key)
            if not e2e:
                continue
            tag = f"tuned {e2e['tune']}" if e2e.get("tune") else "default options"
            if key.startswith("sdxl"):
                tag = f"SDXL {e2e['model']} {e2e['size']}px {e2e['steps']} steps"
            lines.append(f"  batch {b}, {tag}:")
            for name, row in e2e["rows"].items():
                lines.append(f"    {name:22s} {row['median_s']:7.3f} s {row['it_per_s']:7.1f} it/s "
                             f"x{row['speedup_vs_diffusers'] or 0:.2f} vs diffusers  "
                             f"max|diff| {row['max_abs_diff_vs_eager']:.1e}"
                             + (f"  UNet alone {1e3 * row['unet_alone_s']:.2f} ms" if "unet_alone_s" in row else ""))
            best = e2e["rows"].get("static-kernel+kv")
            if best and unet and key == f"end_to_end_batch{b}":
                step = best["median_s"] / args.steps
                outside = (other["vae_decode_s"] + other["text_encode_s"]) / args.steps if other else 0.0
                e2e["loop_overhead_fraction"] = max(0.0, step - unet - outside) / step
                lines.append(f"    UNet alone {1e3 * unet:.2f} ms/call, graph step {1e3 * step:.2f} ms, VAE + text "
                             f"{1e3 * outside:.2f} ms/step: loop overhead {100 * e2e['loop_overhead_fraction']:.2f}%")
        peer = (record["sections"].get("peer_compiled") or {}).get("batches", {}).get(str(b))
        if peer:
            ours = {f"{k}/{n}": r["median_s"] for k in (f"end_to_end_batch{b}", f"end_to_end_compiled_batch{b}")
                    for n, r in (record["sections"].get(k) or {}).get("rows", {}).items() if not n.startswith("diff")}
            eager = [r["median_s"] for k in (f"end_to_end_batch{b}", f"end_to_end_compiled_batch{b}")
                     for n, r in (record["sections"].get(k) or {}).get("rows", {}).items() if n == "diffusers"]
            lines.append(f"  batch {b}, diffusers compiled ({record['sections']['peer_compiled']['mode']}, own process): "
                         f"{peer['median_s']:.3f} s {peer['it_per_s']:.1f} it/s, UNet alone "
                         f"{1e3 * peer['unet_alone_s']:.2f} ms, max|diff| vs diffusers {peer['max_abs_diff_vs_diffusers']:.1e}")
            if ours:
                best = min(ours, key=ours.get)
                peer_best = min([peer["median_s"]] + eager)
                record.setdefault("versus_peers", {})[str(b)] = dict(sdrt_best=best, sdrt_s=ours[best],
                                                                    best_peer_s=peer_best, ratio=peer_best / ours[best])
                lines.append(f"    sdrt's best ({best}) x{peer_best / ours[best]:.2f} vs the best peer")
        q = record["sections"].get(f"fp8_batch{b}")
        if q:
            fp8 = q["rows"]["fp8"]
            lines.append(f"  batch {b}, float8 linear layers (compile {q['compile']}): {fp8['it_per_s']:.1f} it/s, "
                         f"x{fp8['speedup']:.3f} end to end, x{fp8['unet_speedup']:.3f} UNet alone vs "
                         f"{args.dtype}; PSNR {fp8['psnr_db']:.1f} dB, max|diff| {fp8['max_abs_diff']:.1e}")
    it = record["sections"].get("interrogator")
    if it:
        lines.append(f"  interrogator: list features {it['terms_per_s']:.0f} terms/s; caption {it['caption_s']:.3f} s "
                     f"(transformers generate x{it['caption_vs_transformers']:.2f}, same captions: "
                     f"{it['same_captions']}); classic {it['classic_total_s']:.3f} s")
    save()
    print("\n".join(lines + [f"errors: {record['errors']}" if record["errors"] else "no errors",
                             f"wrote {stem}.json in {record['wall_seconds']:.0f} s"]))
    return 1 if record["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
