"""The Extras upscaling (sdrt.upscale) and its routes: the web UI's sizes and modes, the info it
writes, bad input, and that an HTTP client cannot make the server read a file by its path."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from sdrt.upscale import extras, upscale


def _image(w=40, h=30, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def b64png(image, text=None) -> str:
    from PIL.PngImagePlugin import PngInfo
    meta = PngInfo()
    if text:
        meta.add_text("parameters", text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("name", ["None", "Lanczos", "Nearest"])
def test_upscale_sizes_are_rounded_down_to_8(name):
    out = upscale(_image(), 2.5, name)
    assert out.size == (96, 72)                       # 100 x 75, rounded down to a multiple of 8
    if name == "Nearest":                             # nearest by 2.5, then Lanczos to the rounded size
        ref = _image().resize((100, 75), resample=Image.Resampling.NEAREST).resize((96, 72), Image.Resampling.LANCZOS)
        assert np.array_equal(np.asarray(out), np.asarray(ref))
    with pytest.raises(ValueError, match="'R-ESRGAN 4x\\+' is not available"):
        upscale(_image(), 2, "R-ESRGAN 4x+")


def test_extras_modes_and_info():
    out, info = extras(_image(), resize_mode=0, upscaling_resize=2, upscaler_1="Lanczos")
    assert out.size == (80, 56) and info == {"Postprocess upscale by": 2, "Postprocess upscaler": "Lanczos"}
    out, info = extras(_image(), resize_mode=1, upscaling_resize_w=64, upscaling_resize_h=64, upscaling_crop=True,
                       upscaler_1="Lanczos", upscaler_2="Nearest", extras_upscaler_2_visibility=0.5)
    assert out.size == (64, 64)
    assert info["Postprocess upscale to"] == "64x64" and info["Postprocess crop to"] == "64x64"
    assert info["Postprocess upscaler 2"] == "Nearest"
    with pytest.raises(ValueError, match="resize_mode 3"):
        extras(_image(), resize_mode=3)
    with pytest.raises(ValueError, match="visibility"):
        extras(_image(), extras_upscaler_2_visibility=2)


pytest.importorskip("fastapi", reason="the serve extra is not installed")


@pytest.fixture(scope="module")
def client(tiny):
    from fastapi.testclient import TestClient

    import sdrt
    from sdrt.server import ServerConfig, ServerState, create_app
    state = ServerState(ServerConfig(max_wait=0.0, max_images=4), pipe=sdrt.Pipeline(tiny.components, tiny.backend))
    with TestClient(create_app(state=state)) as c:
        yield c
    state.engine.close()


def test_extra_single_image_keeps_the_infotext(client):
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64png(_image(), "a cat\nSteps: 4"),
                                                           "upscaling_resize": 2, "upscaler_1": "Lanczos"})
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(base64.b64decode(r.json()["image"])))
    assert out.size == (80, 56) and out.info["parameters"] == "a cat\nSteps: 4"
    assert "Postprocess upscaler: Lanczos" in out.info["postprocessing"] and "Lanczos" in r.json()["html_info"]


def test_extra_batch_images(client):
    files = [{"data": b64png(_image(seed=i)), "name": f"{i}.png"} for i in range(3)]
    r = client.post("/sdapi/v1/extra-batch-images", json={"imageList": files, "upscaling_resize": 1.6})
    assert r.status_code == 200 and len(r.json()["images"]) == 3
    r = client.post("/sdapi/v1/extra-batch-images", json={"imageList": files * 2})
    assert r.status_code == 422 and "at most 4" in r.json()["detail"]


@pytest.mark.parametrize("body,message", [
    ({"image": "bm90IGFuIGltYWdl"}, "not a readable image"),
    ({"image": b64png(_image()), "upscaler_1": "4x-UltraSharp"}, "not available"),
    ({"image": b64png(_image()), "gfpgan_visibility": 0.5}, "face restoration"),
    ({"image": b64png(_image()), "upscaling_resize": 500}, "upscaling_resize must be in"),
])
def test_bad_extras_requests(client, body, message):
    r = client.post("/sdapi/v1/extra-single-image", json=body)
    assert r.status_code == 422 and message in r.json()["detail"], r.text


def test_the_server_never_reads_a_path_it_is_sent(client, tmp_path):
    secret = tmp_path / "secret.png"
    _image().save(secret)
    for route, body in [("/sdapi/v1/extra-single-image", {"image": str(secret)}),
                        ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [str(secret)], "steps": 2, "width": 64,
                                               "height": 64})]:
        r = client.post(route, json=body)
        assert r.status_code == 422 and "not base64" in r.json()["detail"], r.text


def test_lists_of_upscalers(client):
    assert [u["name"] for u in client.get("/sdapi/v1/upscalers").json()] == ["None", "Lanczos", "Nearest"]
    assert client.get("/sdapi/v1/latent-upscale-modes").json()[0] == {"name": "Latent"}
