"""`sdrt serve` under a real local Ray Serve instance on loopback, driven by the webuiapi client
from PyPI (what the web UI's users already use) and by plain HTTP."""
import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

pytest.importorskip("ray.serve", reason="the serve extra is not installed: scripts/setup.sh test installs it")
webuiapi = pytest.importorskip("webuiapi")
requests = pytest.importorskip("requests")

SMALL = {"steps": 4, "width": 64, "height": 64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sdrt-serve-{port}.log"), "w+")
    proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli", "serve", "--model", "random:tiny", "--port", str(port),
                             "--max-batch-size", "8", "--max-wait", "0.05", "--max-images", "8"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"sdrt serve exited with {proc.returncode}:\n{log.read()[-4000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                log.seek(0)
                pytest.fail(f"sdrt serve did not answer /health in 240 s:\n{log.read()[-4000:]}")
            time.sleep(1)
        yield port, url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def equal_image(a, b) -> bool:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()) <= 1


def test_webuiapi_generates_through_ray_serve(server, tiny):
    port, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="DPM++ 2M", steps=4)
    r = api.txt2img(prompt="a lighthouse at dusk", negative_prompt="blurry", seed=123, cfg_scale=6.0,
                    width=64, height=64, batch_size=2)
    assert [im.size for im in r.images] == [(64, 64), (64, 64)]
    assert r.info["all_seeds"] == [123, 124]
    want = tiny("a lighthouse at dusk", negative_prompt="blurry", seed=123, cfg_scale=6.0, sampler="DPM++ 2M",
                eta=1.0, batch_size=2, **SMALL)       # webuiapi sends eta=1.0, which DPM++ 2M ignores
    for i, image in enumerate(r.images):
        assert image.info["parameters"] == r.info["infotexts"][i] == want.infotexts[i]
        assert equal_image(image, want.images[i])
    names = [s["name"] for s in api.get_samplers()]
    assert "DPM++ 2M SDE" in names and "Euler a" in names
    assert "karras" in [s["name"] for s in api.get_schedulers()]
    assert api.get_sd_models()[0]["hash"] == tiny.components.model_hash
    assert api.get_options()["sd_model_checkpoint"].startswith("random:tiny")
    assert "progress" in api.get_progress()


def test_32_concurrent_clients_all_complete_with_their_seeds(server, tiny):
    port, url = server
    results, errors = {}, []

    def client(i):
        try:
            api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=4)
            results[i] = api.txt2img(prompt=f"client {i % 4}", seed=1000 + i, width=64, height=64,
                                     cfg_scale=5.0 + i % 3)
        except Exception as e:  # noqa: BLE001
            errors.append((i, repr(e)))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(results) == 32
    for i, r in results.items():
        assert r.info["all_seeds"] == [1000 + i]
        assert f"Seed: {1000 + i}," in r.images[0].info["parameters"]
    # spot-check images against the pipeline run alone in this process
    for i in (0, 7, 31):
        want = tiny(f"client {i % 4}", seed=1000 + i, cfg_scale=5.0 + i % 3, sampler="Euler a", eta=1.0, **SMALL)
        assert equal_image(results[i].images[0], want.images[0])
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    total = float(re.search(r"^sdrt_batch_size_sum (\S+)", metrics, re.M).group(1))
    batches = float(re.search(r"^sdrt_batch_size_count (\S+)", metrics, re.M).group(1))
    assert total >= 32 and total / batches > 1.5          # requests were batched dynamically


@pytest.mark.parametrize("body, status, pattern", [
    (b'{"prompt": "x", "steps": ', 400, "not valid JSON"),
    (json.dumps({"prompt": "x", "sampler_name": "Nonexistent", **SMALL}).encode(), 422, "unknown"),
    (json.dumps({"prompt": "x", "width": 99999, "height": 64, "steps": 4}).encode(), 422, "width"),
    (json.dumps({"prompt": "x", "batch_size": 64, **SMALL}).encode(), 422, "between 1 and 8"),
    (json.dumps({"prompt": "x" * 50000, **SMALL}).encode(), 422, "at most"),
], ids=["malformed-json", "unknown-sampler", "size-out-of-range", "oversized-batch", "huge-prompt"])
def test_bad_requests_get_4xx_and_the_server_stays_up(server, body, status, pattern):
    _, url = server
    r = requests.post(f"{url}/sdapi/v1/txt2img", data=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    assert re.search(pattern, r.json()["detail"])
    ok = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "fine", "seed": 1, **SMALL}, timeout=60)
    assert ok.status_code == 200
    image = base64.b64decode(ok.json()["images"][0])
    assert image[:8] == b"\x89PNG\r\n\x1a\n" and io.BytesIO(image)
