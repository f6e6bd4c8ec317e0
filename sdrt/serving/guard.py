"""What stands between a client and the server's work (an ASGI middleware, no framework needed):

- **a body limit that holds**: the body is read here, chunked or not, and a request past
  ``max_body_bytes`` is answered 413 as soon as the limit is crossed;
- **a deadline for the body**: a client that sends its body slowly (one byte every few seconds)
  is answered 408 once ``body_timeout`` seconds have passed since the request started, so it
  cannot hold a worker, or a graceful shutdown, for long;
- **authentication**: with ``api_auth`` ("user:pass,user2:pass2", the web UI's ``--api-auth``),
  every route but ``/health`` needs HTTP Basic credentials, compared in constant time; 401 with
  ``WWW-Authenticate`` otherwise;
- **the client's disconnect**, watched while the request runs (``scope["state"]["disconnected"]``,
  an ``asyncio.Event``), so that its work can be cancelled;
- **a request id** on every response (``X-Request-ID``), which 5xx bodies carry too and the
  server's log names.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import time
import uuid

OPEN_PATHS = ("/health",)           # liveness probes need no credentials


def parse_auth(spec: str | None) -> list[tuple[bytes, bytes]]:
    """``user:pass,user2:pass2`` -> [(user, pass)]; a malformed entry is a ValueError."""
    if not spec:
        return []
    pairs = []
    for item in spec.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError("api_auth must be user:password[,user2:password2], each with a user and a password")
        pairs.append((user.encode(), password.encode()))
    return pairs


def _authorized(header: bytes | None, credentials: list[tuple[bytes, bytes]]) -> bool:
    if not header or not header.lower().startswith(b"basic "):
        return False
    try:
        user, sep, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return False
    ok = False
    for u, p in credentials:       # every pair is compared, in constant time, whatever matches
        ok |= secrets.compare_digest(u, user) & secrets.compare_digest(p, password) & bool(sep)
    return ok


# the routes whose bodies carry base64 images (max_image_body_bytes)
IMAGE_PATHS = frozenset({"/sdapi/v1/img2img", "/sdapi/v1/png-info", "/sdapi/v1/extra-single-image",
                         "/sdapi/v1/extra-batch-images", "/sdapi/v1/interrogate"})


class Guard:
    def __init__(self, app, max_body_bytes: int, body_timeout: float, api_auth: str | None = None,
                 max_image_body_bytes: int | None = None):
        self.app, self.max_body_bytes, self.body_timeout = app, max_body_bytes, body_timeout
        # the routes that carry images (base64) take larger bodies
        self.max_image_body_bytes = max(max_image_body_bytes or 0, max_body_bytes)
        self.credentials = parse_auth(api_auth)

    async def _answer(self, send, status: int, kind: str, detail: str, request_id: str, headers=()) -> None:
        body = json.dumps({"error": kind, "detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"x-request-id", request_id.encode()), *headers]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        headers = dict(scope.get("headers") or [])
        if self.credentials and scope.get("path") not in OPEN_PATHS \
                and not _authorized(headers.get(b"authorization"), self.credentials):
            return await self._answer(send, 401, "Unauthorized", "this server needs HTTP Basic credentials (api_auth)",
                                      request_id, [(b"www-authenticate", b'Basic realm="sdrt"')])
        # read the whole body here, within the limit and the deadline
        limit = self.max_image_body_bytes if scope.get("path") in IMAGE_PATHS else self.max_body_bytes
        chunks, size, deadline = [], 0, time.monotonic() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await self._answer(send, 408, "Timeout", f"the request body did not arrive within "
                                          f"{self.body_timeout:g} s", request_id)
            if message["type"] == "http.disconnect":
                return                                  # the client left before sending its request
            size += len(message.get("body", b""))
            if size > limit:
                return await self._answer(send, 413, "TooLarge", f"request body over {limit} bytes; "
                                          f"this server accepts at most {limit} on this route", request_id)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body, delivered = b"".join(chunks), False
        # the client's disconnect, watched from here: routes wait on scope["state"]["disconnected"]
        # (polling receive() from a route cannot see it through the middlewares' own receive)
        disconnected = scope["state"]["disconnected"] = asyncio.Event()

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def tagged_send(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (b"x-request-id", request_id.encode())])
            await send(message)

        watcher = asyncio.ensure_future(watch())
        try:
            await self.app(scope, replay, tagged_send)
        finally:
            watcher.cancel()
