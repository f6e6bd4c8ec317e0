"""The interrogator (issue 20), side by side in one run: the term lists' CLIP text features (the
one-time cost, then cached) and the latency of an interrogation, on sdrt's torch and ONNX
Runtime backends, with transformers' own BLIP ``generate`` (key/value cache) as the caption
reference, and the ``clip-interrogator`` package (0.6.0) on the same weights as the peer.

    python benchmarks/interrogator.py [--model random:interrogator] [--terms 1024] [--repeat 3]
                                      [--peer-site DIR]

Every list is cut to its first ``--terms`` terms (the web UI ranks each list's first 1500 only;
the whole 100,970 flavors through ViT-L's text tower take hours on a 2-core CPU), and the same
cut lists go to every side. ``--peer-site``: a folder where clip-interrogator's imports resolve
without breaking the CPU torch (open_clip needs torchvision, ftfy; see docs/interrogator.md):

    pip download --no-deps torchvision==0.28.0 -d /tmp/tv
    pip install --no-deps --target /tmp/tvsite /tmp/tv/torchvision-*.whl ftfy wcwidth

The peer runs in its own process (its torchvision must not enter sdrt's), with weights made
from the same seed (their hashes are compared). Writes benchmarks/results/interrogator-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def cut_lists(folder: Path, terms: int) -> Path:
    from sdrt.interrogator.terms import PACKAGE_LISTS, package_data
    folder.mkdir(parents=True, exist_ok=True)
    for name in PACKAGE_LISTS:
        lines = [x.strip() for x in (package_data() / f"{name}.txt").read_text(encoding="utf-8").splitlines()]
        (folder / f"{name}.txt").write_text("\n".join([x for x in lines if x][:terms]) + "\n", encoding="utf-8")
    return folder


def test_image(seed: int = 0, size: int = 512):
    from PIL import Image
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([np.sin(6 * x + seed), np.cos(5 * y), x * y], -1) * 0.4 + 0.5 + rng.normal(0, 0.05, (size, size, 3))
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def median_time(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run_sdrt(models, backend: str, lists: Path, repeat: int, images, device: str = "cpu") -> dict:
    from sdrt.interrogator import Interrogator, read_folder
    from sdrt.interrogator.towers import create_towers

    work = Path(tempfile.mkdtemp(prefix=f"sdrt-interrogator-{backend}-"))
    t0 = time.perf_counter()
    towers = create_towers(backend, models, device, engine_dir=work / "engines")
    ready = time.perf_counter() - t0
    it = Interrogator(models, towers, read_folder(lists), cache_dir=work / "features")
    t0 = time.perf_counter()
    per_list = it.warm()
    features_s = time.perf_counter() - t0
    computed = sum(len(t.items) for name, t in {**it.lists, **it.ci_tables()}.items()
                   if name in it.cache.built)
    out = {"backend": backend, "ready_s": ready, "features_s": features_s, "terms_computed": computed,
           "terms_per_s": computed / features_s, "per_list_s": per_list}
    reread = Interrogator(models, towers, read_folder(lists), cache_dir=work / "features")
    t0 = time.perf_counter()
    reread.warm()
    out["features_from_cache_s"] = time.perf_counter() - t0
    rows = []
    for img in images:
        caption_s, caption = median_time(lambda: it.caption(img), repeat)
        feats = it.image_features(img)
        image_s, _ = median_time(lambda: it.image_features(img), repeat)
        classic_s, classic = median_time(lambda: it.classic(feats, caption), repeat)
        fast_s, fast = median_time(lambda: it.fast(feats, caption), repeat)
        total_s, _ = median_time(lambda: it.interrogate(img, mode="classic"), repeat)
        rows.append({"caption_s": caption_s, "image_features_s": image_s, "classic_rank_s": classic_s,
                     "fast_rank_s": fast_s, "classic_total_s": total_s, "caption": caption, "classic": classic,
                     "fast": fast})
    out["images"] = rows
    for key in ("caption_s", "image_features_s", "classic_rank_s", "fast_rank_s", "classic_total_s"):
        out[key] = statistics.median(r[key] for r in rows)
    out["features"] = {name: it.table(name).features for name in ("flavors", "ci-artists")}
    return out


def transformers_caption(models, images, repeat: int, device: str = "cpu") -> dict:
    """transformers' BlipForConditionalGeneration.generate (its key/value cache) with the web UI's settings."""
    import torch

    from sdrt.interrogator import strip_prompt
    from sdrt.interrogator.core import CAPTION_PROMPT
    tok = models.blip_tokenizer
    ids = torch.tensor([tok(CAPTION_PROMPT).input_ids], device=device)
    times, captions = [], []
    for img in images:
        pixels = torch.from_numpy(models.blip_pixels(img)).to(device)

        def run():
            with torch.inference_mode():
                out = models.blip.generate(pixel_values=pixels, input_ids=ids.clone(), num_beams=1, min_length=24,
                                           max_length=48, do_sample=False)
            return strip_prompt(tok.decode(out[0], skip_special_tokens=True))
        t, caption = median_time(run, repeat)
        times.append(t)
        captions.append(caption)
    return {"caption_s": statistics.median(times), "captions": captions}


def gpu_section(model: str = "random:interrogator", device: str = "cuda", terms: int = 2048, repeat: int = 3,
                images: int = 2) -> dict:
    """The GPU suite's interrogator section (benchmarks/gpu/run.py): sdrt's torch towers on
    ``device`` (float32) against transformers' ``generate`` on the same modules: list features
    per second, the caption, a classic interrogation."""
    import torch

    from sdrt.backends import sync
    from sdrt.interrogator.models import load_models
    torch.set_grad_enabled(False)
    lists = cut_lists(Path(tempfile.mkdtemp(prefix="sdrt-lists-")), terms)
    models = load_models(model)
    pictures = [test_image(i) for i in range(images)]
    out = run_sdrt(models, "torch", lists, repeat, pictures, device=device)
    out.pop("features")
    sync(device)
    out["transformers_generate"] = transformers_caption(models, pictures, repeat, device=device)
    out["caption_vs_transformers"] = out["transformers_generate"]["caption_s"] / out["caption_s"]
    out["same_captions"] = [r["caption"] for r in out["images"]] == out["transformers_generate"]["captions"]
    return out


def peer(args) -> dict:
    """clip-interrogator 0.6.0 over the same weights (run in its own process with --peer-json)."""
    import types
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import torch
    from clip_interrogator import Config
    from clip_interrogator import Interrogator as CI
    from transformers import BlipImageProcessor, BlipProcessor

    from sdrt.export.interrogator import ClipImageGraph, ClipTextGraph
    from sdrt.interrogator.models import load_models

    models = load_models(args.model)

    class OpenClipLike(torch.nn.Module):
        """transformers' CLIPModel as open_clip's encode_image / encode_text (sdrt's own graphs)."""

        def __init__(self, clip):
            super().__init__()
            self.encode_image, self.encode_text = ClipImageGraph(clip), ClipTextGraph(clip)

    s = models.blip_size
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": s, "width": s}),
                              tokenizer=models.blip_tokenizer)
    cfg = Config(clip_model_name="ViT-L-14/openai", caption_model_name="blip-base", device="cpu", quiet=True,
                 cache_path=None, download_cache=False, data_path=args.lists)
    cfg.clip_model = OpenClipLike(models.clip).eval()
    cfg.clip_preprocess = lambda image: torch.from_numpy(models.clip_pixels(image)[0])
    cfg.caption_model, cfg.caption_processor = models.blip, processor
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    ci = CI(cfg)                   # computes every table's features
    features_s = time.perf_counter() - t0
    terms = sum(len(t.labels) for t in (ci.artists, ci.flavors, ci.mediums, ci.movements, ci.trendings, ci.negative))
    images = [test_image(i) for i in range(args.images)]
    rows = []
    for img in images:
        caption_s, caption = median_time(lambda: ci.generate_caption(img), args.repeat)
        feats = ci.image_to_features(img)
        classic_s, _ = median_time(lambda: ci.interrogate_classic(img, caption=caption), args.repeat)
        fast_s, fast = median_time(lambda: ci.interrogate_fast(img, caption=caption), args.repeat)
        image_s, _ = median_time(lambda: ci.image_to_features(img), args.repeat)
        rows.append({"caption_s": caption_s, "classic_s": classic_s, "fast_s": fast_s, "image_features_s": image_s,
                     "fast": fast, "caption": caption, "flavor_top": ci.flavors.rank(feats, 5)})
    return {"clip_hash": models.clip_hash, "features_s": features_s, "terms_computed": terms,
            "terms_per_s": terms / features_s, "images": rows,
            **{k: statistics.median(r[k] for r in rows) for k in ("caption_s", "classic_s", "fast_s",
                                                                  "image_features_s")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:interrogator")
    ap.add_argument("--terms", type=int, default=1024, help="each list cut to its first N terms")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--backends", default="torch,onnxruntime")
    ap.add_argument("--peer-site", default=None, help="a folder with clip-interrogator's extra imports (torchvision)")
    ap.add_argument("--lists", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--peer-json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer_json:
        print("PEER-JSON " + json.dumps(peer(args)))
        return 0

    import torch

    from sdrt.bench import write_result
    from sdrt.interrogator.models import load_models
    torch.set_grad_enabled(False)
    lists = cut_lists(Path(tempfile.mkdtemp(prefix="sdrt-lists-")), args.terms)
    t0 = time.perf_counter()
    models = load_models(args.model)
    load_s = time.perf_counter() - t0
    print(f"{args.model}: loaded in {load_s:.1f} s (CLIP {models.clip_hash}, BLIP {models.blip_hash})", flush=True)
    images = [test_image(i) for i in range(args.images)]
    result = {"model": args.model, "terms_per_list": args.terms, "repeat": args.repeat, "load_s": load_s,
              "backends": {}}
    features = {}
    for backend in args.backends.split(","):
        print(f"{backend}: building and timing ...", flush=True)
        r = run_sdrt(models, backend, lists, args.repeat, images)
        features[backend] = r.pop("features")
        result["backends"][backend] = r
        print(f"  ready {r['ready_s']:.1f} s; features {r['terms_computed']} terms in {r['features_s']:.1f} s "
              f"({r['terms_per_s']:.1f} terms/s), from cache {r['features_from_cache_s']:.2f} s; caption "
              f"{r['caption_s']:.3f} s, image features {r['image_features_s']:.3f} s, classic ranking "
              f"{r['classic_rank_s'] * 1e3:.1f} ms, fast ranking {r['fast_rank_s'] * 1e3:.1f} ms, classic total "
              f"{r['classic_total_s']:.3f} s", flush=True)
    if len(features) == 2:
        a, b = features.values()
        result["features_max_abs_diff"] = {k: float(np.abs(a[k] - b[k]).max()) for k in a}
        first, second = result["backends"].values()
        result["same_prompts"] = all(x["classic"] == y["classic"] and x["fast"] == y["fast"]
                                     for x, y in zip(first["images"], second["images"]))
    ref = transformers_caption(models, images, args.repeat)
    result["transformers_generate"] = ref
    print(f"transformers generate (KV cache): caption {ref['caption_s']:.3f} s", flush=True)
    if args.peer_site:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([args.peer_site, os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, __file__, "--peer-json", "--model", args.model, "--lists", str(lists),
               "--repeat", str(args.repeat), "--images", str(args.images)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("PEER-JSON ")), None)
        if line is None:
            result["clip_interrogator"] = {"error": proc.stderr[-2000:]}
            print("clip-interrogator: failed\n" + proc.stderr[-2000:], flush=True)
        else:
            p = result["clip_interrogator"] = json.loads(line[len("PEER-JSON "):])
            p["same_weights"] = p["clip_hash"] == models.clip_hash
            print(f"clip-interrogator 0.6.0: features {p['terms_computed']} terms in {p['features_s']:.1f} s "
                  f"({p['terms_per_s']:.1f} terms/s); caption {p['caption_s']:.3f} s (its settings), classic "
                  f"{p['classic_s']:.3f} s, fast {p['fast_s']:.3f} s (image features included)", flush=True)
    else:
        result["clip_interrogator"] = {"not_run": "no --peer-site (its imports need torchvision)"}
    write_result("interrogator", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
