"""VAE choice (the web UI's sd_vae / --vae): a VAE file in the original or diffusers' layout
replaces the model's VAE weights for the jobs that name it, "Automatic" brings the model's own
back bitwise, the infotext gets "VAE hash" and "VAE", and a VAE that does not fit is refused
with the model left as it was."""
import hashlib
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

import sdrt
from sdrt import infotext
from sdrt.checkpoints import _vae_to_ldm
from sdrt.models import RANDOM_MODELS, build_random
from sdrt.vae import VaeError

ARGS = dict(steps=3, seed=2, width=64, height=64)


def other_vae(seed=7, **changes):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**dict(RANDOM_MODELS["tiny"]["vae"], **changes)).eval()
        for m in vae.modules():                      # a random affine part, so the image differs visibly
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.data.add_(torch.randn_like(m.weight) * 0.3)
    return vae


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    vae = other_vae()
    # the original layout without a prefix (as vae-ft-mse-840000-ema-pruned.safetensors holds it)
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in _vae_to_ldm(vae).items()},
              str(d / "other.safetensors"))
    torch.save({"state_dict": {k: v for k, v in vae.state_dict().items()}}, d / "diffusers-layout.pt")
    wide = other_vae(block_out_channels=(8, 8, 16, 32))
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in _vae_to_ldm(wide).items()},
              str(d / "wide.safetensors"))
    return d, vae


@pytest.fixture(scope="module")
def pipe(folder):
    return sdrt.Pipeline.from_pretrained("random:tiny", vae_dir=folder[0])


def test_another_vae_and_back(pipe, folder):
    d, vae = folder
    own = {k: v.clone() for k, v in pipe.components.vae.state_dict().items()}
    plain = pipe("a cat", **ARGS)
    swapped = pipe("a cat", vae="other.safetensors", **ARGS)
    ref = build_random("tiny")
    ref.vae = vae
    want = sdrt.Pipeline(ref, sdrt.backends.create_backend("torch", ref, "cpu", "float32"))("a cat", **ARGS)
    assert np.abs(swapped.pixels - want.pixels).max() == 0.0
    assert np.abs(swapped.pixels - plain.pixels).max() > 0.01
    same = pipe("a cat", vae="diffusers-layout", **ARGS)                # diffusers' layout, by its stem
    assert np.abs(same.pixels - want.pixels).max() == 0.0
    back = pipe("a cat", **ARGS)
    assert np.abs(back.pixels - plain.pixels).max() == 0.0
    assert all(torch.equal(v, own[k]) for k, v in pipe.components.vae.state_dict().items())
    parsed = infotext.parse(swapped.infotexts[0])
    assert parsed["VAE"] == "other.safetensors"
    assert parsed["VAE hash"] == hashlib.sha256((d / "other.safetensors").read_bytes()).hexdigest()[:10]
    assert "VAE" not in infotext.parse(plain.infotexts[0])


def test_bad_vaes_are_refused_and_change_nothing(pipe, folder, tmp_path):
    own = {k: v.clone() for k, v in pipe.components.vae.state_dict().items()}
    with pytest.raises(VaeError, match="wide.safetensors.*does not fit this model's VAE.*another shape"):
        pipe("a cat", vae="wide", **ARGS)
    with pytest.raises(VaeError, match="'nope' was not found"):
        pipe("a cat", vae="nope", **ARGS)
    (tmp_path / "cut.safetensors").write_bytes((folder[0] / "other.safetensors").read_bytes()[:200])
    with pytest.raises(VaeError, match="cut.safetensors.*truncated or damaged"):
        pipe("a cat", vae=str(tmp_path / "cut.safetensors"), **ARGS)
    assert all(torch.equal(v, own[k]) for k, v in pipe.components.vae.state_dict().items())


def test_batcher_keeps_vaes_apart(folder):
    p = sdrt.Pipeline.from_pretrained("random:tiny", vae_dir=folder[0])
    want = [p("a cat", vae=v, **ARGS).pixels[0] for v in ("Automatic", "other.safetensors")]
    with sdrt.Batcher(p, max_batch_size=2, max_wait=0.5) as b:
        got = [f.result().pixels[0] for f in [b.submit(sdrt.Request("a cat", vae=v, **ARGS))
                                              for v in ("Automatic", "other.safetensors")]]
    assert all(np.abs(a - g).max() <= 1e-5 for a, g in zip(want, got))


def test_http_sd_vae(folder):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from sdrt.server import ServerConfig, ServerState, create_app
    state = ServerState(ServerConfig(vae_dir=str(folder[0]), max_wait=0.05))
    with TestClient(create_app(state=state)) as client:
        names = [v["model_name"] for v in client.get("/sdapi/v1/sd-vae").json()]
        assert names == ["diffusers-layout.pt", "other.safetensors", "wide.safetensors"]
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", **ARGS,
                                                   "override_settings": {"sd_vae": "other.safetensors"}})
        info = json.loads(r.json()["info"])
        assert info["sd_vae_name"] == "other.safetensors" and "VAE hash" in info["infotexts"][0]
        assert client.get("/sdapi/v1/options").json()["sd_vae"] == "Automatic"
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", **ARGS, "override_settings": {"sd_vae": "wide"}})
        assert r.status_code == 422 and "does not fit" in r.json()["detail"]
        assert client.post("/sdapi/v1/refresh-vae").status_code == 200
        r = client.post("/sdapi/v1/options", json={"sd_vae": "wide.safetensors"})
        assert r.status_code == 422 and "does not fit" in r.json()["detail"]
        assert client.post("/sdapi/v1/options", json={"sd_vae": "other.safetensors"}).status_code == 200
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", **ARGS})
        assert json.loads(r.json()["info"])["sd_vae_name"] == "other.safetensors"
    state.pool.close()


def test_cli_vae(folder, tmp_path):
    from PIL import Image

    from sdrt.cli import main
    out = tmp_path / "v.png"
    assert main(["generate", "a cat", "--steps", "2", "--vae-dir", str(folder[0]), "--vae", "other", "-o", str(out),
                 "-q"]) == 0
    assert "VAE: other.safetensors" in Image.open(out).text["parameters"]
    assert main(["generate", "a cat", "--steps", "2", "--vae", str(folder[0] / "other.safetensors"), "-o", str(out),
                 "-q"]) == 0
    assert main(["generate", "a cat", "--steps", "2", "--vae", "nope", "-o", str(out), "-q"]) == 2
