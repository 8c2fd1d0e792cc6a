"""What stands between the network and the search API: a Host allow-list, a bearer token, body size caps,
a concurrency limit and a per-request timeout, each refusal a JSON `{"error": ...}`.

One pure ASGI middleware around the whole app, so `icar serve` (uvicorn) and the Ray Serve replicas
(deployment.py) run the same checks, in this order: Host (400), token (401), concurrency (503), body size
(413), time (503). The body is read here, before any route sees it, so no route ever holds more than its
cap, whether the client declared a Content-Length or sent chunks. A request answered 503 for its time is
marked in its ASGI scope (`timed_out`), so whatever measures the app's requests can leave its late work
out of the served requests and their latency: the client never got that answer."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple

from pipeline.config import ConfigError, ServeConfig

TOKEN_ENV = "ICAR_SERVE_TOKEN"
RETRY = {"retry-after": "1"}  # a 503 says when to come back
TIMED_OUT = "icar.timed_out"  # ASGI scope key: True once the guard answered the request 503 for its time

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[dict, Receive, Send], Awaitable[None]]


def is_loopback(host: str) -> bool:
    """Only this machine can reach an address like 127.0.0.1, ::1 or localhost; 0.0.0.0 is every interface."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: whatever it resolves to may be reachable from elsewhere


def serve_token(serve: ServeConfig, bind_host: str | None) -> str | None:
    """`serve.token`, else $ICAR_SERVE_TOKEN. Refuses (ConfigError) to go without one when the API can be
    reached from other machines: a non-loopback `bind_host`, or None when the bind address is not ours to
    know (a Ray Serve replica behind its proxy)."""
    token = serve.token.get_secret_value() if serve.token else os.environ.get(TOKEN_ENV, "")
    if token:
        return token
    if bind_host is not None and is_loopback(bind_host):
        return None
    where = f"on {bind_host}" if bind_host else "behind a Ray Serve proxy"
    raise ConfigError(
        f"serve.token: serving {where} exposes the API beyond this machine, so it needs a bearer token: "
        f"set ${TOKEN_ENV} (or serve.token), or bind 127.0.0.1"
    )


def host_name(header: str) -> str:
    """The name in a Host header: 'Example.com:8000' -> 'example.com', '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def host_allowed(name: str, patterns: list[str]) -> bool:
    """Exact names, '*.example.com' (any subdomain) or '*' (any name)."""
    for pattern in (p.lower().strip("[]") for p in patterns):
        if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


def timed_out(scope: Mapping[str, Any]) -> bool:
    """Whether the guard already answered this request 503 for taking too long (its work may still be
    running, and still answer the app's own middleware)."""
    return bool(scope.get(TIMED_OUT))


def is_public(path: str) -> bool:
    """The page, its assets and the liveness check: no rows, so no token (a browser loads them first)."""
    return path in ("/", "/healthz") or path.startswith("/static/")


async def refuse(send: Send, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
    """Answer with a JSON error; the request goes no further."""
    body = json.dumps({"error": message}).encode()
    fields = {"content-type": "application/json", "content-length": str(len(body)), **(headers or {})}
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(k.encode(), v.encode()) for k, v in fields.items()],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Refusal(NamedTuple):
    status: int
    reason: str  # the metrics label: host, token, busy (and size, timeout, decided later)
    message: str
    headers: Mapping[str, str] = {}


def _retrieve(task: asyncio.Future) -> None:
    """A late failure of work already answered 503 is retrieved here, not logged as never retrieved."""
    if not task.cancelled():
        task.exception()


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class Guard:
    """The ASGI middleware. `body_limits` maps a path to its own cap (image uploads); every other path gets
    `serve.max_body_bytes`. `on_refusal(reason)` counts what was refused (metrics).

    A request past its time is answered 503 at once, but its work keeps a concurrency slot until it really
    ends (a search running in a thread cannot be stopped), so the limit bounds the work, not the waiting."""

    def __init__(
        self,
        app: ASGIApp,
        serve: ServeConfig,
        token: str | None,
        body_limits: Mapping[str, int],
        on_refusal: Callable[[str], None],
    ) -> None:
        self.app = app
        self.serve = serve
        self.token = token.encode() if token else None
        self.body_limits = body_limits
        self.on_refusal = on_refusal
        self.active = 0

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            self.on_refusal(refusal.reason)
            return await refuse(send, refusal.status, refusal.message, refusal.headers)
        await self._within_time(scope, receive, send)

    def _refusal(self, scope: dict) -> Refusal | None:
        """Why this request is refused before its body is read, if it is."""
        if not host_allowed(host_name(_header(scope, b"host") or ""), self.serve.allowed_hosts):
            return Refusal(400, "host", "this Host is not served here (serve.allowed_hosts)")
        if self.token is not None and not is_public(scope["path"]):
            scheme, _, given = (_header(scope, b"authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not given:
                message = "this API needs a bearer token (Authorization: Bearer <token>)"
                return Refusal(401, "token", message, {"www-authenticate": "Bearer"})
            if not hmac.compare_digest(given.strip().encode(), self.token):
                challenge = {"www-authenticate": 'Bearer error="invalid_token"'}
                return Refusal(401, "token", "wrong bearer token", challenge)
        if self.active >= self.serve.max_concurrent_requests:
            return Refusal(503, "busy", "too many requests in progress; retry shortly", RETRY)
        return None

    async def _within_time(self, scope: dict, receive: Receive, send: Send) -> None:
        """Read the body and run the app in a task; past the timeout, answer 503 unless it has started."""
        state = {"started": False, "answered": False}

        async def send_until_answered(message: Message) -> None:
            if state["answered"]:
                return  # we already said 503: the late work's answer goes nowhere
            state["started"] = True
            await send(message)

        self.active += 1
        task = asyncio.ensure_future(self._holding_slot(scope, receive, send_until_answered))
        task.add_done_callback(_retrieve)
        done, _ = await asyncio.wait({task}, timeout=self.serve.request_timeout_seconds)
        if done or state["started"]:
            return await task
        state["answered"] = True
        scope[TIMED_OUT] = True  # before the cancel: the app's middleware sees it as the work unwinds
        task.cancel()  # stops a body read; a search in a thread runs to its end, holding its slot
        self.on_refusal("timeout")
        await refuse(send, 503, "the request took too long (serve.request_timeout_seconds)", RETRY)

    async def _holding_slot(self, scope: dict, receive: Receive, send: Send) -> None:
        """The request's work; its slot is freed in the same step as its last answer is sent, so a client
        that sends its next request on seeing the answer never finds its own slot still taken."""
        try:
            await self._with_body(scope, receive, send)
        finally:
            self.active -= 1

    async def _with_body(self, scope: dict, receive: Receive, send: Send) -> None:
        """Read the whole body up to its cap (413 past it, declared or not), then run the app on a copy."""
        limit = self.body_limits.get(scope["path"], self.serve.max_body_bytes)
        declared = _header(scope, b"content-length")
        too_large = f"request body larger than {limit} bytes"
        if declared is not None and declared.isdigit() and int(declared) > limit:
            self.on_refusal("size")
            return await refuse(send, 413, too_large)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left: nobody to answer
            body += message.get("body", b"")
            if len(body) > limit:
                self.on_refusal("size")
                return await refuse(send, 413, too_large)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def receive_again() -> Message:
            return replay.pop() if replay else await receive()  # then the disconnect, when it comes

        await self.app(scope, receive_again, send)
