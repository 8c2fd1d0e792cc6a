"""Fault injection for tests/test_faults.py: an S3 reverse proxy that fails and delays requests, and
hooks that make a real process die at a named point (imported by the processes under test, never by the
pipeline).

* `FaultProxy`: HTTP in front of an S3 endpoint (moto); a share of requests is answered 500/503 without
  reaching S3 (a failed request), a share is delayed; `on_next_put` runs a callback (e.g. take S3 down)
  just before the next PUT (to a matching path) goes through, so a fault can start inside a commit;
  `lose_next_answer` lets the next PUT to a matching path land in S3 and answers the client 503 (a lost
  answer: the write happened), optionally refusing the writer's retries and checks of that object until
  `stop_refusing`.
* `crash_encoder_on_key`: a Ray `worker_process_setup_hook`; the encoder actor that is to encode a batch
  holding the key in `ICAR_FAULT_CRASH_KEY` SIGKILLs itself, on every try (a deterministic segfault).
* `kill_encoder_after_write`: a Ray `worker_process_setup_hook`; the encoder actor that has just written
  the fragment files of a part holding the key in `ICAR_FAULT_WRITTEN_KEY` SIGKILLs itself, once per run
  (a marker file), before the driver hears of those files: they are orphans, the retry writes them anew.
* `kill_driver_at(point, nth)`: in the job's driver, SIGKILL the process right after the `nth` time it
  passes one of the commit protocol's points (`POINTS`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

CRASH_KEY_ENV = "ICAR_FAULT_CRASH_KEY"
CRASH_LOG_ENV = "ICAR_FAULT_CRASH_LOG"  # a file that gets one line per crash (pid), for the test to count
WRITTEN_KEY_ENV = "ICAR_FAULT_WRITTEN_KEY"
# the one kill of `kill_encoder_after_write`: created by it, holding the fragment files the dead part wrote
WRITTEN_MARKER_ENV = "ICAR_FAULT_WRITTEN_MARKER"
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
    what it did, `lost` the paths of the PUTs whose answers it lost. Faults are injected only while
    `.faulty` is set."""

    def __init__(
        self, upstream: str, fail: float = 0.0, delay: float = 0.0, pause: float = 0.5, seed: int = 0
    ):
        self.upstream = urlsplit(upstream)
        self.fail, self.delay, self.pause = fail, delay, pause
        self.faulty = True
        self.counts: Counter = Counter()
        self._on_put: Callable[[], None] | None = None
        self._on_put_path = re.compile("")
        self._lose: re.Pattern[str] | None = None
        self._refuse_after = False
        self._refusing: str | None = None  # the lost PUT's path, while its PUTs and HEADs are refused
        self.lost: list[str] = []
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

    def on_next_put(self, callback: Callable[[], None], path: str = "") -> None:
        """Call `callback` once, in the proxy, just before the next PUT (whose path matches the regex
        `path`) is forwarded to S3."""
        with self._lock:
            self._on_put, self._on_put_path = callback, re.compile(path)

    def lose_next_answer(self, path: str, refuse_after: bool = False) -> None:
        """The next PUT whose path matches the regex `path` is forwarded to S3, and its client answered 503
        whatever S3 said: the write landed, the writer cannot know it (once). With `refuse_after`, every PUT
        and HEAD of that object that follows (the writer's retries, its checks of what landed) is answered
        503 too, without reaching S3, until `stop_refusing`: its writer gives up not knowing. GETs pass
        (other readers of the table load its latest version)."""
        with self._lock:
            self._lose, self._refuse_after = re.compile(path), refuse_after

    def stop_refusing(self) -> None:
        with self._lock:
            self._refusing = None

    def _answer_lost(self, method: str, path: str) -> bool:
        with self._lock:
            if method != "PUT" or self._lose is None or not self._lose.search(path):
                return False
            self._lose = None
            self.lost.append(path)
            self.counts["answer lost"] += 1
            if self._refuse_after:
                self._refusing = path
            return True

    def _refused(self, method: str, path: str) -> bool:
        """A PUT or HEAD of the lost object while refusing (`lose_next_answer`)."""
        with self._lock:
            if self._refusing is None or path != self._refusing or method not in ("PUT", "HEAD"):
                return False
            self.counts["refused after the lost answer"] += 1
            return True

    def _before_forward(self, method: str, path: str) -> None:
        with self._lock:
            callback = self._on_put if method == "PUT" and self._on_put_path.search(path) else None
            if callback is not None:
                self._on_put = None
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
        return type("Handler", (_ProxyHandler,), {"proxy": self})


class _ProxyHandler(BaseHTTPRequestHandler):
    """One request through `proxy` (each `FaultProxy` gets a subclass naming itself): failed, delayed
    or forwarded to S3 as the proxy decides."""

    protocol_version = "HTTP/1.1"
    proxy: FaultProxy

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _any(self) -> None:
        body = self._body()
        proxy = self.proxy
        fate = "fail" if proxy._refused(self.command, self.path) else proxy._decide()
        if fate == "fail":
            code = proxy._rng.choice((500, 503))
            self._reply_error(code, b"InternalError" if code == 500 else b"SlowDown", b"injected")
            return
        if fate == "delay":
            time.sleep(proxy.pause)
        proxy._before_forward(self.command, self.path)
        answer = self._forward(body)
        if answer is None:  # S3 itself is down: what a load balancer in front of it answers
            with proxy._lock:
                proxy.counts["upstream down"] += 1
            self._reply_error(503, b"SlowDown")
        elif answer[0] < 300 and proxy._answer_lost(self.command, self.path):
            self._reply_error(503, b"SlowDown")
        else:
            self._reply(*answer)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

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

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes] | None:
        """S3's answer to this request (status, headers, body), or None when S3 cannot be reached."""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(
            self.proxy.upstream.hostname, self.proxy.upstream.port, timeout=60
        )
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            return response.status, response.getheaders(), response.read()
        except OSError:
            return None
        finally:
            upstream.close()

    def _reply_error(self, status: int, code: bytes, message: bytes | None = None) -> None:
        detail = b"" if message is None else b"<Message>%s</Message>" % message
        self._reply(
            status,
            [("Content-Type", "application/xml")],
            b"<Error><Code>%s</Code>%s</Error>" % (code, detail),
        )

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


# --- hooks run inside the processes under test ---------------------------------------------------------


def _die() -> None:
    if log := os.environ.get(CRASH_LOG_ENV):
        with open(log, "a") as out:
            out.write(f"{os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def crash_encoder_on_key() -> None:
    """Ray worker setup hook: an encoder batch holding row key `$ICAR_FAULT_CRASH_KEY` kills its process
    (SIGKILL: no Python cleanup, exactly what Ray sees when a native decoder segfaults). Both plans'
    actors encode through `EncodeStage.encode`."""
    key = os.environ.get(CRASH_KEY_ENV)
    if not key:
        return
    from pipeline.encode import actor

    encode = actor.EncodeStage.encode

    def crashing(self, batch):
        if key in set(batch["key"].tolist()):
            _die()
        return encode(self, batch)

    actor.EncodeStage.encode = crashing


def kill_encoder_after_write() -> None:
    """Ray worker setup hook: the encoder actor that has written the fragment files of a part holding row
    key `$ICAR_FAULT_WRITTEN_KEY` SIGKILLs itself before returning the part, once: it first creates
    `$ICAR_FAULT_WRITTEN_MARKER` with the paths of the images fragment files it wrote (JSON), and a try
    that finds the marker there goes on. So the driver never hears of those files, and Ray's retry of the
    batch (a restarted actor) writes the part again."""
    key, marker = os.environ.get(WRITTEN_KEY_ENV), os.environ.get(WRITTEN_MARKER_ENV)
    if not key or not marker:
        return
    from pipeline.encode import actor
    from pipeline.write import fragments

    write = fragments.write_part

    def write_then_die(batches, shard, target):
        seen = []

        def watched():
            for batch in batches:
                seen.append(key in set(batch["key"].tolist()))
                yield batch

        part = write(watched(), shard, target)
        if not any(seen):
            return part
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # the retry: this time the part reaches the driver
            return part
        files = [f["files"][0]["path"] for f in json.loads(part["images"])]
        os.write(fd, json.dumps({"pid": os.getpid(), "images": files}).encode())
        os.close(fd)
        _die()

    fragments.write_part = actor.write_part = write_then_die  # the GPU plan's and the CPU plan's caller


# The commit protocol's points in the driver (pipeline/write/commit.py `Committer.flush` and `remove`,
# pipeline/write/output.py `OutputTables.optimize`), each just after a durable step; a round passes each
# of the first four once, so `nth` is the round.
POINTS = {
    "writing": "a round's shards recorded `writing`, none of their rows committed",
    "rejected": "the round's rejected rows committed, its embeddings not",
    "images": "the round's embeddings committed, its shards still `writing`",
    "done": "the round's shards recorded `done`",
    "optimize": "the end-of-run optimize: the images table compacted, the rejected and manifest tables not",
    "remove": "reindex removing shards: their embeddings deleted, their rejected rows and states not",
}


@contextlib.contextmanager
def _after_each_call(obj: object, method: str, then: Callable[..., None]) -> Iterator[None]:
    """While the block runs, `obj.method(*args)` calls `then(*args)` once it has returned (an instance
    attribute over the class's method, removed afterwards)."""
    original = getattr(obj, method)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        then(*args, **kwargs)
        return result

    setattr(obj, method, wrapped)
    try:
        yield
    finally:
        delattr(obj, method)


def kill_driver_at(point: str, nth: int = 1) -> None:
    """Patch the committer in this process so that it SIGKILLs the process right after the `nth` pass
    through `point` (see `POINTS`)."""
    from pipeline.write.commit import Committer
    from pipeline.write.manifest import DONE, WRITING
    from pipeline.write.output import OutputTables

    assert point in POINTS, point
    passes = Counter()

    def after(name: str) -> None:
        passes[name] += 1
        if name == point and passes[name] == nth:
            _die()

    def recorded(records, *_, **__) -> None:
        statuses = {r.status for r in records}
        for status, name in ((WRITING, "writing"), (DONE, "done")):
            if status in statuses:
                after(name)

    flush, optimize, remove = Committer.flush, OutputTables.optimize, Committer.remove

    def flush_(self):
        with (
            _after_each_call(self.manifest, "record", recorded),
            _after_each_call(self.tables.rejected, "append", lambda *_, **__: after("rejected")),
            _after_each_call(self.tables.images, "append", lambda *_, **__: after("images")),
        ):
            return flush(self)

    def optimize_(self, *args, **kwargs):
        with _after_each_call(self.images_table, "optimize", lambda *_, **__: after("optimize")):
            return optimize(self, *args, **kwargs)

    def remove_(self, names):
        with _after_each_call(self.tables.images, "delete", lambda *_, **__: after("remove")):
            return remove(self, names)

    Committer.flush, OutputTables.optimize, Committer.remove = flush_, optimize_, remove_
