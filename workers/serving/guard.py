"""What every request passes before a route sees it: the API key, the body size
limit, and the request metrics. A plain ASGI middleware, so that a refused request
is answered from its headers alone, before any of its body is read.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from workers.serving.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Liveness and scraping answer without the key, as Flower's do: an orchestrator's
# probe and Prometheus carry no secret, and neither route shows any data.
OPEN_PATHS = frozenset({"/healthz", "/metrics"})


class BadRequest(Exception):
    """A request refused with the HTTP status ``code`` and one clear message."""

    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}


class BodyTooLarge(BadRequest):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is beyond the {_size(limit)} limit")


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n} bytes"


async def send_json(send: Send, status: int, body: dict[str, Any],
                    headers: dict[str, str] | None = None) -> None:
    """Answer with a JSON body (for code that runs outside the routes)."""
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class Guard:
    """ASGI middleware: API key (when one is set), body size cap, request metrics."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body: int,
                 metrics: Metrics) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refused = self.check(scope)
            if refused is not None:
                await send_json(sending, refused.code, {"error": refused.message},
                                refused.headers)
            else:
                await self.app(scope, self._capped(receive), sending)
        finally:
            self.metrics.observe(scope["path"], status, time.perf_counter() - start)

    def check(self, scope: Scope) -> BadRequest | None:
        """The refusal a request's headers alone earn, or None."""
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            given = _api_key(headers)
            if given is None:
                return BadRequest(401, "an API key is required: send Authorization: Bearer "
                                  "KEY or X-API-Key: KEY", {"WWW-Authenticate": "Bearer"})
            # Constant time: how much of a guess matched must not show in the timing.
            if not hmac.compare_digest(given, self.key):
                return BadRequest(401, "wrong API key", {"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return BadRequest(400, f"Content-Length {length[:20].decode(errors='replace')!r}"
                                  " is not a number")
            if int(length) > self.max_body:
                return BadRequest(413, f"request body of {int(length)} bytes is beyond the "
                                  f"{_size(self.max_body)} limit")
        return None

    def _capped(self, receive: Receive) -> Receive:
        """``receive`` that raises BodyTooLarge once more than the limit arrived: a
        chunked body has no Content-Length to check first."""
        seen = 0

        async def capped() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise BodyTooLarge(self.max_body)
            return message

        return capped


def _api_key(headers: dict[bytes, bytes]) -> bytes | None:
    auth = headers.get(b"authorization")
    if auth is not None:
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
    return headers.get(b"x-api-key")
