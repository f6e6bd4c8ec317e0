"""LoRA as the web UI uses it (``<lora:NAME:M>``): merged weights equal diffusers' own merge
(``load_lora_weights`` + ``fuse_lora``) bitwise for the UNet, the text encoders equal the LoRA
formula, swaps restore the model bitwise, the batcher never mixes LoRA sets, the infotext carries
the web UI's ``Lora hashes``, and bad files leave the model exactly as it was."""
import hashlib
import json

import lora_files
import numpy as np
import pytest
import torch

import sdrt
from sdrt import infotext
from sdrt.lora import LoraError, LoraUse, split_extra_networks
from sdrt.models import build_random

ARGS = dict(steps=3, seed=11, width=64, height=64)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A folder with LoRAs for random:tiny (kohya layout, diffusers names, LoCon) and for
    random:sdxl-tiny (kohya layout, the original UNet's names, te1/te2), and a peft-layout one."""
    d = tmp_path_factory.mktemp("loras")
    (d / "sub").mkdir()
    tiny, xl = build_random("tiny"), build_random("sdxl-tiny")
    return d, {
        "detail": lora_files.kohya(tiny, d / "detail.safetensors", seed=1),
        "style": lora_files.kohya(tiny, d / "sub" / "style.safetensors", seed=2, conv=False),
        "unet_only": lora_files.kohya(tiny, d / "unet_only.safetensors", seed=3, text=False),
        "xl": lora_files.kohya(xl, d / "xl.safetensors", seed=4, ldm_names=True),
        "xl_unet": lora_files.kohya(xl, d / "xl_unet.safetensors", seed=5, ldm_names=True, text=False),
        "peft": lora_files.peft(tiny, d / "peft.safetensors"),
    }


@pytest.fixture(scope="module")
def pipe(loras):
    return sdrt.Pipeline.from_pretrained("random:tiny", lora_dir=loras[0])


def weights(c):
    return {f"{i}.{k}": v.clone() for i, m in enumerate(c.networks) for k, v in m.state_dict().items()}


def test_syntax():
    text, uses = split_extra_networks("a <lora:detail:0.8> cat, <lora:style:0.5:1.2> (red:1.1) <lyco:x:te=0.3>")
    assert text == "a  cat,  (red:1.1) "
    assert uses == (LoraUse("detail", 0.8, 0.8), LoraUse("style", 0.5, 1.2), LoraUse("x", 0.3, 0.3))
    assert split_extra_networks("<lora:a:unet=0.2>")[1] == (LoraUse("a", 1.0, 0.2),)
    for bad in ("<lora:a:big>", "<lora::1>", "<lora:a:nan>", "<hypernet:h:1>"):
        with pytest.raises(ValueError):
            split_extra_networks(bad)


def _diffusers_fused(kind, path, scale):
    import diffusers
    ref = build_random(kind)
    sched = diffusers.EulerDiscreteScheduler()
    if ref.is_sdxl:
        dp = diffusers.StableDiffusionXLPipeline(vae=ref.vae, text_encoder=ref.text_encoder, text_encoder_2=ref.text_encoder_2,
                                                 tokenizer=ref.tokenizer, tokenizer_2=ref.tokenizer_2, unet=ref.unet,
                                                 scheduler=sched)
    else:
        dp = diffusers.StableDiffusionPipeline(vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer,
                                               unet=ref.unet, scheduler=sched, safety_checker=None,
                                               feature_extractor=None, requires_safety_checker=False)
    dp.load_lora_weights(str(path))
    dp.fuse_lora(components=["unet"], lora_scale=scale)
    dp.unload_lora_weights()
    return ref


@pytest.mark.parametrize("kind, name", [("tiny", "unet_only"), ("sdxl-tiny", "xl_unet")])
def test_unet_equals_diffusers_merge_and_the_image_too(loras, kind, name):
    """kohya layout with diffusers' module names (SD 1.x, LoCon on a 3x3 convolution) and with the
    original UNet's names (SDXL, as kohya trains it): the merged UNet is bitwise diffusers'."""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (scripts/setup.sh test installs it)")
    folder, files = loras
    ours = sdrt.Pipeline.from_pretrained(f"random:{kind}", lora_dir=folder)
    got = ours(f"a cat <lora:{name}:0.7>", **ARGS)
    ref = _diffusers_fused(kind, folder / f"{name}.safetensors", 0.7)
    a, b = ours.components.unet.state_dict(), ref.unet.state_dict()
    original = build_random(kind).unet.state_dict()
    changed = [k for k in a if not torch.equal(b[k], original[k])]
    assert len(changed) == len(files[name]) and all(torch.equal(a[k], b[k]) for k in a)
    theirs = sdrt.Pipeline.from_pretrained(f"random:{kind}")
    theirs.components.unet.load_state_dict(b)
    assert np.abs(theirs("a cat", **ARGS).pixels - got.pixels).max() == 0.0


def test_text_encoder_is_the_lora_formula(pipe, loras):
    """W0 + te * alpha / rank * up @ down on each layer the file names (diffusers 0.42 cannot be the
    reference here: under transformers 5 it reports the text encoder's LoRA keys as unexpected and
    leaves the encoder unchanged)."""
    folder, files = loras
    base = {n: m.weight.clone() for n, m in pipe.components.text_encoder.named_modules() if hasattr(m, "weight")}
    pipe("a cat <lora:detail:0.5:1.5>", **ARGS)
    te = dict(pipe.components.text_encoder.named_modules())
    for (part, name), (down, up, alpha) in files["detail"].items():
        if part == "text_encoder":
            want = base[name] + 0.5 * alpha / down.shape[0] * (up @ down)
            assert torch.allclose(te[name].weight, want, atol=1e-6)
    pipe("a cat", **ARGS)


def test_swaps_restore_the_model_bitwise(pipe):
    before = weights(pipe.components)
    plain = pipe("a cat", **ARGS).pixels
    for prompt in ("<lora:detail:0.8> a cat", "<lora:style:1.3> a cat", "<lora:detail:0.2> <lora:style:-0.6> a cat",
                   "<lora:detail:0.8> a cat", "<lora:sub/style:1> a cat"):
        pipe(prompt, **ARGS)
    again = pipe("a cat", **ARGS).pixels             # no LoRA: the last set is taken out
    after = weights(pipe.components)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert np.abs(again - plain).max() == 0.0


def test_multipliers_per_network(pipe):
    base = weights(pipe.components)
    pipe("a cat <lora:detail:0.5:0>", **ARGS)          # text encoder only
    now = weights(pipe.components)
    unet_keys = [k for k in base if k.startswith("0.")]
    te_keys = [k for k in base if k.startswith("2.")]
    assert all(torch.equal(base[k], now[k]) for k in unet_keys)
    assert any(not torch.equal(base[k], now[k]) for k in te_keys)
    pipe("a cat <lora:detail:te=0:unet=1>", **ARGS)
    now = weights(pipe.components)
    assert all(torch.equal(base[k], now[k]) for k in te_keys)
    assert any(not torch.equal(base[k], now[k]) for k in unet_keys)
    pipe("a cat", **ARGS)


def test_infotext_lora_hashes(pipe, loras):
    folder, _ = loras
    r = pipe("a cat <lora:detail:0.8>, <lora:sub/style:0.5>", **ARGS)
    text = r.infotexts[0]
    assert text.startswith("a cat <lora:detail:0.8>, <lora:sub/style:0.5>")       # as written, as the web UI keeps it

    def addnet(path):                 # kohya's hash: the data after the safetensors header
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        return hashlib.sha256(raw[8 + n:]).hexdigest()[:12]
    parsed = infotext.parse(text)
    assert parsed["Lora hashes"] == (f"detail: {addnet(folder / 'detail.safetensors')}, "
                                     f"sub/style: {addnet(folder / 'sub' / 'style.safetensors')}")
    pipe("a cat", **ARGS)


def test_peft_layout(pipe, loras):
    folder, files = loras
    base = {n: m.weight.clone() for n, m in pipe.components.unet.named_modules() if hasattr(m, "weight")}
    pipe("a cat <lora:peft:2>", **ARGS)
    unet = dict(pipe.components.unet.named_modules())
    for (_, name), (down, up, _) in files["peft"].items():
        assert torch.allclose(unet[name].weight, base[name] + 2.0 * (up @ down), atol=1e-6)
    pipe("a cat", **ARGS)


def test_static_loop_sees_the_merged_weights(loras):
    p = sdrt.Pipeline.from_pretrained("random:tiny", lora_dir=loras[0])
    eager = [p(f"a cat {t}", sampler="DPM++ 2M", **ARGS).pixels for t in ("<lora:detail:1>", "")]
    p.set_fast_path(use_kernel=False)
    static = [p(f"a cat {t}", sampler="DPM++ 2M", **ARGS).pixels for t in ("<lora:detail:1>", "")]
    assert all(np.abs(a - b).max() <= 1e-5 for a, b in zip(eager, static))
    assert np.abs(eager[0] - eager[1]).max() > 0.01


def test_the_batcher_never_mixes_lora_sets(loras):
    p = sdrt.Pipeline.from_pretrained("random:tiny", lora_dir=loras[0])
    prompts = ["a cat <lora:detail:1>", "a cat", "a cat <lora:style:0.6>", "a cat <lora:detail:1>"]
    want = [p(t, **ARGS).pixels[0] for t in prompts]
    with sdrt.Batcher(p, max_batch_size=4, max_wait=0.5) as batcher:
        futures = [batcher.submit(sdrt.Request(t, **ARGS)) for t in prompts]
        got = [f.result().pixels[0] for f in futures]
        sizes = batcher.metrics["batch_size"]
    assert all(np.abs(a - b).max() <= 1e-5 for a, b in zip(want, got))
    assert sizes.count <= 3                    # the two "detail" requests may share a batch, nothing else


@pytest.mark.parametrize("prompt, message", [
    ("<lora:missing:1> a cat", "'missing' was not found.*available: "),
    ("<lora:xl:1> a cat", "a LoRA for SDXL; this model is not SDXL"),
    ("<lora:broken:1> a cat", "broken.safetensors.*truncated or damaged"),
    ("<lora:shapes:1> a cat", r"shapes.safetensors.*change for a weight of"),
])
def test_bad_loras_leave_the_model_as_it_was(pipe, loras, prompt, message):
    folder, _ = loras
    data = (folder / "detail.safetensors").read_bytes()
    (folder / "broken.safetensors").write_bytes(data[:len(data) // 3])
    from safetensors.torch import load_file, save_file
    wrong = load_file(str(folder / "detail.safetensors"))
    key = next(k for k in wrong if k.endswith("attn1_to_q.lora_down.weight"))
    wrong[key] = torch.zeros(4, 48)              # made for a model 48 channels wide
    wrong[key.replace("lora_down", "lora_up")] = torch.zeros(48, 4)
    save_file(wrong, str(folder / "shapes.safetensors"))
    pipe.loras.refresh()
    pipe("a cat <lora:detail:0.4>", **ARGS)
    before = weights(pipe.components)
    with pytest.raises(LoraError, match=message):
        pipe(prompt, **ARGS)
    after = weights(pipe.components)
    assert all(torch.equal(before[k], after[k]) for k in before)
    pipe("a cat", **ARGS)


def test_no_folder_and_compiled_backends(tmp_path):
    p = sdrt.Pipeline.from_pretrained("random:tiny")
    with pytest.raises(LoraError, match="no LoRA folder is set"):
        p("a cat <lora:x:1>", **ARGS)
    with pytest.raises(ValueError, match="is not a folder"):
        sdrt.Pipeline.from_pretrained("random:tiny", lora_dir=tmp_path / "nope")


def test_sdxl_two_text_encoders(loras):
    folder, files = loras
    p = sdrt.Pipeline.from_pretrained("random:sdxl-tiny", lora_dir=folder)
    base = {part: {n: m.weight.clone() for n, m in getattr(p.components, part).named_modules() if hasattr(m, "weight")}
            for part in ("text_encoder", "text_encoder_2")}
    p("a cat <lora:xl:0.6>", **ARGS)
    for (part, name), (down, up, alpha) in files["xl"].items():
        if part != "unet":
            got = dict(getattr(p.components, part).named_modules())[name].weight
            assert torch.allclose(got, base[part][name] + 0.6 * alpha / down.shape[0] * (up @ down), atol=1e-6)
    assert json.dumps(sorted({part for part, _ in files["xl"]})) == '["text_encoder", "text_encoder_2", "unet"]'


def test_http_lists_and_uses_loras(loras):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from sdrt.server import ServerConfig, ServerState, create_app
    folder, _ = loras
    state = ServerState(ServerConfig(lora_dir=str(folder), max_wait=0.05))
    with TestClient(create_app(state=state)) as client:
        listed = {x["name"] for x in client.get("/sdapi/v1/loras").json()}
        assert {"detail", "style", "xl", "peft"} <= listed
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat <lora:detail:0.7>", **ARGS})
        assert r.status_code == 200, r.text
        assert "Lora hashes" in json.loads(r.json()["info"])["infotexts"][0]
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat <lora:nothere:1>", **ARGS})
        assert r.status_code == 422 and "'nothere' was not found" in r.json()["detail"]
        (folder / "late.safetensors").write_bytes((folder / "detail.safetensors").read_bytes())
        assert "late" not in {x["name"] for x in client.get("/sdapi/v1/loras").json()}
        assert client.post("/sdapi/v1/refresh-loras").status_code == 200
        assert "late" in {x["name"] for x in client.get("/sdapi/v1/loras").json()}
    state.pool.close()


def test_onnxruntime_takes_the_merged_weights_without_a_rebuild(loras, tmp_path):
    """The graphs on disk stay as built: a LoRA set gets a session whose changed initializers are
    overridden (found by value); the images equal the torch backend's, and without LoRA the
    model's own session comes back."""
    folder, _ = loras
    ort = sdrt.Pipeline.from_pretrained("random:tiny", backend="onnxruntime", engine_dir=tmp_path, lora_dir=folder)
    ref = sdrt.Pipeline.from_pretrained("random:tiny", lora_dir=folder)
    plain = ort("a cat", **ARGS).pixels
    files = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    for prompt in ("a cat <lora:detail:0.8>", "a cat <lora:style:0.5:1.5>", "a cat <lora:peft:1>"):
        assert np.abs(ort(prompt, **ARGS).pixels - ref(prompt, **ARGS).pixels).max() <= 1e-4
    session, bindings = ort.backend.sessions["unet"], dict(ort.backend._bindings)
    ort("a cat <lora:peft:1>", **ARGS)                   # the same set again: the same session and bindings
    assert ort.backend.sessions["unet"] is session and ort.backend._bindings == bindings
    assert np.abs(ort("a cat", **ARGS).pixels - plain).max() == 0.0
    assert ort.backend.sessions["unet"] is ort.backend._own_sessions["unet"]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == files      # nothing rebuilt


def test_onnxruntime_refuses_a_lora_on_a_rewritten_convolution(loras, tmp_path):
    """A Winograd-rewritten 3x3 convolution holds no weight equal to the model's: a LoCon on it
    is refused with a clear error, and the next request runs normally."""
    from sdrt.export import Profile, build_onnxruntime
    folder, _ = loras
    c = build_random("tiny")
    manifest = build_onnxruntime(c, tmp_path, profile=Profile(height=(64, 64, 64), width=(64, 64, 64)))
    assert manifest["networks"]["unet"]["winograd"]
    ort = sdrt.Pipeline.from_pretrained("random:tiny", backend="onnxruntime", engine_dir=tmp_path, lora_dir=folder)
    with pytest.raises(ValueError, match="holds no weight equal to .*conv1.*no-winograd"):
        ort("a cat <lora:detail:1>", **ARGS)
    assert ort("a cat <lora:style:1>", **ARGS).images            # no convolution in that one
    assert ort("a cat", **ARGS).images


def test_make_networks_script(tmp_path):
    """scripts/make_networks.py writes a LoRA and an embedding a fresh clone can try."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("make_networks", Path(__file__).parent.parent / "scripts" / "make_networks.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["random:tiny", str(tmp_path)]) == 0
    p = sdrt.Pipeline.from_pretrained("random:tiny", lora_dir=tmp_path / "loras", embeddings_dir=tmp_path / "embeddings")
    r = p("a cat <lora:random-lora:0.7> random-emb", **ARGS)
    parsed = infotext.parse(r.infotexts[0])
    assert parsed["Lora hashes"].startswith("random-lora: ") and parsed["TI hashes"].startswith("random-emb: ")
    assert np.abs(r.pixels - p("a cat", **ARGS).pixels).max() > 0.01


def test_tensorrt_refits_the_engines(loras, tmp_path):
    """Refittable engines (built with REFIT) take the merged weights through TensorRT's Refitter,
    named after the ONNX initializers (checked against the real binding's names; run against the
    fake, whose engines compute with a private copy of the model that only a refit changes): the
    images equal the torch backend's, swaps back give the model's own image, and the static loop
    captures again after a refit. Engines built without REFIT are refused with the command to
    rebuild them. Nothing here runs real TensorRT."""
    import tensorrt_fake as fake

    from sdrt.backends.tensorrt_backend import TensorRTBackend
    from sdrt.export.tensorrt import BuildOptions, build_tensorrt
    folder, _ = loras
    ref = sdrt.Pipeline.from_pretrained("random:tiny", lora_dir=folder)
    c = build_random("tiny")
    build_tensorrt(c, tmp_path, profile=fake.PROFILE, options=BuildOptions(precision="fp32", refit=True),
                   trt=fake.module(), arch="sm_90", log=lambda m: None)
    fake.compute_with(c, sdrt.backends.create_backend("torch", c, "cpu", "float32"), frozen=True)
    be = TensorRTBackend(c, torch.device("cpu"), torch.float32, tmp_path, trt=fake.module(), arch="sm_90",
                         log=lambda m: None)
    trt = sdrt.Pipeline(c, be)
    trt.set_lora_dir(folder)
    plain = trt("a cat", **ARGS).pixels
    fake.CALLS.clear()
    for prompt in ("a cat <lora:detail:0.8>", "a cat <lora:style:0.5:1.2>"):
        assert np.abs(trt(prompt, **ARGS).pixels - ref(prompt, **ARGS).pixels).max() <= 1e-5
    refits = [call for call in fake.CALLS if call[0] == "refit_cuda_engine"]
    assert {call[1][0] for call in refits} == {"unet", "text_encoder"}
    before = len(fake.CALLS)
    trt("a cat <lora:style:0.5:1.2>", **ARGS)                     # the same set again: nothing to refit
    assert not [call for call in fake.CALLS[before:] if call[0] in ("Refitter", "refit_cuda_engine")]
    assert np.abs(trt("a cat", **ARGS).pixels - plain).max() <= 1e-6          # refitted back to the model's own
    # weights TensorRT combined at build time are asked for (get_missing_weights): the graph's own go in
    first = next(name for call in refits if call[1][0] == "unet" for name in call[1][1])
    fake.COMBINED_WEIGHTS.update({first: "unet.conv_in.weight"})
    try:
        fake.CALLS.clear()
        assert np.abs(trt("a cat <lora:detail:0.8>", **ARGS).pixels - ref("a cat <lora:detail:0.8>", **ARGS).pixels).max() <= 1e-5
        assert ("set_named_weights", ("unet", "unet.conv_in.weight")) in fake.CALLS
    finally:
        fake.COMBINED_WEIGHTS.clear()
    trt.set_fast_path(use_kernel=False)
    fast = trt("a cat <lora:detail:0.8>", sampler="DPM++ 2M", **ARGS).pixels
    assert np.abs(fast - ref("a cat <lora:detail:0.8>", sampler="DPM++ 2M", **ARGS).pixels).max() <= 1e-5

    plain_dir = tmp_path / "plain"
    build_tensorrt(c, plain_dir, profile=fake.PROFILE, options=BuildOptions(precision="fp32"),
                   trt=fake.module(), arch="sm_90", log=lambda m: None)
    be2 = TensorRTBackend(c, torch.device("cpu"), torch.float32, plain_dir, trt=fake.module(), arch="sm_90",
                          log=lambda m: None)
    p2 = sdrt.Pipeline(c, be2)
    p2.set_lora_dir(folder)
    with pytest.raises(ValueError, match="--refit"):
        p2("a cat <lora:detail:1>", **ARGS)
