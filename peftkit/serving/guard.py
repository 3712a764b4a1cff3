"""ASGI middleware in front of every route: the API key, the body size limit, and HTTP metrics.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streamed responses and
hide client disconnects from the routes.
"""
from __future__ import annotations

import hashlib
import hmac
import time
from typing import Callable

from fastapi.responses import JSONResponse

from peftkit.serving.openai_schema import error_body
from peftkit.serving.metrics import Metrics, route_label

PUBLIC = ("/health",)


class Guard:
    """ASGI middleware: API key on every route but /health and those `public` allows, a body size limit, HTTP metrics."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: Metrics,
                 public: Callable[[str], bool] | None = None):
        self.app = app
        self.public = public or (lambda path: False)
        self.limit = max_body_bytes
        self.metrics = metrics
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route, started, status = route_label(scope["path"]), time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.key_digest is not None and scope["path"] not in PUBLIC and not self.public(scope["path"]) \
                    and not self._authorized(scope):
                body = error_body("Incorrect or missing API key; send it as 'Authorization: Bearer KEY'",
                                      "invalid_request_error", None, "invalid_api_key")
                return await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send_and_note)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive)
                if body is None:
                    error = error_body(f"The request body is larger than {self.limit} bytes", "invalid_request_error",
                                           None, "request_too_large")
                    return await JSONResponse(error, 413)(scope, receive, send_and_note)
                receive = _replay(body, receive)
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            token = b""
        # Digests of equal length: the comparison time says nothing about the key or its length.
        return hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self.key_digest)

    async def _read_body(self, scope, receive) -> bytes | None:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:  # a client may lie about, or omit, Content-Length
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the client to disconnect
    return replayed
