"""POST /sdapi/v1/interrogate: the web UI's request and answer, through the test client and the
webuiapi client (a real HTTP server on a local port)."""
from __future__ import annotations

import base64
import io

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: scripts/setup.sh test installs it")
from fastapi.testclient import TestClient  # noqa: E402
from interrogator_files import image, write_lists  # noqa: E402 - tests/ is on the path
from live_server import live_server  # noqa: E402

import sdrt  # noqa: E402
from sdrt.server import ServerConfig, ServerState, create_app  # noqa: E402


def _b64(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def state(tiny, tmp_path_factory):
    lists = write_lists(tmp_path_factory.mktemp("lists"))
    mp = pytest.MonkeyPatch()
    mp.setenv("SDRT_CACHE", str(tmp_path_factory.mktemp("cache")))
    st = ServerState(ServerConfig(interrogator_lists=str(lists)), pipe=sdrt.Pipeline(tiny.components, tiny.backend))
    yield st
    st.engine.close()
    mp.undo()


@pytest.fixture(scope="module")
def client(state):
    with TestClient(create_app(state=state)) as c:
        yield c


def test_interrogate_answers_the_classic_prompt(client, state):
    img = image(2)
    r = client.post("/sdapi/v1/interrogate", json={"image": "data:image/png;base64," + _b64(img), "model": "clip"})
    assert r.status_code == 200, r.text
    caption = r.json()["caption"]
    # the same prompt as the library's classic mode with the server's lists
    lib = sdrt.Interrogator.from_pretrained("random:interrogator-tiny", lists=state.config.interrogator_lists)
    assert caption == lib.interrogate(img, mode="classic")
    assert r.json().keys() == {"caption"}


def test_interrogate_follows_the_webuis_options(client):
    img = _b64(image(3))
    r = client.post("/sdapi/v1/options", json={"interrogate_return_ranks": True, "interrogate_clip_dict_limit": 3})
    assert r.status_code == 200, r.text
    try:
        r = client.post("/sdapi/v1/interrogate", json={"image": img})
        assert r.status_code == 200 and r.json()["caption"].count(":") == 5        # (term:score) per list
    finally:
        client.post("/sdapi/v1/options", json={"interrogate_return_ranks": False, "interrogate_clip_dict_limit": 1500})
    r = client.post("/sdapi/v1/options", json={"interrogate_clip_num_beams": 0})
    try:
        r = client.post("/sdapi/v1/interrogate", json={"image": img})
        assert r.status_code == 422 and "num_beams" in r.json()["detail"]
    finally:
        client.post("/sdapi/v1/options", json={"interrogate_clip_num_beams": 1})


@pytest.mark.parametrize("body, status, text", [
    ({"image": "bm90IGFuIGltYWdl"}, 422, "not a readable image"),
    ({"image": _b64(image(0, 1, 1))}, 422, "too small"),
    ({"image": _b64(image(0).convert("CMYK"), "JPEG")}, 422, "pixel format"),
    ({"image": ""}, 422, "image"),
    ({"image": "/etc/hostname"}, 422, "not base64"),           # never a path on the server
    ({"image": "AAAA", "model": "deepdanbooru"}, 404, "Model not found"),
    ({"image": "AAAA", "model": "nothing"}, 404, "Model not found"),
])
def test_interrogate_refuses_bad_requests(client, body, status, text):
    r = client.post("/sdapi/v1/interrogate", json=body)
    assert r.status_code == status and text in r.json()["detail"], r.text


@pytest.mark.slow
def test_webuiapi_interrogate(state):
    webuiapi = pytest.importorskip("webuiapi")
    with live_server(create_app(state=state)) as port:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        img = image(4)
        r = api.interrogate(img)
        lib = sdrt.Interrogator.from_pretrained("random:interrogator-tiny", lists=state.config.interrogator_lists)
        assert r.info == lib.interrogate(img, mode="classic")


def test_a_misconfigured_interrogator_is_the_servers_error(tiny, tmp_path):
    st = ServerState(ServerConfig(interrogator_lists=str(tmp_path / "missing")),
                     pipe=sdrt.Pipeline(tiny.components, tiny.backend))
    try:
        with TestClient(create_app(state=st)) as c:
            r = c.post("/sdapi/v1/interrogate", json={"image": _b64(image(1))})
            assert r.status_code == 503 and "could not be loaded" in r.json()["detail"], r.text
            r = c.post("/sdapi/v1/options", json={"interrogate_clip_skip_categories": "movements"})
            r = c.post("/sdapi/v1/interrogate", json={"image": _b64(image(1))})
            assert r.status_code == 422 and "skip_categories" in r.json()["detail"], r.text
    finally:
        st.engine.close()


def test_options_list_the_interrogators_defaults(client):
    opts = client.get("/sdapi/v1/options").json()
    assert opts["interrogate_clip_num_beams"] == 1 and opts["interrogate_clip_min_length"] == 24
    assert opts["interrogate_clip_max_length"] == 48 and opts["interrogate_clip_dict_limit"] == 1500
    assert opts["interrogate_return_ranks"] is False and opts["interrogate_clip_skip_categories"] == []
