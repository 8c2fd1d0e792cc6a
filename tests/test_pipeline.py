"""The indexing job end to end on real components: local Ray, real parquet, real LanceDB, real JPEGs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import imagefactory
import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import index_config, input_ids, lance_table

from pipeline.decode import decode_image
from pipeline.encode.actor import route_batches
from pipeline.encode.model import load_model, normalize_uint8
from pipeline.encode.routed import RoutedEncoder
from pipeline.job import run_index
from pipeline.prepare import bundle_units
from pipeline.query import Searcher, build_indexes


@pytest.fixture(scope="module")
def indexed(ray_local, scene_shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lance"))
    cfg = index_config([str(scene_shards)], out)
    summary = run_index(cfg)
    return cfg, summary


def test_every_input_row_is_indexed_once_with_its_route_and_compute(indexed, scene_shards):
    cfg, summary = indexed
    images = lance_table(cfg.output.uri, "images")
    expected = input_ids(scene_shards)
    assert sorted(images.column("id").to_pylist()) == sorted(expected)
    assert (summary.rows_ok, summary.rows_failed, summary.rows_skipped) == (72, 0, 0)
    assert summary.shards_committed == 3 and summary.routes == Counter({"full": 72})
    vectors = np.stack(images.column("vector").to_numpy(zero_copy_only=False))
    assert vectors.shape == (72, 128)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert set(images.column("exit_depth").to_pylist()) == {12}
    assert set(images.column("tokens").to_pylist()) == {65}  # 8x8 patches + CLS
    np.testing.assert_allclose(images.column("gflops").to_numpy(), summary.gflops_full, rtol=1e-6)
    assert set(images.column("model_id").to_pylist()) == {"icar-tiny-vit:embedded"}
    complexity = images.column("complexity").to_numpy()
    assert np.all((complexity >= 0) & (complexity < 1)) and complexity.std() > 0.05
    manifest = lance_table(cfg.output.uri, "images_manifest").to_pylist()
    assert sorted((Path(m["shard"]).name, m["status"], m["rows_ok"]) for m in manifest) == [
        ("00000.parquet", "done", 24),
        ("00001.parquet", "done", 24),
        ("00002.parquet", "done", 24),
    ]


def test_written_embedding_equals_open_clip_encode_image(indexed, scene_shards):
    """Tolerance 1e-5 absolute on unit vectors (float32 vectors, same uint8 pixels)."""
    cfg, _ = indexed
    shard = pq.read_table(scene_shards / "00001.parquet", columns=["key", "jpg"]).slice(0, 6)
    loaded = load_model(cfg.model)
    pixels = np.stack([decode_image(b, loaded.image_size)[0] for b in shard.column("jpg").to_pylist()])
    with torch.no_grad():
        x = normalize_uint8(torch.from_numpy(pixels), loaded.mean, loaded.std)
        reference = loaded.model.encode_image(x, normalize=True).numpy()
    ids = [f"00001.parquet/{k}" for k in shard.column("key").to_pylist()]
    table = lancedb.connect(cfg.output.uri).open_table("images")
    rows = {r["id"]: r["vector"] for r in table.search().where(f"id IN {tuple(ids)}").limit(None).to_list()}
    written = np.stack([np.asarray(rows[i], np.float32) for i in ids])
    np.testing.assert_allclose(written, reference, atol=1e-5)


def test_routed_job_gives_each_row_its_route_and_that_routes_embedding(indexed, scene_shards, tmp_path):
    """Two routes split at the median complexity: rows are regrouped by route on the way to the encoder,
    and each must still land with its own route, token count and embedding."""
    cfg, _ = indexed
    first = lance_table(cfg.output.uri, "images")
    threshold = float(np.median(first.column("complexity").to_numpy()))
    routes = "[{name: cheap, exit_depth: 6, merge: tome, merge_keep: 0.7, merge_floor: 16}, {name: full}]"
    routed_cfg = index_config(
        [str(scene_shards)], str(tmp_path), f"router.routes={routes}", f"router.thresholds=[{threshold}]"
    )
    summary = run_index(routed_cfg)
    assert summary.rows_ok == 72 and summary.routes == Counter({"cheap": 36, "full": 36})
    rows = {r["id"]: r for r in lance_table(routed_cfg.output.uri, "images").to_pylist()}
    for r in rows.values():
        cheap = r["complexity"] < threshold
        assert (r["route"], r["exit_depth"], r["tokens"]) == (("cheap", 6, 16) if cheap else ("full", 12, 65))
    shard = pq.read_table(scene_shards / "00002.parquet", columns=["key", "jpg"])
    ids = [f"00002.parquet/{k}" for k in shard.column("key").to_pylist()]
    encoder = RoutedEncoder.from_config(routed_cfg.model, routed_cfg.router.routes)
    size = encoder.loaded.image_size
    pixels = np.stack([decode_image(b, size)[0] for b in shard.column("jpg").to_pylist()])
    route_ids = np.array([0 if rows[i]["route"] == "cheap" else 1 for i in ids], np.int32)
    expected = encoder.encode(pixels, route_ids).vectors
    written = np.stack([np.asarray(rows[i]["vector"], np.float32) for i in ids])
    np.testing.assert_allclose(written, expected, atol=1e-5)


def test_encoder_batches_hold_one_route_each_and_split_evenly():
    routes = np.array([0] * 70 + [1] * 30 + [2] * 128 + [0] * 3)
    batches = [(s.start, s.stop) for s in route_batches(routes, 64)]
    assert batches == [(0, 35), (35, 70), (70, 100), (100, 164), (164, 228), (228, 231)]
    assert all(len(set(routes[a:b])) == 1 for a, b in batches)
    assert list(route_batches(np.array([], np.int32), 64)) == []


def test_tiny_row_groups_travel_bundled_big_tasks_first_and_a_big_one_alone():
    units = [{"unit": i} for i in range(10)]
    rows = [500, 500, 4, 4, 4, 4, 4, 4, 4, 10_000]
    bundles = [[u["unit"] for u in json.loads(b["bundle"])] for b in bundle_units(units, rows, 256, 2)]
    assert bundles == [[0], [1], [2, 3, 4, 5, 6, 7, 8], [9]]  # in order, every unit once
    many = bundle_units([{"unit": i} for i in range(5000)], [4] * 5000, 1024, 2)
    sizes = [4 * len(json.loads(b["bundle"])) for b in many]
    assert sum(sizes) == 20_000 and sizes[0] == 1024  # capped by task_rows while much is left
    assert sizes == sorted(sizes, reverse=True) and min(sizes[:-1]) == 128  # shrinking: actors end together
    assert len(many) < 30  # 5,000 tiny shards cost a few dozen task round trips, not 5,000
    few = bundle_units(units[:6], [4] * 6, 256, 2)
    assert len(few) >= 4  # small jobs still leave every actor several tasks


def test_rerun_skips_committed_shards_and_writes_nothing(indexed):
    cfg, _ = indexed
    before = lance_table(cfg.output.uri, "images").num_rows
    summary = run_index(cfg)
    assert (summary.shards_already_done, summary.shards_committed, summary.rows_ok) == (3, 0, 0)
    assert lance_table(cfg.output.uri, "images").num_rows == before


def test_text_query_finds_the_scene_it_describes(indexed, scene_shards):
    cfg, _ = indexed
    rows = pq.read_table(scene_shards / "00002.parquet", columns=["key", "caption", "scene_key"]).to_pylist()
    searcher = Searcher.open(cfg)
    searcher.check_model()
    hits = 0
    for row in rows[:10]:
        results = searcher.search(searcher.embed_text([row["caption"]]), k=10)
        assert len(results) == 10 and results[0]["score"] >= results[-1]["score"]
        hits += any(r["caption"] == row["caption"] for r in results)
    assert hits >= 6  # a trained model retrieves most of its own captions among 72 images


def test_where_filter_restricts_results(indexed):
    cfg, _ = indexed
    searcher = Searcher.open(cfg)
    results = searcher.search(searcher.embed_text(["a red circle"]), k=50, where="id LIKE '00000.parquet/%'")
    assert len(results) == 24 and all(r["id"].startswith("00000.parquet/") for r in results)


def test_build_indexes_then_query_still_answers(ray_local, scene_shards, tmp_path):
    cfg = index_config([str(scene_shards)], str(tmp_path / "db"))
    run_index(cfg)
    info = build_indexes(cfg, partitions=2, sub_vectors=8)
    assert info["rows"] == 72
    table = lancedb.connect(cfg.output.uri).open_table("images")
    names = {i.name for i in table.list_indices()}
    assert {"vector_idx", "id_idx", "shard_idx", "route_idx"} <= names
    searcher = Searcher.open(cfg)
    assert len(searcher.search(searcher.embed_text(["a blue star"]), k=5)) == 5


def _write_shard(path: Path, rows: list[dict]) -> None:
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("url", pa.string()),
            ("caption", pa.string()),
            ("jpg", pa.binary()),
            ("status", pa.string()),
            ("error_message", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def test_bad_rows_and_bad_shards_are_recorded_never_dropped(ray_local, tmp_path):
    shards = tmp_path / "in"
    shards.mkdir()
    good, bad = imagefactory.good_bytes(), imagefactory.bad_bytes()
    rows = [dict(key=f"g-{n}", url=f"u/{n}", caption=n, jpg=b, status="success") for n, b in good.items()]
    rows += [dict(key=f"b-{n}", url=f"u/{n}", caption=n, jpg=b, status="success") for n, b in bad.items()]
    rows.append(dict(key="dl-failed", jpg=None, status="failed_to_download", error_message="HTTP 404"))
    _write_shard(shards / "mixed.parquet", rows)
    _write_shard(shards / "empty.parquet", [])
    truncated = (shards / "mixed.parquet").read_bytes()
    (shards / "truncated.parquet").write_bytes(truncated[: len(truncated) // 2])
    pq.write_table(pa.table({"key": ["a"], "caption": ["no image column"]}), shards / "noimage.parquet")

    cfg = index_config([str(shards)], str(tmp_path / "db"))
    summary = run_index(cfg)

    assert summary.rows_ok == len(good)
    assert summary.rows_skipped == 2  # the null image and the failed download
    assert summary.rows_failed == len(bad) - 1
    images = lance_table(cfg.output.uri, "images")
    assert sorted(images.column("id").to_pylist()) == sorted(f"mixed.parquet/g-{n}" for n in good)
    rejected = {r["id"]: r for r in lance_table(cfg.output.uri, "images_rejected").to_pylist()}
    assert set(rejected) == {f"mixed.parquet/b-{n}" for n in bad} | {"mixed.parquet/dl-failed"}
    assert rejected["mixed.parquet/dl-failed"]["status"] == "skipped"
    assert "HTTP 404" in rejected["mixed.parquet/dl-failed"]["reason"]
    assert rejected["mixed.parquet/b-null"]["status"] == "skipped"
    for name, reasons in imagefactory.BAD_CASE_REASONS.items():
        if name != "null":
            row = rejected[f"mixed.parquet/b-{name}"]
            assert row["status"] == "failed" and any(r in row["reason"] for r in reasons), row

    manifest = {Path(m["shard"]).name: m for m in lance_table(cfg.output.uri, "images_manifest").to_pylist()}
    assert manifest["empty.parquet"]["status"] == "done" and manifest["empty.parquet"]["rows_ok"] == 0
    assert manifest["truncated.parquet"]["status"] == "failed"
    assert "truncated.parquet" in manifest["truncated.parquet"]["error"]
    assert manifest["noimage.parquet"]["status"] == "failed"
    assert "missing required image column" in manifest["noimage.parquet"]["error"]
    assert summary.shards_failed == 2
