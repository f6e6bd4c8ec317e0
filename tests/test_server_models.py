"""A server with a folder of checkpoints (the web UI's --ckpt-dir): /sdapi/v1/sd-models lists them in
the web UI's shape, sd_model_checkpoint picks one per request (override_settings) or for the
server (POST /sdapi/v1/options), each loads once, and at most max_models stay loaded."""
import hashlib
import json

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed: scripts/setup.sh test installs it")
from fastapi.testclient import TestClient  # noqa: E402

from sdrt.checkpoints import save_single_file  # noqa: E402
from sdrt.models import build_random  # noqa: E402
from sdrt.server import ServerConfig, ServerState, create_app  # noqa: E402

SMALL = {"steps": 3, "width": 64, "height": 64, "seed": 5}


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "cache"))
    models = tmp_path / "models"
    a = save_single_file(build_random("tiny"), models / "a.safetensors", dtype=torch.float32)
    b = save_single_file(build_random("sd2-tiny"), models / "sub" / "b.ckpt", dtype=torch.float32)
    state = ServerState(ServerConfig(model=str(a), models_dir=str(models), max_models=1, max_wait=0.05))
    with TestClient(create_app(state=state)) as client:
        yield client, state, {"a": a, "b": b}, models
    state.pool.close()


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def info(r):
    assert r.status_code == 200, r.text
    return json.loads(r.json()["info"])


def test_lists_switches_and_unloads(served):
    client, state, files, models = served
    listed = client.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in listed] == ["a", "sub/b"]
    assert listed[0]["title"] == f"a.safetensors [{sha(files['a'])[:10]}]" and listed[0]["sha256"] == sha(files["a"])
    assert listed[1]["title"] == "sub/b.ckpt" and listed[1]["hash"] is None     # not hashed until loaded
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == listed[0]["title"]

    first = info(client.post("/sdapi/v1/txt2img", json={"prompt": "a boat", **SMALL}))
    assert first["sd_model_name"] == "a" and first["sd_model_hash"] == sha(files["a"])[:10]
    other = info(client.post("/sdapi/v1/txt2img", json={"prompt": "a boat", **SMALL,
                                                        "override_settings": {"sd_model_checkpoint": "sub/b"}}))
    assert other["sd_model_name"] == "b" and f"Model hash: {sha(files['b'])[:10]}" in other["infotexts"][0]
    assert list(state.pool.loaded) == [str(files["b"])]              # max_models=1: a was unloaded
    listed = client.get("/sdapi/v1/sd-models").json()
    assert listed[1]["title"] == f"sub/b.ckpt [{sha(files['b'])[:10]}]"
    # by hash, and back to a (loaded again, b unloaded)
    again = info(client.post("/sdapi/v1/txt2img", json={"prompt": "a boat", **SMALL, "override_settings": {
        "sd_model_checkpoint": sha(files["a"])[:10]}}))
    assert again["infotexts"] == first["infotexts"] and list(state.pool.loaded) == [str(files["a"])]

    # the server's own model
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "b.ckpt"}).status_code == 422
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sub/b.ckpt"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == f"sub/b.ckpt [{sha(files['b'])[:10]}]"
    assert info(client.post("/sdapi/v1/txt2img", json={"prompt": "a boat", **SMALL}))["sd_model_name"] == "b"


def test_unknown_model_and_refresh(served):
    client, state, files, models = served
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL,
                                               "override_settings": {"sd_model_checkpoint": "nope"}})
    assert r.status_code == 422 and "not one this server offers" in r.json()["detail"]
    save_single_file(build_random("tiny"), models / "c.safetensors", dtype=torch.float16)
    assert len(client.get("/sdapi/v1/sd-models").json()) == 2
    assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    assert [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()] == ["a", "c", "sub/b"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL, "override_settings": {"sd_model_checkpoint": "c"}})
    assert info(r)["sd_model_name"] == "c"


def test_a_broken_checkpoint_is_a_422_and_the_server_keeps_serving(served):
    client, state, files, models = served
    (models / "broken.safetensors").write_bytes(b"\x00" * 64)
    client.post("/sdapi/v1/refresh-checkpoints")
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL,
                                               "override_settings": {"sd_model_checkpoint": "broken"}})
    assert r.status_code == 422 and "broken.safetensors" in r.json()["detail"]
    assert info(client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL}))["sd_model_name"] == "a"
