"""POST /sdapi/v1/img2img: the web UI's request over the pipeline's img2img, through the test
client and through the webuiapi client (over a real HTTP server on a local port)."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: scripts/setup.sh test installs it")
from fastapi.testclient import TestClient  # noqa: E402
from live_server import live_server  # noqa: E402 - tests/ is on the path

import sdrt  # noqa: E402
from sdrt.server import ServerConfig, ServerState, create_app  # noqa: E402

SMALL = {"steps": 6, "width": 64, "height": 64}


def _image(seed=0, w=64, h=64):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def b64png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture(scope="module")
def state(tiny):
    st = ServerState(ServerConfig(max_wait=0.05, max_images=8), pipe=sdrt.Pipeline(tiny.components, tiny.backend))
    yield st
    st.engine.close()


@pytest.fixture(scope="module")
def client(state):
    with TestClient(create_app(state=state)) as c:
        yield c


def test_img2img_returns_the_pipelines_images(client, tiny):
    init = _image(1)
    body = {"prompt": "a red boat", "init_images": ["data:image/png;base64," + b64png(init)], "seed": 5,
            "batch_size": 2, "denoising_strength": 0.6, "sampler_name": "Euler a", **SMALL}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert info["all_seeds"] == [5, 6] and info["denoising_strength"] == 0.6 and len(out["images"]) == 2
    assert out["parameters"]["init_images"] is None               # include_init_images is false
    want = tiny("a red boat", init_images=init, seed=5, batch_size=2, denoising_strength=0.6, sampler="Euler a",
                **SMALL)
    for i, b64 in enumerate(out["images"]):
        image = decode(b64)
        assert image.info["parameters"] == want.infotexts[i] and "Denoising strength: 0.6" in want.infotexts[i]
        assert np.abs(np.asarray(image, dtype=int) - np.asarray(want.images[i], dtype=int)).max() <= 1
    again = client.post("/sdapi/v1/img2img", json=dict(body, include_init_images=True, batch_size=1)).json()
    assert again["parameters"]["init_images"] == body["init_images"]


def test_several_images_set_the_batch(client):
    body = {"prompt": "x", "init_images": [b64png(_image(2)), b64png(_image(3))], "batch_size": 4, "seed": 1,
            **SMALL}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 2 and json.loads(r.json()["info"])["batch_size"] == 2
    r = client.post("/sdapi/v1/img2img", json=dict(body, batch_size=1))
    assert r.status_code == 422 and "2 images for batch_size 1" in r.json()["detail"]


@pytest.mark.parametrize("patch,message", [
    ({"init_images": []}, "init_images is empty"),
    ({"init_images": ["not base64 at all!"]}, "not base64"),
    ({"init_images": [base64.b64encode(b"GIF89a garbage").decode()]}, "not a readable image"),
    ({"init_images": ["data:image/png," + "abc"]}, "must be base64"),
    ({"latent_mask": "iVBORw0KGgo="}, "latent_mask"),
    ({"mask": "iVBORw0KGgo="}, "mask: not a readable image"),
    ({"mask_blur_x": 2, "mask_blur_y": 6, "mask": "x"}, "differ"),
    ({"image_cfg_scale": 3.0}, "instruct-pix2pix"),
    ({"denoising_strength": 1.5}, "denoising_strength must be in"),
    ({"resize_mode": 9}, "resize_mode 9 is unknown"),
])
def test_bad_img2img_requests_are_422(client, patch, message):
    body = {"prompt": "x", "init_images": [b64png(_image())], **SMALL, **patch}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [b64png(_image())],
                                                  **SMALL}).status_code == 200


def test_inpainting_over_http(client, tiny):
    init = _image(7)
    mask = Image.new("L", (64, 64))
    mask.paste(255, (0, 0, 32, 64))
    body = {"prompt": "a boat", "init_images": [b64png(init)], "mask": b64png(mask), "mask_blur": 0, "seed": 2,
            "inpainting_fill": 1, "inpaint_full_res": False, **SMALL}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    image = decode(r.json()["images"][0])
    assert np.array_equal(np.asarray(image)[:, 32:], np.asarray(init)[:, 32:])
    want = tiny("a boat", init_images=init, mask=mask, mask_blur=0, seed=2, inpainting_fill=1, inpaint_full_res=False,
                sampler="Euler", **SMALL)
    assert image.info["parameters"] == want.infotexts[0]
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(want.images[0], dtype=int)).max() <= 1


def test_a_tiny_image_is_refused_with_its_size(client):
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [b64png(_image(0, 1, 1))], **SMALL})
    assert r.status_code == 422 and "1x1 is too small" in r.json()["detail"]


@pytest.mark.slow
def test_webuiapi_img2img(state):
    webuiapi = pytest.importorskip("webuiapi")
    with live_server(create_app(state=state)) as port:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        r = api.img2img(images=[_image(4)], prompt="a lighthouse", seed=9, denoising_strength=0.5,
                        sampler_name="Euler", **SMALL)
        assert r.image.size == (64, 64) and r.info["denoising_strength"] == 0.5
        assert "Denoising strength: 0.5" in r.image.info["parameters"]
        mask = Image.new("L", (64, 64))
        mask.paste(255, (16, 16, 48, 48))
        r = api.img2img(images=[_image(5)], mask_image=mask, prompt="a lighthouse", seed=9, inpainting_fill=1,
                        **SMALL)
        assert r.image.size == (64, 64) and "Mask blur: 4" in r.image.info["parameters"]
        up = api.extra_single_image(image=r.image, upscaler_1="Lanczos", upscaling_resize=1.5)
        assert up.image.size == (96, 96)
        info = api.png_info(r.image)
        assert info.info == r.image.info["parameters"]
        hr = api.txt2img(prompt="a lighthouse", seed=1, enable_hr=True, hr_scale=1.5, denoising_strength=0.5,
                         sampler_name="Euler", **SMALL)
        assert hr.image.size == (96, 96) and "Hires upscale: 1.5" in hr.image.info["parameters"]


def test_image_routes_take_larger_bodies(client):
    big = b64png(_image(5, 900, 900))                       # random pixels: a PNG of about 3 MB
    assert len(big) > 2 << 20
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [big], **SMALL})
    assert r.status_code == 200, r.text[:300]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "padding": big, **SMALL})
    assert r.status_code == 413 and "on this route" in r.json()["detail"]
