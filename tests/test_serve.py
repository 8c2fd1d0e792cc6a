"""`icar serve`'s API on a real indexed table: every query kind, filters compiled safely, abuse refused."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import free_port, index_config, input_ids
from fastapi.testclient import TestClient
from PIL import Image

from pipeline.config import ServeConfig
from pipeline.job import run_index
from pipeline.lab.bench.serve_load import abuse_cases, answered_as_expected
from pipeline.query import DUPLICATE_COSINE, _drop_near_duplicates
from pipeline.serve.app import create_app
from pipeline.serve.filters import Filters

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
    client = TestClient(create_app(cfg), raise_server_exceptions=False)
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
    results = _search(client, text="a circle", k=50, filters={"caption_contains": "CIRCLE"})
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


@pytest.mark.parametrize("case", abuse_cases(ServeConfig().max_upload_bytes), ids=lambda c: c.name)
def test_abuse_gets_its_4xx_with_a_message_and_leaks_nothing(served, case):
    cfg, client, _ = served
    response = client.post(case.path, content=case.body, headers=case.headers)
    assert answered_as_expected(case, response.status_code, response.text, [cfg.output.uri]), response.text


def test_refusals_say_why(served):
    _, client, _ = served
    url = client.post("/api/search", json={"image_url": "http://example.com/a.jpg"})
    assert "not fetched server-side" in json.dumps(url.json())
    (bomb,) = [c for c in abuse_cases(ServeConfig().max_upload_bytes) if c.name == "decompression bomb"]
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

        card.get_by_role("button", name="More like this").click()
        expect(page.locator("#status")).to_contain_text("like")
        expect(page.locator(f'.card[data-id="{wanted}"]')).to_have_count(0)  # the query row itself
        expect(page.locator(".card")).to_have_count(12)

        page.set_input_files("#image", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"})
        expect(page.get_by_role("alert")).to_contain_text("not a usable image")
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
        env = {"env_vars": {"ICAR_CONFIG": str(config)}}
        app = deployment.SearchAPI.options(ray_actor_options={"num_cpus": 0, "runtime_env": env}).bind()
        serve.run(app, name="icar", route_prefix="/")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=60) as response:
            assert json.load(response)["rows"] == client.get("/healthz").json()["rows"]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/search",
            json.dumps({"text": first["caption"], "k": 5}).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.load(response)["results"] == _search(client, text=first["caption"], k=5)
    finally:
        serve.shutdown()
