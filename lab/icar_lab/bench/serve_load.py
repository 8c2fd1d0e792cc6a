"""`icar serve` under load and under abuse, over real HTTP on 127.0.0.1.

Load: N client threads, each with one keep-alive connection, send text queries for a fixed time; the
server is a separate `icar serve` process, so clients and server never share a GIL. Abuse: every request
of `abuse_cases` gets its expected status with a JSON error that names no path and holds no trace; an
injection attempt answered 200 must match nothing. tests/test_serve.py runs the same cases."""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ServeConfig


@dataclass(frozen=True)
class AbuseCase:
    name: str
    path: str
    body: bytes
    status: int
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG header claiming width x height: a decompression bomb's opening (refused before decoding)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = zlib.compress(b"\x00" * 64)
    chunks = b""
    for kind, data in ((b"IHDR", ihdr), (b"IDAT", raw), (b"IEND", b"")):
        chunks += struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunks


def abuse_cases(limits: ServeConfig) -> list[AbuseCase]:
    """Injection in every filter field, bad and oversized bodies, a foreign Host (DNS rebinding), and
    uploads that must not reach the model; for a server with `limits` and no token."""
    raw = {"Content-Type": "application/octet-stream"}
    rebound = {"Content-Type": "application/json", "Host": "attacker.example"}
    attacks = ["x' OR '1'='1", "') OR true --", "a'; DROP TABLE images; --"]
    cases = [
        AbuseCase(f"injection in {name}", "/api/search", _json({"text": "a", "filters": {name: value}}), 200)
        for name in ("route", "shard")
        for value in ([a] for a in attacks)
    ]
    cases += [
        AbuseCase("injection in caption_contains", "/api/search",
                  _json({"text": "a", "filters": {"caption_contains": attacks[0]}}), 200),
        AbuseCase("filter text field", "/api/search", _json({"text": "a", "where": "1=1"}), 422),
        AbuseCase("unknown filter", "/api/search", _json({"text": "a", "filters": {"sql": "1=1"}}), 422),
        AbuseCase("number as text", "/api/search",
                  _json({"text": "a", "filters": {"exit_depth": ["1) OR (1"]}}), 422),
        AbuseCase("control character", "/api/search",
                  _json({"text": "a", "filters": {"caption_contains": "a\u0000b"}}), 422),
        AbuseCase("too many values", "/api/search",
                  _json({"text": "a", "filters": {"route": ["r"] * 33}}), 422),
        AbuseCase("not a number", "/api/search",
                  _json({"text": "a", "filters": {"complexity_min": "NaN"}}), 422),
        AbuseCase("two queries", "/api/search", _json({"text": "a", "id": "b"}), 422),
        AbuseCase("no query", "/api/search", _json({}), 422),
        AbuseCase("image URL", "/api/search", _json({"image_url": "http://169.254.169.254/latest/"}), 422),
        AbuseCase("huge k", "/api/search", _json({"text": "a", "k": 10**9}), 422),
        AbuseCase("bad JSON", "/api/search", b"{not json", 422),
        AbuseCase("oversized JSON body", "/api/search", b" " * limits.max_body_bytes + b"{}", 413),
        AbuseCase("foreign Host", "/api/search", _json({"text": "a"}), 400, rebound),
        AbuseCase("oversized upload", "/api/search/image", b"\xff" * (limits.max_upload_bytes + 1), 413, raw),
        AbuseCase("not an image", "/api/search/image", b"<html>hello</html>", 400, raw),
        AbuseCase("empty upload", "/api/search/image", b"", 400, raw),
        AbuseCase("decompression bomb", "/api/search/image", _png_claiming(40_000, 40_000), 400, raw),
        AbuseCase("bad filters JSON", "/api/search/image?filters=%7B", b"x", 422, raw),
        AbuseCase("unknown id", "/api/search", _json({"id": "../../etc/passwd"}), 404),
    ]  # fmt: skip
    return cases


def leaks(text: str, secrets: list[str]) -> bool:
    """Does a response body show a trace or any of the server's paths?"""
    return "Traceback" in text or 'File "' in text or any(s in text for s in secrets if s)


def answered_as_expected(case: AbuseCase, status: int, text: str, secrets: list[str]) -> bool:
    """The expected status, nothing leaked, and a JSON error (4xx) or no results at all (an attack's 200)."""
    if status != case.status or leaks(text, secrets):
        return False
    body = json.loads(text)
    return bool(body.get("error")) if status >= 400 else body.get("results") == []


@contextmanager
def serve_process(output_uri: str, port: int, extra: list[str] = ()) -> Iterator[str]:
    """`icar serve` in its own process on 127.0.0.1:port until the block ends; yields the base URL.

    Its output goes to a file (a pipe nobody reads would block the server once full); a server that
    logged anything is an error, so the log is checked to be empty at the end."""
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--output", output_uri, "--port", str(port), *extra]
    log = tempfile.NamedTemporaryFile("w+", prefix="icar-serve-", suffix=".log")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"icar serve exited: {Path(log.name).read_text()[-2000:]}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError("icar serve did not answer /healthz in 120 s") from None
                time.sleep(0.2)
        yield url
        logged = Path(log.name).read_text()
        if logged:
            raise RuntimeError(f"icar serve logged while it served: {logged[-2000:]}")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _client(url: str, texts: list[str], offset: int, deadline: float, out: list, statuses: Counter) -> None:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    i = offset
    while time.monotonic() < deadline:
        body = _json({"text": texts[i % len(texts)], "k": 10})
        started = time.perf_counter()
        try:
            conn.request("POST", "/api/search", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            status = response.status
        except OSError:
            status, conn = 0, http.client.HTTPConnection(host, int(port), timeout=30)
        out.append(time.perf_counter() - started)
        statuses[status] += 1
        i += 1
    conn.close()


def measure_load(url: str, texts: list[str], clients: int, seconds: float) -> dict[str, Any]:
    """`clients` threads send text queries back to back for `seconds`; latency and errors of them all."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(target=_client, args=(url, texts, 7 * c, deadline, latencies, statuses))
        for c in range(clients)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = sorted(1e3 * s for s in latencies)
    return {
        "clients": clients,
        "seconds": wall,
        "requests": len(ms),
        "requests_per_second": len(ms) / wall,
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))],
        "errors": sum(n for status, n in statuses.items() if status != 200),
        "statuses": {str(k): v for k, v in statuses.items()},
    }


def send(url: str, case: AbuseCase, large: int = 2**16) -> tuple[int, str]:
    """POST a case. A large body goes as a careful client sends it: headers first, the body only if the
    server has not answered within a moment. A server refusing a too-large body answers before reading
    it and closes the connection; a client still sending would see a reset instead of the 413."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", case.path, skip_host="Host" in case.headers)
        for name, value in {**case.headers, "Content-Length": str(len(case.body))}.items():
            conn.putheader(name, value)
        conn.endheaders()
        if len(case.body) < large or not select.select([conn.sock], [], [], 0.5)[0]:
            conn.send(case.body)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def run_abuse(url: str, cases: list[AbuseCase], secrets: list[str]) -> dict[str, Any]:
    """Send every case; count the ones answered as expected, with a JSON error and nothing leaked."""
    failures = []
    for case in cases:
        try:
            status, text = send(url, case)
        except OSError as exc:  # no answer at all (a reset, a timeout) is a failure of this case
            status, text = 0, f"{type(exc).__name__}: {exc}"
        if status == 0 or not answered_as_expected(case, status, text, secrets):
            failures.append(
                {"case": case.name, "status": status, "expected": case.status, "body": text[:300]}
            )
    return {"cases": len(cases), "as_expected": len(cases) - len(failures), "failures": failures}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_serve(workdir: Path, clients: int, seconds: float) -> dict[str, Any]:
    """The bench section on the pipeline section's table (`workdir`/lancedb, its captions as queries):
    a warm-up, the load run, then the abuse cases, against one server process."""
    import pyarrow.parquet as pq

    output_uri = str(workdir / "lancedb")
    texts = pq.read_table(workdir / "corpus", columns=["caption"]).column("caption").to_pylist()
    with serve_process(output_uri, free_port()) as url:
        measure_load(url, texts, 1, min(2.0, seconds))  # warm-up: model, table and caches
        load = measure_load(url, texts, clients, seconds)
        abuse = run_abuse(url, abuse_cases(ServeConfig()), [output_uri, str(Path.cwd())])
    return {"rows": len(texts), "load": load, "abuse": abuse, "cpu_count": os.cpu_count()}
