"""Fault injection for tests/test_faults.py: an S3 reverse proxy that fails and delays requests, and
hooks that make a real process die at a named point (imported by the processes under test, never by the
pipeline).

* `FaultProxy`: HTTP in front of an S3 endpoint (moto); a share of requests is answered 500/503 without
  reaching S3 (a failed request, never a lost answer), a share is delayed; `on_next_put` runs a callback
  (e.g. take S3 down) just before the next PUT goes through, so a fault can start inside a commit.
* `crash_encoder_on_key`: a Ray `worker_process_setup_hook`; the encoder actor that gets a batch holding
  the key in `ICAR_FAULT_CRASH_KEY` SIGKILLs itself, on every try (a deterministic decoder segfault).
* `kill_driver_at(point, nth)`: in the job's driver, SIGKILL the process right after the `nth` time it
  passes one of the commit protocol's points (`POINTS`).
"""

from __future__ import annotations

import http.client
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

CRASH_KEY_ENV = "ICAR_FAULT_CRASH_KEY"
CRASH_LOG_ENV = "ICAR_FAULT_CRASH_LOG"  # a file that gets one line per crash (pid), for the test to count
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
}


class FaultProxy:
    """A threaded reverse proxy to `upstream` on 127.0.0.1 (`.endpoint`); `fail` and `delay` are shares
    of requests (decided per request with a seeded RNG), `pause` the delay in seconds. `counts` tells
    what it did. Faults are injected only while `.faulty` is set."""

    def __init__(
        self, upstream: str, fail: float = 0.0, delay: float = 0.0, pause: float = 0.5, seed: int = 0
    ):
        self.upstream = urlsplit(upstream)
        self.fail, self.delay, self.pause = fail, delay, pause
        self.faulty = True
        self.counts: Counter = Counter()
        self._on_put: Callable[[], None] | None = None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def on_next_put(self, callback: Callable[[], None]) -> None:
        """Call `callback` once, in the proxy, just before the next PUT is forwarded to S3."""
        with self._lock:
            self._on_put = callback

    def _before_forward(self, method: str) -> None:
        with self._lock:
            callback, self._on_put = (self._on_put, None) if method == "PUT" else (None, self._on_put)
        if callback is not None:
            callback()

    def _decide(self) -> str:
        with self._lock:
            self.counts["requests"] += 1
            if not self.faulty:
                return "pass"
            draw = self._rng.random()
            fate = "fail" if draw < self.fail else "delay" if draw < self.fail + self.delay else "pass"
            self.counts[fate] += 1
            return fate

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    data = b""
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                length = dict((k.lower(), v) for k, v in headers).get("content-length", str(len(body)))
                self.send_header("Content-Length", length if self.command == "HEAD" else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _any(self) -> None:
                body = self._body()
                fate = proxy._decide()
                if fate == "fail":
                    code = proxy._rng.choice((500, 503))
                    error = b"<Error><Code>%s</Code><Message>injected</Message></Error>" % (
                        b"InternalError" if code == 500 else b"SlowDown"
                    )
                    self._reply(code, [("Content-Type", "application/xml")], error)
                    return
                if fate == "delay":
                    time.sleep(proxy.pause)
                proxy._before_forward(self.command)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=60
                )
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                except OSError:  # S3 itself is down: what a load balancer in front of it answers
                    with proxy._lock:
                        proxy.counts["upstream down"] += 1
                    self._reply(
                        503, [("Content-Type", "application/xml")], b"<Error><Code>SlowDown</Code></Error>"
                    )
                    return
                finally:
                    upstream.close()
                self._reply(response.status, response.getheaders(), data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        return Handler


# --- hooks run inside the processes under test ---------------------------------------------------------


def _die() -> None:
    if log := os.environ.get(CRASH_LOG_ENV):
        with open(log, "a") as out:
            out.write(f"{os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def crash_encoder_on_key() -> None:
    """Ray worker setup hook: an encoder batch holding row key `$ICAR_FAULT_CRASH_KEY` kills its process
    (SIGKILL: no Python cleanup, exactly what Ray sees when a native decoder segfaults)."""
    key = os.environ.get(CRASH_KEY_ENV)
    if not key:
        return
    from pipeline.encode import actor

    encode = actor.EncodeStage.__call__

    def crashing(self, batch):
        if key in set(batch["key"].tolist()):
            _die()
        return encode(self, batch)

    actor.EncodeStage.__call__ = crashing


# The commit protocol's points in the driver (pipeline/write.py), each just after a durable step.
POINTS = {
    "writing": "manifest row `writing`, none of the shard's rows written",
    "rejected": "the shard's rejected rows committed, its embeddings not",
    "images": "the shard's embeddings committed, its manifest row still `writing`",
    "done": "the shard's manifest row `done`",
    "optimize": "the end-of-run compaction: the images table compacted, the other tables not",
    "remove": "reindex removing a shard: its embeddings deleted, its rejected and manifest rows not",
}


def kill_driver_at(point: str, nth: int = 1) -> None:
    """Patch `LanceWriter` in this process so that it SIGKILLs the process right after the `nth` pass
    through `point` (see `POINTS`)."""
    from pipeline import write

    assert point in POINTS, point
    passes = Counter()

    def after(name: str) -> None:
        passes[name] += 1
        if name == point and passes[name] == nth:
            _die()

    writer = write.LanceWriter
    begin, put, finish, optimize, remove = (
        writer.begin_shard,
        writer._put,
        writer.finish_shard,
        writer.optimize,
        writer.remove_shard,
    )

    def begin_shard(self, record):
        started = begin(self, record)
        after("writing")
        return started

    def _put(self, table, rows, shard, mode):
        put(self, table, rows, shard, mode)
        after("rejected" if table is self.rejected else "images" if table is self.images else "put")

    def finish_shard(self, record, started):
        finish(self, record, started)
        after("done")

    def optimize_(self, *args, **kwargs):
        images = self.images.optimize

        def compact_images(*a, **k):
            result = images(*a, **k)
            after("optimize")
            return result

        self.images.optimize = compact_images
        try:
            return optimize(self, *args, **kwargs)
        finally:
            del self.images.optimize

    def remove_shard(self, shard):
        delete = self.images.delete

        def delete_images(*a, **k):
            result = delete(*a, **k)
            after("remove")
            return result

        self.images.delete = delete_images
        try:
            return remove(self, shard)
        finally:
            del self.images.delete

    writer.begin_shard, writer._put, writer.finish_shard = begin_shard, _put, finish_shard
    writer.optimize, writer.remove_shard = optimize_, remove_shard
