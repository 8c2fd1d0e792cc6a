"""`icar serve`'s API on a real indexed table: every query kind and mode, filters compiled safely, abuse and
the guard's refusals (Host, token, size, concurrency, time) over real HTTP, the page in headless Chromium."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shutil
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import free_port, index_config, input_ids
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from icar_lab.bench.serve_load import abuse_cases, answered_as_expected, leaks, run_abuse
from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, ServeConfig
from pipeline.job import run_index
from pipeline.query import DUPLICATE_COSINE, RRF_K, _drop_near_duplicates
from pipeline.serve.app import create_app
from pipeline.serve.filters import Filters
from pipeline.serve.guard import TOKEN_ENV, host_allowed, host_name, serve_token

COPIES = 3  # one scene stored under three keys: the near-duplicates `dedup` must fold


@pytest.fixture(scope="module")
def served(ray_local, scene_shards, tmp_path_factory):
    """The scene shards plus a shard holding one scene three times, indexed with thumbnails; a client."""
    extra = tmp_path_factory.mktemp("copies")
    first = pq.read_table(scene_shards / "00000.parquet").slice(0, 1).to_pylist()[0]
    copies = [first | {"key": f"copy{i}"} for i in range(COPIES)]
    pq.write_table(pa.Table.from_pylist(copies), extra / "copies.parquet")
    cfg = index_config([str(scene_shards), str(extra)], str(tmp_path_factory.mktemp("db")))
    summary = run_index(cfg)
    assert summary.rows_ok == len(input_ids(scene_shards)) + COPIES
    cfg.serve.refresh_seconds = 0.1
    client = TestClient(create_app(cfg), base_url="http://localhost", raise_server_exceptions=False)
    return cfg, client, first


def _search(client, **body):
    response = client.post("/api/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_text_query_returns_the_scene_with_every_result_field(served, scene_shards):
    _, client, _ = served
    rows = pq.read_table(scene_shards / "00002.parquet", columns=["key", "caption"]).to_pylist()[:10]
    hits = 0
    for row in rows:
        results = _search(client, text=row["caption"], k=10)
        assert len(results) == 10
        assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
        hits += f"00002.parquet/{row['key']}" in {r["id"] for r in results}
    assert hits >= 6  # as the Searcher itself retrieves (tests/test_pipeline.py)
    result = results[0]
    assert {"id", "caption", "url", "score", "route", "exit_depth", "tokens", "gflops", "thumbnail"} <= set(
        result
    )
    assert result["tokens"] > 0 and result["gflops"] > 0


def test_thumbnails_are_small_webp_of_the_whole_image(served):
    _, client, first = served
    result = _search(client, text=first["caption"], k=1)[0]
    response = client.get(result["thumbnail"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
    thumb = Image.open(io.BytesIO(response.content))
    assert thumb.format == "WEBP" and max(thumb.size) == 128
    source = Image.open(io.BytesIO(first["jpg"]))
    assert abs(thumb.size[0] / thumb.size[1] - source.size[0] / source.size[1]) < 0.05  # not cropped
    assert client.get("/api/thumbnails/no-such-id").status_code == 404


def test_image_upload_finds_itself_and_dedup_folds_the_copies(served):
    _, client, first = served
    plain = client.post("/api/search/image?k=5", content=first["jpg"])
    assert plain.status_code == 200, plain.text
    ids = [r["id"] for r in plain.json()["results"]]
    copies = {f"copies.parquet/copy{i}" for i in range(COPIES)} | {f"00000.parquet/{first['key']}"}
    assert set(ids[: len(copies)]) == copies  # the four identical images first, at cosine ~1
    folded = client.post("/api/search/image?k=5&dedup=true", content=first["jpg"]).json()["results"]
    assert len({r["id"] for r in folded} & copies) == 1 and len(folded) == 5


def test_more_like_this_excludes_the_row_and_unknown_ids_are_404(served):
    _, client, first = served
    row_id = f"00000.parquet/{first['key']}"
    results = _search(client, id=row_id, k=5)
    assert row_id not in {r["id"] for r in results} and len(results) == 5
    assert results[0]["score"] > 0.999  # a stored copy of the same image
    missing = client.post("/api/search", json={"id": "nope/1"})
    assert missing.status_code == 404 and missing.json() == {"error": "no row has that id"}
    assert client.get("/no/such/page").json() == {"error": "Not Found"}
    assert client.get("/api/search").status_code == 405


def test_vector_query_matches_the_text_query_and_checks_dimensions(served):
    _, client, _ = served
    searcher = client.app.state.searcher
    vector = searcher.embed_text(["a red circle on a plain background"]).reshape(-1).tolist()
    by_vector = _search(client, vector=vector, k=5)
    by_text = _search(client, text="a red circle on a plain background", k=5)
    assert [r["id"] for r in by_vector] == [r["id"] for r in by_text]
    short = client.post("/api/search", json={"vector": vector[:10]})
    assert short.status_code == 422 and f"{len(vector)} dimensions" in short.json()["error"]
    infinite = client.post("/api/search", content=json.dumps({"vector": [1e999] * len(vector)}))
    assert infinite.status_code == 422


def test_paging_and_limits(served):
    _, client, _ = served
    ten = _search(client, text="a blue star", k=10)
    assert _search(client, text="a blue star", k=5, offset=5) == ten[5:]
    over = client.post("/api/search", json={"text": "a blue star", "k": 90, "offset": 20})
    assert over.status_code == 422 and "at most 100" in over.json()["error"]


def test_filters_restrict_results_and_are_compiled_not_pasted(served):
    _, client, _ = served
    results = _search(client, text="a circle", k=50, filters={"caption_contains": "CIRCLE"})  # case folded
    assert results and all("circle" in r["caption"].lower() for r in results)
    low = _search(client, text="a circle", k=50, filters={"complexity_max": 0.3, "complexity_min": 0.1})
    assert all(0.1 <= r["complexity"] <= 0.3 for r in low)
    route = results[0]["route"]
    same_route = _search(client, text="a circle", k=20, filters={"route": [route]})
    assert same_route and all(r["route"] == route for r in same_route)
    for field in ("route", "shard"):  # injection attempts are values, matching nothing
        for attack in ("x' OR '1'='1", "') OR true --", "full'; DROP TABLE images; --"):
            assert _search(client, text="a circle", filters={field: [attack]}) == []
    assert _search(client, text="a circle", filters={"caption_contains": "' OR '1'='1"}) == []
    assert Filters(route=["a'b"], complexity_min=1e-5).where() == "route IN ('a''b') AND complexity >= 1e-05"


def test_text_and_hybrid_modes_match_caption_words_and_keep_filters(served):
    _, client, _ = served
    by_words = _search(client, text="Circle", mode="text", k=20)
    assert by_words and all("circle" in r["caption"].lower() for r in by_words)
    assert [r["score"] for r in by_words] == sorted((r["score"] for r in by_words), reverse=True)
    red = _search(client, text="circle", mode="text", k=20, filters={"caption_contains": "red"})
    assert red and all({"circle", "red"} <= set(r["caption"].lower().split()) for r in red)
    vector_ids = {r["id"] for r in _search(client, text="circle", k=20)}
    hybrid = _search(client, text="circle", mode="hybrid", k=10)
    assert len(hybrid) == 10 and {r["id"] for r in hybrid} <= vector_ids | {r["id"] for r in by_words}
    assert all(r["score"] <= 2 / (RRF_K + 1) for r in hybrid)  # rank fusion: at best first in both lists
    for body, words in (
        ({"id": "00000.parquet/x", "mode": "text"}, "needs `text`"),
        ({"vector": [0.0] * 4, "mode": "hybrid"}, "needs `text`"),
        ({"text": "circle", "mode": "bm25"}, "'vector', 'text' or 'hybrid'"),
    ):
        refused = client.post("/api/search", json=body)
        assert refused.status_code == 422 and words in json.dumps(refused.json()), refused.text


@pytest.mark.parametrize("case", abuse_cases(ServeConfig()), ids=lambda c: c.name)
def test_abuse_gets_its_4xx_with_a_message_and_leaks_nothing(served, case):
    cfg, client, _ = served
    response = client.post(case.path, content=case.body, headers=case.headers)
    assert answered_as_expected(case, response.status_code, response.text, [cfg.output.uri]), response.text


def test_refusals_say_why(served):
    _, client, _ = served
    url = client.post("/api/search", json={"image_url": "http://example.com/a.jpg"})
    assert "not fetched server-side" in json.dumps(url.json())
    (bomb,) = [c for c in abuse_cases(ServeConfig()) if c.name == "decompression bomb"]
    refused = client.post(bomb.path, content=bomb.body)
    assert refused.status_code == 400 and "pixels" in refused.json()["error"]


def test_internal_errors_are_500_without_a_trace_and_counted(served, monkeypatch):
    cfg, client, _ = served
    searcher = client.app.state.searcher

    def broken(*args, **kwargs):
        raise RuntimeError(f"disk full at {cfg.output.uri}/secret")

    monkeypatch.setattr(searcher, "search", broken)
    response = client.post("/api/search", json={"text": "x"})
    assert response.status_code == 500 and response.json() == {"error": "internal error"}
    metrics = client.get("/metrics").text
    assert 'icar_request_errors_total{route="/api/search"}' in metrics


def test_health_metrics_and_new_versions_without_restart(served, scene_shards, tmp_path):
    cfg, client, first = served
    before = client.get("/healthz").json()
    assert before["status"] == "ok" and before["rows"] == len(input_ids(scene_shards)) + COPIES
    assert _search(client, text="a circle")
    metrics = client.get("/metrics").text
    assert 'icar_requests_total{route="/api/search",status="200"}' in metrics
    assert "icar_request_seconds_bucket" in metrics
    # a reindex elsewhere commits one more shard; the running app sees it within refresh_seconds
    more = tmp_path / "more"
    more.mkdir()
    pq.write_table(pa.Table.from_pylist([first | {"key": "late"}]), more / "late.parquet")
    run_index(cfg.model_copy(update={"input": cfg.input.model_copy(update={"paths": [str(more)]})}))
    time.sleep(0.3)
    after = client.get("/healthz").json()
    assert after["rows"] == before["rows"] + 1 and after["version"] > before["version"]
    assert "late.parquet/late" in {r["id"] for r in _search(client, id=f"00000.parquet/{first['key']}")}


def test_drop_near_duplicates_keeps_the_best_of_each_group():
    base = np.eye(4, dtype=np.float32)
    near = base[0] + np.float32(1e-3) * base[1]
    rows = [{"id": i, "vector": v} for i, v in enumerate([base[0], near, base[1], base[0]])]
    assert [r["id"] for r in _drop_near_duplicates(rows)] == [0, 2]
    assert DUPLICATE_COSINE < 1


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [  # headless as root on a closed network: no sandbox, no background connections
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def _http_server(app):
    """The app on a real socket (uvicorn in a thread), as `icar serve` runs it."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


TOKEN = "t0ken-for-tests-only"


def _guarded(served, **serve: object):
    """An app on the served table's searcher (no second model load) with these serve settings."""
    cfg, client, _ = served
    settings = ServeConfig.model_validate(cfg.serve.model_dump() | serve)
    return create_app(cfg.model_copy(update={"serve": settings}), client.app.state.searcher)


def _send(
    url: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None, chunks: int = 0
) -> tuple[int, dict[str, str], str]:
    """One request on its own connection: GET without a body, else POST, the body in `chunks` chunks
    (Transfer-Encoding: chunked, no Content-Length) when chunks > 0. Headers may replace Host."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        headers = headers or {}
        conn.putrequest("GET" if body is None else "POST", path, skip_host="Host" in headers)
        for name, value in headers.items():
            conn.putheader(name, value)
        if body is not None and chunks:
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            size = -(-len(body) // chunks)
            for start in range(0, len(body), size):
                piece = body[start : start + size]
                conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            conn.send(b"0\r\n\r\n")
        else:
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode(errors="replace")
    finally:
        conn.close()


def _metrics(url: str) -> tuple[str, int]:
    """/metrics, and how many times it was refused as busy first: with one request slot, the last request
    may hold it for a moment after its answer."""
    answers = []
    _wait_for(lambda: answers.append(_send(url, "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}))
              or answers[-1][0] != 503)
    status, _, text = answers[-1]
    assert status == 200, text
    return text, len(answers) - 1


def _samples(text: str, name: str, label: str, **where: str) -> dict[str, float]:
    """One counter of a /metrics text, by the value of one of its labels (samples whose other labels are
    as `where` says)."""
    return {
        sample.labels[label]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and where.items() <= sample.labels.items()
    }


def _refusals(url: str) -> dict[str, float]:
    """The guard's refusals by reason (less the busy answers to reading them)."""
    text, busy = _metrics(url)
    refused = _samples(text, "icar_refused_requests_total", "reason")
    if busy:
        refused["busy"] -= busy
    return refused


def _query(text: str = "a red circle") -> bytes:
    return json.dumps({"text": text, "k": 3}).encode()


BEARER = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
GUARD_CASES = [  # (name, path, body, headers, chunks, status, error words)
    ("no token", "/api/search", _query(), {"Content-Type": "application/json"}, 0, 401, "needs a bearer"),
    ("wrong token", "/api/search", _query(), {"Authorization": "Bearer guess"}, 0, 401, "wrong bearer"),
    ("basic auth", "/api/search", _query(), {"Authorization": f"Basic {TOKEN}"}, 0, 401, "needs a bearer"),
    ("thumbnail without token", "/api/thumbnails/x", None, {}, 0, 401, "needs a bearer"),
    ("metrics without token", "/metrics", None, {}, 0, 401, "needs a bearer"),
    ("foreign Host", "/api/search", _query(), BEARER | {"Host": "evil.example:8000"}, 0, 400, "Host"),
    ("rebound name", "/", None, {"Host": "attacker.example"}, 0, 400, "Host"),
    ("JSON over the cap", "/api/search", b" " * 3000 + _query(), BEARER, 0, 413, "larger than 2048"),
    ("chunked JSON over the cap", "/api/search", b" " * 3000 + _query(), BEARER, 3, 413, "larger than 2048"),
    ("upload over its cap, chunked", "/api/search/image", b"\xff" * 5000, BEARER, 5, 413, "larger than 4096"),
]  # fmt: skip


def test_the_guard_refuses_each_abuse_with_json_leaks_nothing_and_keeps_answering(served):
    """Host, token and body caps on a real socket, and every refusal counted by reason."""
    cfg, _, first = served
    app = _guarded(served, token=TOKEN, max_body_bytes=2048, max_upload_bytes=4096)
    with _http_server(app) as url:
        for name, path, body, headers, chunks, status, words in GUARD_CASES:
            got, response_headers, text = _send(url, path, body, headers, chunks)
            assert got == status, (name, text)
            assert words in json.loads(text)["error"], (name, text)
            assert not leaks(text, [TOKEN, cfg.output.uri]), (name, text)
            if status == 401:
                assert response_headers["www-authenticate"].startswith("Bearer"), name
        assert _refusals(url) == {"token": 5, "host": 2, "size": 3}
        for public in ("/", "/static/app.js", "/healthz"):  # the page loads before it knows the token
            assert _send(url, public)[0] == 200, public
        status, _, text = _send(url, "/api/search", _query(first["caption"]), BEARER)
        assert status == 200 and f"00000.parquet/{first['key']}" in text
        chunked = _send(url, "/api/search", _query(first["caption"]), BEARER, chunks=4)
        assert chunked[0] == 200 and json.loads(chunked[2])["results"] == json.loads(text)["results"]


@pytest.fixture
def blocked_search(served, monkeypatch):
    """Searches wait for `release` (set at teardown at the latest); `entered` counts those started."""
    searcher = served[1].app.state.searcher
    search, release, entered = searcher.search, threading.Event(), []

    def waiting(*args, **kwargs):
        entered.append(1)
        release.wait(30)
        return search(*args, **kwargs)

    monkeypatch.setattr(searcher, "search", waiting)
    yield release, entered
    release.set()


def _wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_the_bench_abuse_cases_over_real_http_then_a_query_still_answers(served):
    """As `make bench` sends them (a large body held back until the server had a moment to refuse)."""
    cfg, client, first = served
    with _http_server(client.app) as url:
        report = run_abuse(url, abuse_cases(ServeConfig()), [cfg.output.uri])
        assert report["failures"] == [] and report["as_expected"] == report["cases"] == 26
        status, _, text = _send(
            url, "/api/search", _query(first["caption"]), {"Content-Type": "application/json"}
        )
        assert status == 200 and f"00000.parquet/{first['key']}" in text


def test_a_flood_past_the_concurrency_limit_gets_503_at_once_and_the_server_recovers(served, blocked_search):
    release, entered = blocked_search
    with _http_server(_guarded(served, max_concurrent_requests=2)) as url:
        with ThreadPoolExecutor(2) as held:
            slow = [held.submit(_send, url, "/api/search", _query(), BEARER) for _ in range(2)]
            _wait_for(lambda: len(entered) == 2)
            started = time.perf_counter()
            flood = [_send(url, "/api/search", _query(), BEARER) for _ in range(5)]
            assert time.perf_counter() - started < 2  # refused at once, not queued behind the two
            for status, headers, text in flood:
                assert status == 503 and headers["retry-after"] == "1"
                assert json.loads(text) == {"error": "too many requests in progress; retry shortly"}
            release.set()
            assert [f.result()[0] for f in slow] == [200, 200]
        assert _send(url, "/api/search", _query(), BEARER)[0] == 200
        assert _refusals(url) == {"busy": 5}


def test_a_request_past_its_time_gets_503_and_its_work_keeps_the_slot(served, blocked_search):
    release, entered = blocked_search
    app = _guarded(served, request_timeout_seconds=0.5, max_concurrent_requests=1)
    with _http_server(app) as url:
        started = time.perf_counter()
        status, headers, text = _send(url, "/api/search", _query(), BEARER)
        assert status == 503 and 0.5 <= time.perf_counter() - started < 3
        assert json.loads(text)["error"].startswith("the request took too long") and "retry-after" in headers
        # the search still runs in its thread: the one slot stays taken until it ends
        assert _send(url, "/api/search", _query(), BEARER)[0] == 503
        release.set()
        polled = []  # while the slot is still taken, these polls are refused as busy too
        _wait_for(lambda: polled.append(_send(url, "/healthz")[0]) or polled[-1] == 200)
        # a client that declares a body and never sends it is cut off at the same timeout (sent again while
        # the last poll's slot is still being freed, which the guard answers as busy)
        host, port = url.removeprefix("http://").split(":")
        answers = []

        def send_half_a_body() -> bool:
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(b"POST /api/search HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{")
                answers.append(sock.recv(4096).decode())
            return "too many requests" not in answers[-1]

        _wait_for(send_half_a_body)
        assert answers[-1].startswith("HTTP/1.1 503") and "took too long" in answers[-1]
        polled += [503] * (len(answers) - 1)
        assert _send(url, "/api/search", _query(), BEARER)[0] == 200
        assert _refusals(url) == {"timeout": 2, "busy": 1 + polled.count(503)}
        # the searches answered 503 for their time count as refusals only, not as served (or failed) ones
        searches = _samples(_metrics(url)[0], "icar_requests_total", "status", route="/api/search")
        assert searches == {"200": 1.0}


def test_serving_beyond_loopback_needs_a_token(served, monkeypatch, capsys):
    cfg, _, _ = served
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    started = time.perf_counter()
    assert cli_main(["serve", "--output", cfg.output.uri, "--host", "0.0.0.0"]) == 2
    assert time.perf_counter() - started < 5  # refused before the model loads
    refusal = capsys.readouterr().err
    assert "needs a bearer token" in refusal and TOKEN_ENV in refusal
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert serve_token(ServeConfig(host=host), host) is None
    for host in ("0.0.0.0", "::", "192.168.1.4", "search.example.com", None):
        with pytest.raises(ConfigError, match="needs a bearer token"):
            serve_token(ServeConfig(), host)
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert serve_token(ServeConfig(), "0.0.0.0") == "from-env"
    assert serve_token(ServeConfig(token="from-config"), None) == "from-config"
    assert "from-config" not in repr(ServeConfig(token="from-config"))


def test_host_names_are_parsed_and_matched_exactly():
    assert [host_name(h) for h in ("Example.COM:80", "[::1]:8000", "127.0.0.1", "::1")] == [
        "example.com", "::1", "127.0.0.1", "::1"
    ]  # fmt: skip
    allowed = ["search.example.com", "*.internal.example", "[::1]"]
    assert all(host_allowed(n, allowed) for n in ("search.example.com", "a.internal.example", "::1"))
    for name in ("example.com", "search.example.com.evil", "xinternal.example", "internal.example", ""):
        assert not host_allowed(name, allowed), name
    assert host_allowed("anything", ["*"])


@pytest.mark.slow
def test_search_page_in_headless_chromium(served, scene_shards, tmp_path):
    """Type a scene's caption, see that scene in the grid, click "More like this", read an error."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make browser installs it): browser test skipped")
    from playwright.sync_api import expect, sync_playwright

    _, client, _ = served
    searcher = client.app.state.searcher
    rows = pq.read_table(scene_shards / "00001.parquet", columns=["key", "caption"]).to_pylist()

    def found(row: dict) -> bool:
        hits = searcher.search(searcher.embed_text([row["caption"]]), 12)
        return f"00001.parquet/{row['key']}" in {h["id"] for h in hits}

    # the first caption whose scene the model ranks among the page's 12 results
    row = next(r for r in rows if found(r))
    caption, wanted = row["caption"], f"00001.parquet/{row['key']}"
    shots = Path(os.environ.get("ICAR_SCREENSHOT_DIR") or tmp_path)
    with _http_server(client.app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)
        page.locator("h1").click()  # focus away from the search box, then "/" brings it back
        page.keyboard.press("/")
        expect(page.locator("#text")).to_be_focused()
        page.keyboard.type(caption)
        page.keyboard.press("Enter")
        card = page.locator(f'.card[data-id="{wanted}"]')
        expect(card).to_be_visible()
        expect(page.locator(".card")).to_have_count(12)
        thumbnail = card.locator("img")  # lazy: it loads once scrolled into view, and may take a moment
        thumbnail.scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle())
        page.screenshot(path=str(shots / "search-page.png"))

        assert parse_qs(urlparse(page.url).query) == {"q": [caption]}  # the search has an address
        card.get_by_role("button", name="More like this").click()
        expect(page.locator("#status")).to_contain_text("like")
        expect(page.locator(f'.card[data-id="{wanted}"]')).to_have_count(0)  # the query row itself
        expect(page.locator(".card")).to_have_count(12)
        assert parse_qs(urlparse(page.url).query) == {"like": [wanted]}
        page.go_back()  # the text search again: its results and its text in the box
        expect(page.locator(f'.card[data-id="{wanted}"]')).to_be_visible()
        expect(page.locator("#text")).to_have_value(caption)
        page.go_forward()
        expect(page.locator(f'.card[data-id="{wanted}"]')).to_have_count(0)
        page.reload()  # "more like this" reloads as itself
        expect(page.locator("#status")).to_contain_text(f"like {wanted}")
        expect(page.locator(f'.card[data-id="{wanted}"]')).to_have_count(0)
        expect(page.locator(".card")).to_have_count(12)

        # a shared address: caption words only, a filter and k, restored into the form and searched
        page.goto(f"{url}/?q=circle&mode=text&caption_contains=red&k=5")
        expect(page.locator("#status")).to_contain_text("(text)")
        expect(page.locator("#mode")).to_have_value("text")
        expect(page.locator("#caption_contains")).to_have_value("red")
        expect(page.locator("#filters")).to_have_attribute("open", "")
        captions = page.locator(".card .caption").all_inner_texts()
        assert 0 < len(captions) <= 5 and all("circle" in c.lower() and "red" in c.lower() for c in captions)
        page.select_option("#mode", "hybrid")
        page.locator("#search button[type=submit]").click()
        expect(page.locator("#status")).to_contain_text("(hybrid)")
        query = parse_qs(urlparse(page.url).query)
        assert query == {"q": ["circle"], "mode": ["hybrid"], "caption_contains": ["red"], "k": ["5"]}

        page.set_input_files("#image", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"})
        expect(page.get_by_role("alert")).to_contain_text("not a usable image")
        browser.close()


@pytest.mark.slow
def test_the_page_asks_for_the_token_and_sends_it_for_searches_and_thumbnails(served):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make browser installs it): browser test skipped")
    from playwright.sync_api import expect, sync_playwright

    with _http_server(_guarded(served, token=TOKEN)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto(f"{url}/?q=a+red+circle")
        expect(page.get_by_role("alert")).to_contain_text("needs a bearer token")
        page.fill("#token", "guess")
        page.locator("#token-form button").click()
        expect(page.get_by_role("alert")).to_contain_text("wrong bearer token")
        page.fill("#token", TOKEN)
        page.locator("#token-form button").click()
        expect(page.locator(".card")).to_have_count(12)
        expect(page.locator("#token-form")).to_be_hidden()
        first = page.locator(".card img").first
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=first.element_handle())
        assert TOKEN not in page.url
        browser.close()


@pytest.mark.slow
def test_the_ray_serve_app_answers_like_icar_serve(served, tmp_path):
    """infra/rayservice.yaml's import path, deployed on the local Ray with the config from ICAR_CONFIG."""
    from ray import serve

    from pipeline.serve import deployment

    cfg, client, first = served
    config = tmp_path / "index.yaml"
    config.write_text(yaml.safe_dump({"output": {"uri": cfg.output.uri}}))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        env = {"env_vars": {"ICAR_CONFIG": str(config), TOKEN_ENV: TOKEN}}
        app = deployment.SearchAPI.options(ray_actor_options={"num_cpus": 0, "runtime_env": env}).bind()
        serve.run(app, name="icar", route_prefix="/")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=60) as response:
            assert json.load(response)["rows"] == client.get("/healthz").json()["rows"]
        url, query = f"http://127.0.0.1:{port}", _query(first["caption"])
        assert _send(url, "/api/search", query, {"Content-Type": "application/json"})[0] == 401
        assert _send(url, "/api/search", query, BEARER | {"Host": "evil.example"})[0] == 400
        assert _send(url, "/api/search", b" " * (2**20 + 1), BEARER, chunks=16)[0] == 413
        status, _, text = _send(url, "/api/search", query, BEARER)
        assert status == 200 and json.loads(text)["results"] == _search(client, text=first["caption"], k=3)
    finally:
        serve.shutdown()
