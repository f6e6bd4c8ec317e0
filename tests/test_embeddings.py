"""Textual-inversion embeddings as the web UI uses them: a file's name in the prompt stands for its
vectors; the conditioning equals diffusers' ``load_textual_inversion`` (SD 1.x and SDXL's clip_l /
clip_g pairs), vectors keep to one 75-token window and take the text's weight, files that do not
fit the model are skipped as in the web UI, and the infotext gets ``TI hashes``."""
import copy
import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdrt
from sdrt import infotext
from sdrt.conditioning import tokenize_with_embeddings
from sdrt.models import build_random

ARGS = dict(steps=3, seed=4, width=64, height=64)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(0)
    torch.save({"string_to_param": {"*": torch.randn(3, 32, generator=g) * 0.5}, "name": "myemb", "step": 100},
               d / "myemb.pt")
    save_file({"emb_params": torch.randn(2, 32, generator=g)}, str(d / "two-vec.safetensors"))
    save_file({"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 32, generator=g)},
              str(d / "xlemb.safetensors"))
    torch.save({"<wide>": torch.randn(768, generator=g)}, d / "wide.bin")          # a diffusers concept for SD 1.5
    (d / "cut.pt").write_bytes((d / "myemb.pt").read_bytes()[:100])
    return d


@pytest.fixture(scope="module")
def pipe(folder):
    return sdrt.Pipeline.from_pretrained("random:tiny", embeddings_dir=folder)


def test_loaded_and_skipped_as_the_web_ui_lists_them(pipe):
    lib = pipe.embeddings
    assert sorted(lib.loaded) == ["myemb", "two-vec"]
    assert "width 768" in lib.skipped["wide"] and "32+32" in lib.skipped["xlemb"]
    assert "cut.pt" in lib.skipped["cut"]
    listing = lib.listing()
    assert listing["loaded"]["myemb"]["vectors"] == 3 and listing["loaded"]["myemb"]["shape"] == 32
    assert set(listing["skipped"]) == {"wide", "xlemb", "cut"}


def test_equals_diffusers_load_textual_inversion(pipe, folder):
    import diffusers
    prompt = "a photo of myemb on a table"
    job = pipe.validate(sdrt.GenerationParams(prompt, **ARGS))
    ours = pipe.encode(job).conds[0][0][1][0][1]
    assert job.embeddings_used == {"myemb"}
    c = build_random("tiny")
    ref = diffusers.StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=copy.deepcopy(c.tokenizer),
                                            unet=c.unet, scheduler=diffusers.EulerDiscreteScheduler(), safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)
    vec = torch.load(folder / "myemb.pt", weights_only=True)["string_to_param"]["*"]
    ref.load_textual_inversion({"myemb": vec}, token="myemb")
    want = ref.encode_prompt(prompt, "cpu", 1, False)[0][0]
    assert torch.equal(want, ours)


def test_sdxl_pairs_equal_diffusers(folder):
    import diffusers
    xl = sdrt.Pipeline.from_pretrained("random:sdxl-tiny", embeddings_dir=folder)
    assert sorted(xl.embeddings.loaded) == ["xlemb"]
    prompt = "a xlemb house"
    job = xl.validate(sdrt.GenerationParams(prompt, **ARGS))
    ctx = xl.encode(job).conds[0][0][1][0][1]           # (77 + 1, 64): text, then the pooled row
    c = build_random("sdxl-tiny")
    ref = diffusers.StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                                              tokenizer=copy.deepcopy(c.tokenizer), tokenizer_2=copy.deepcopy(c.tokenizer_2),
                                              unet=c.unet, scheduler=diffusers.EulerDiscreteScheduler())
    from safetensors.torch import load_file
    pair = load_file(str(folder / "xlemb.safetensors"))
    ref.load_textual_inversion(pair["clip_l"], token="xlemb", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(pair["clip_g"], token="xlemb", text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    embeds, _, pooled, _ = ref.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(ctx[:77], embeds[0], atol=1e-6) and torch.allclose(ctx[77, :32], pooled[0], atol=1e-6)


def test_vectors_keep_to_one_window_and_take_the_weight(pipe):
    tok = pipe.components.tokenizer
    words = " ".join(["red"] * 74)
    windows, fixes = tokenize_with_embeddings(tok, f"{words} (myemb:1.3)", embeddings=pipe.embeddings)
    assert len(windows) == 2 and fixes == [(1, 1, "myemb")]       # 74 + 3 > 75: all three move on
    ids, weights = windows[1]
    assert ids[1:4] == [0, 0, 0] and weights[1:4] == [1.3, 1.3, 1.3]
    # a comma in the last 20 tokens moves the text after it, and the embedding with its placeholders
    text = " ".join(["red"] * 60) + ", a myemb " + " ".join(["blue"] * 20)
    windows, fixes = tokenize_with_embeddings(tok, text, embeddings=pipe.embeddings)
    assert fixes == [(1, 2, "myemb")] and windows[1][0][2:5] == [0, 0, 0]


def test_images_and_ti_hashes(pipe, folder):
    with_emb = pipe("a photo of myemb", negative_prompt="two-vec", **ARGS)
    plain = pipe("a photo of something", negative_prompt="", **ARGS)
    assert np.abs(with_emb.pixels - plain.pixels).max() > 0.01
    parsed = infotext.parse(with_emb.infotexts[0])
    digest = {n: hashlib.sha256((folder / f).read_bytes()).hexdigest()[:12]
              for n, f in (("myemb", "myemb.pt"), ("two-vec", "two-vec.safetensors"))}
    assert parsed["TI hashes"] == f"myemb: {digest['myemb']}, two-vec: {digest['two-vec']}"
    assert "TI hashes" not in infotext.parse(plain.infotexts[0])


def test_a_pickle_that_runs_code_is_skipped_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"string_to_param": {"*": Evil()}}, f)
    p = sdrt.Pipeline.from_pretrained("random:tiny", embeddings_dir=tmp_path)
    assert "evil" in p.embeddings.skipped and not marker.exists()


def test_onnxruntime_reads_the_vectors_without_a_rebuild_of_its_text_encoder(pipe, folder, tmp_path):
    """The first prompt that names an embedding builds a second text-encoder graph that takes token
    embeddings as an input (the model's own graph stays); the images equal the torch backend's."""
    ort = sdrt.Pipeline.from_pretrained("random:tiny", backend="onnxruntime", engine_dir=tmp_path,
                                        embeddings_dir=folder)
    own = (tmp_path / "text_encoder.onnx").stat().st_mtime_ns
    for prompt in ("a photo of (myemb:1.2)", "two-vec " + "long " * 80 + " myemb"):
        assert np.abs(ort(prompt, **ARGS).pixels - pipe(prompt, **ARGS).pixels).max() <= 1e-4
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert "text_encoder_embeds" in manifest["networks"]
    assert (tmp_path / "text_encoder.onnx").stat().st_mtime_ns == own
    assert np.abs(ort("a cat", **ARGS).pixels - pipe("a cat", **ARGS).pixels).max() <= 1e-4


def test_http_lists_and_refreshes(folder, tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from sdrt.server import ServerConfig, ServerState, create_app
    d = tmp_path / "emb"
    d.mkdir()
    (d / "myemb.pt").write_bytes((folder / "myemb.pt").read_bytes())
    state = ServerState(ServerConfig(embeddings_dir=str(d), max_wait=0.05))
    with TestClient(create_app(state=state)) as client:
        assert list(client.get("/sdapi/v1/embeddings").json()["loaded"]) == ["myemb"]
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a myemb", **ARGS})
        assert "TI hashes" in json.loads(r.json()["info"])["infotexts"][0]
        (d / "two-vec.safetensors").write_bytes((folder / "two-vec.safetensors").read_bytes())
        assert client.post("/sdapi/v1/refresh-embeddings").status_code == 200
        assert sorted(client.get("/sdapi/v1/embeddings").json()["loaded"]) == ["myemb", "two-vec"]
    state.pool.close()


@pytest.mark.parametrize("kind, prompt", [("tiny", "a photo of (myemb:1.2), two-vec"), ("sdxl-tiny", "a xlemb house")])
def test_tensorrt_builds_an_embeds_engine_on_first_use(folder, tmp_path, kind, prompt):
    """TensorRT (the fake; nothing here runs real TensorRT): the first prompt naming an embedding
    builds NAME_embeds engines into the folder, which take the token embeddings as an input; the
    images equal the torch backend's."""
    import tensorrt_fake as fake

    from sdrt.backends.tensorrt_backend import TensorRTBackend
    from sdrt.export.tensorrt import BuildOptions, build_tensorrt
    ref = sdrt.Pipeline.from_pretrained(f"random:{kind}", embeddings_dir=folder)
    c = build_random(kind)
    build_tensorrt(c, tmp_path, profile=fake.PROFILE, options=BuildOptions(precision="fp32"), trt=fake.module(),
                   arch="sm_90", log=lambda m: None)
    fake.compute_with(c, sdrt.backends.create_backend("torch", c, "cpu", "float32"))
    be = TensorRTBackend(c, torch.device("cpu"), torch.float32, tmp_path, trt=fake.module(), arch="sm_90",
                         log=lambda m: None)
    trt = sdrt.Pipeline(c, be)
    trt.set_embeddings_dir(folder)
    assert np.abs(trt(prompt, **ARGS).pixels - ref(prompt, **ARGS).pixels).max() <= 1e-5
    built = json.loads((tmp_path / "manifest.json").read_text())["networks"]
    assert "text_encoder_embeds" in built and (kind == "tiny") != ("text_encoder_2_embeds" in built)
    assert np.abs(trt("a cat", **ARGS).pixels - ref("a cat", **ARGS).pixels).max() <= 1e-5
