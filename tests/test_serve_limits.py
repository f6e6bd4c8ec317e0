"""The HTTP limits against a real `sdrt serve --no-ray` on a loopback port (uvicorn, raw
sockets): a chunked body over the limit, a slow body cut at its deadline, a slow client that
does not hold back a SIGTERM shutdown, and a client that disconnects mid-generation. Every
loop here is bounded in count and time."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("uvicorn", reason="the serve extra is not installed: scripts/setup.sh test installs it")
requests = pytest.importorskip("requests")

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*flags: str):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli", "serve", "--no-ray", "--port", str(port),
                             "--threads", "1", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sdrt serve exited: {proc.stdout.read().decode()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, port
        except requests.RequestException:
            time.sleep(0.5)
    proc.kill()
    pytest.fail("sdrt serve did not come up in 120 s")


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _status(sock: socket.socket) -> bytes:
    sock.settimeout(20)
    return sock.recv(4096).split(b"\r\n", 1)[0]


def test_body_limits_and_a_sigterm_that_a_slow_client_cannot_hold(tmp_path):
    proc, port = _start("--body-timeout", "2", "--max-body-bytes", "65536")
    try:
        # a chunked body past the limit: 413, without reading the rest
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                      b"Content-Type: application/json\r\n\r\n")
            chunk = b"x" * 16384
            try:
                for _ in range(16):
                    s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                pass                                        # the server answered and closed
            assert b" 413 " in _status(s)
        # a body one byte at a time: 408 at the deadline
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n"
                      b"Content-Type: application/json\r\n\r\n{")
            started = time.time()
            s.settimeout(0.5)
            answer = b""
            for _ in range(20):                             # 1 byte every 0.5 s, at most 10 s
                try:
                    answer = s.recv(4096)
                    break
                except socket.timeout:
                    s.sendall(b" ")
            assert b" 408 " in answer.split(b"\r\n", 1)[0] and time.time() - started < 8
        # SIGTERM while a slow client holds a connection: the server still stops promptly
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
        time.sleep(0.3)
        t = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert time.time() - t < 15
        slow.close()
    finally:
        _stop(proc)


def test_a_client_that_disconnects_frees_the_server(tmp_path):
    """Its generation is cancelled mid-way (the metrics count it) and the next request is served."""
    proc, port = _start("--max-batch-size", "1", "--max-wait", "0")
    url = f"http://127.0.0.1:{port}"
    try:
        body = b'{"prompt": "nobody waits for this", "steps": 2000, "width": 64, "height": 64, "seed": 1}'
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        for _ in range(40):                                    # wait until it runs, at most 20 s
            if requests.get(f"{url}/sdapi/v1/progress", timeout=5).json()["state"]["sampling_step"] > 0:
                break
            time.sleep(0.5)
        s.close()                                              # the client goes away
        cancelled = 0
        for _ in range(40):                                    # at most 20 s
            metrics = requests.get(f"{url}/metrics", timeout=5).text
            cancelled = int(float(next(line.split()[-1] for line in metrics.splitlines()
                                       if line.startswith('sdrt_requests_total{outcome="cancelled"}'))))
            if cancelled:
                break
            time.sleep(0.5)
        assert cancelled == 1
        r = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "next", "steps": 2, "width": 64, "height": 64},
                          timeout=60)
        assert r.status_code == 200
    finally:
        _stop(proc)
