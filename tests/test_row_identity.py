"""Ids unique by construction, errors kept per shard, and a manifest that never forgets a partial write.

Each test here failed before the change it guards: repeated keys wrote two rows with one id, a null key
could take a real key's id, one non-UTF-8 caption or one corrupt page aborted the whole job, a `failed`
record replaced `writing` (so the shard was later appended twice), and a quote in the model id broke
every manifest query.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import index_config, lance_table
from PIL import Image

from pipeline.assemble import shard_tables
from pipeline.config import InputConfig, OutputConfig
from pipeline.encode.model import model_preprocess
from pipeline.job import run_index
from pipeline.prepare import OK, SKIPPED, UNREADABLE, failed_unit, prepare_rows, prepare_unit, work_unit
from pipeline.read import inspect_shard, list_shards, read_chunks
from pipeline.write import DONE, WRITING, LanceWriter, ShardRecord, images_schema

DIM = 4


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def _rows(ids: list[str], rows: list[int]) -> dict[str, np.ndarray]:
    """Encoded rows as they come back from Ray (any order), for `shard_tables`."""
    n = len(ids)
    text = np.asarray([f"k{r}" for r in rows], dtype=object)
    return {
        "id": np.asarray(ids, dtype=object),
        "row": np.asarray(rows, np.int64),
        "shard": np.full(n, "s3://b/x.parquet", dtype=object),
        "key": text,
        "url": text,
        "caption": text,
        "outcome": np.full(n, OK, dtype=object),
        "reason": np.full(n, "", dtype=object),
        "vector": np.arange(n * DIM, dtype=np.float32).reshape(n, DIM),
        "complexity": np.zeros(n, np.float32),
        "route_name": np.full(n, "full", dtype=object),
        "exit_depth": np.full(n, 12, np.int32),
        "tokens": np.full(n, 65, np.int32),
        "gflops": np.ones(n, np.float32),
        "thumbnail": np.full(n, None, dtype=object),
        **{t: np.zeros(n, np.float32) for t in ("t_read", "t_decode", "t_score", "t_encode")},
    }


def test_a_repeated_key_keeps_its_first_row_in_shard_order_and_rejects_the_rest():
    # rows arrive out of shard order (route-sorted, several batches): "a" first appears at row 1
    ids = ["x/a", "x/b", "x/a", "x/a", "x/c"]
    rows = [3, 0, 1, 6, 2]
    tables = shard_tables(_rows(ids, rows), "x.parquet", "m")
    images = tables.images.to_pylist()
    assert sorted(r["id"] for r in images) == ["x/a", "x/b", "x/c"]
    kept = next(r for r in images if r["id"] == "x/a")
    assert kept["key"] == "k1"  # row 1, not row 3 that came first in the batch
    rejected = {r["id"]: r for r in tables.rejected.to_pylist()}
    assert set(rejected) == {"x.parquet#3", "x.parquet#6"}
    assert all(r["status"] == SKIPPED and "row 1" in r["reason"] for r in rejected.values())
    assert (tables.rows_ok, tables.rows_skipped, tables.rows_failed) == (3, 2, 0)


def test_one_huge_key_costs_its_own_bytes_not_every_rows():
    n, huge = 2000, "k" * 1_000_000
    ids = [f"x/{i}" for i in range(n - 1)] + [f"x/{huge}"]
    tables = shard_tables(_rows(ids, list(range(n))), "x.parquet", "m")
    assert tables.images.column("id").nbytes < 2 * len(huge)  # numpy astype(str): n x 4 MB = 8 GB


def _shard(path: Path, keys: list, captions: pa.Array | None = None) -> None:
    images = [_jpeg(i) for i in range(len(keys))]
    columns = {"key": pa.array(keys, pa.string()), "jpg": pa.array(images, pa.binary())}
    if captions is not None:
        columns["caption"] = captions
    pq.write_table(pa.table(columns), path)


def test_a_null_key_gets_a_positional_id_no_real_key_can_take(tmp_path):
    _shard(tmp_path / "s.parquet", ["row1", None, "row1x"])
    cfg = InputConfig(paths=[str(tmp_path)])
    plan = inspect_shard(list_shards(cfg)[0], cfg)
    table = next(read_chunks(plan, 0, cfg, 16))
    assert table.column("id").to_pylist() == ["s.parquet/row1", "s.parquet#1", "s.parquet/row1x"]
    assert table.column("key").to_pylist() == ["row1", None, "row1x"]
    assert table.column("row").to_pylist() == [0, 1, 2]


def test_bytes_that_are_not_utf8_are_replaced_not_fatal(tmp_path):
    captions = pa.array([b"caf\xe9 au lait", b"fine", None], pa.binary())
    _shard(tmp_path / "s.parquet", ["a", "b", "c"], captions)
    cfg = InputConfig(paths=[str(tmp_path)])
    plan = inspect_shard(list_shards(cfg)[0], cfg)
    table = next(read_chunks(plan, 0, cfg, 16))
    assert table.column("caption").to_pylist() == ["caf\ufffd au lait", "fine", None]


def _corrupt_first_page(path: Path) -> None:
    """Overwrite the first column chunk's page header, keeping the footer: inspection still passes."""
    data = bytearray(path.read_bytes())
    data[4:68] = b"\xff" * 64
    path.write_bytes(bytes(data))


def test_repeated_keys_bad_text_and_a_corrupt_page_stay_inside_their_shard(ray_local, tmp_path):
    shards = tmp_path / "in"
    shards.mkdir()
    _shard(shards / "dup.parquet", ["a", "b", "a", "c", "a"])
    _shard(shards / "nullkey.parquet", ["row1", None, None])
    _shard(shards / "latin1.parquet", ["x", "y"], pa.array([b"na\xefve", b"ok"], pa.binary()))
    _shard(shards / "corrupt.parquet", ["p", "q"])
    _corrupt_first_page(shards / "corrupt.parquet")
    plain = InputConfig(paths=[str(shards)])
    plans = {s.name: inspect_shard(s, plain) for s in list_shards(plain)}
    assert plans["corrupt.parquet"].error is None  # the footer is intact: only the pages are damaged

    cfg = index_config([str(shards)], str(tmp_path / "db"))
    summary = run_index(cfg)

    ids = lance_table(cfg.output.uri, "images").column("id").to_pylist()
    assert Counter(ids) == Counter(
        ["dup.parquet/a", "dup.parquet/b", "dup.parquet/c"]
        + ["nullkey.parquet/row1", "nullkey.parquet#1", "nullkey.parquet#2"]
        + ["latin1.parquet/x", "latin1.parquet/y"]
    )
    rejected = {r["id"]: r["reason"] for r in lance_table(cfg.output.uri, "images_rejected").to_pylist()}
    assert set(rejected) == {"dup.parquet#2", "dup.parquet#4"}
    assert summary.shards_failed == 1 and summary.shards_committed == 3
    ((uri, reason),) = summary.failed_shards.items()
    assert uri.endswith("corrupt.parquet") and "row group 0" in reason
    manifest = {Path(m["shard"]).name: m for m in lance_table(cfg.output.uri, "images_manifest").to_pylist()}
    assert (
        manifest["corrupt.parquet"]["status"] == "failed"
        and "corrupt.parquet" in manifest["corrupt.parquet"]["error"]
    )
    assert manifest["dup.parquet"]["rows_ok"] == 3 and manifest["dup.parquet"]["rows_skipped"] == 2


def _writer(tmp_path: Path, model_id: str) -> LanceWriter:
    return LanceWriter(OutputConfig(uri=str(tmp_path / "db")), model_id, DIM)


def _images(ids: list[str], shard: str, model_id: str) -> pa.Table:
    rows = [
        {"id": i, "shard": shard, "key": i, "vector": [0.0] * DIM, "route": "full", "model_id": model_id}
        for i in ids
    ]
    return pa.Table.from_pylist(rows, schema=images_schema(DIM, "float32"))


def test_a_failure_never_replaces_writing_or_done_and_known_shards_are_upserted(tmp_path):
    model = "icar-tiny-vit:/models/it's here.safetensors"  # a quote in the model id: escaped, not SQL
    writer = _writer(tmp_path, model)
    empty = pa.table({})
    writer.commit_shard(
        ShardRecord("s1", "f1", DONE, rows_ok=2), _images(["s1/a", "s1/b"], "s1", model), empty, upsert=False
    )
    # the state a kill after the images commit leaves behind
    writer.manifest.update(where="shard = 's1'", values={"status": WRITING})
    writer.record_failed_shard(ShardRecord("s1", "f1", "failed", error="timeout reading s1"))
    writer.record_failed_shard(ShardRecord("s2", "f2", "failed", error="s2: not parquet"))

    rows = {r["shard"]: r for r in writer.manifest.to_arrow().to_pylist()}
    assert rows["s1"]["status"] == WRITING and rows["s1"]["error"] == "timeout reading s1"
    assert rows["s2"]["status"] == "failed"
    assert writer.known() == {"s1", "s2"} and writer.committed() == {}

    # the next run upserts the shard it knows: every id stays once
    writer.commit_shard(
        ShardRecord("s1", "f1", DONE, rows_ok=2),
        _images(["s1/a", "s1/b"], "s1", model),
        empty,
        upsert="s1" in writer.known(),
    )
    assert sorted(writer.images.to_arrow().column("id").to_pylist()) == ["s1/a", "s1/b"]
    assert writer.committed() == {"s1": "f1"}
    writer.record_failed_shard(ShardRecord("s1", "f1", "failed", error="later failure"))
    assert writer.committed() == {"s1": "f1"}  # done stays done


def test_a_second_model_into_the_same_table_is_refused_naming_both(tmp_path):
    first = _writer(tmp_path, "ViT-B-32:openai")
    first.commit_shard(
        ShardRecord("s1", "f1", DONE, rows_ok=1),
        _images(["s1/a"], "s1", "ViT-B-32:openai"),
        pa.table({}),
        False,
    )
    with pytest.raises(ValueError, match=r"ViT-B-32:openai.*ViT-B-32:laion2b.*own output.table"):
        _writer(tmp_path, "ViT-B-32:laion2b")
    _writer(tmp_path, "ViT-B-32:openai")  # the same model reopens its table


def test_the_unreadable_marker_has_the_columns_and_dtypes_of_a_prepared_batch(tmp_path):
    _shard(tmp_path / "s.parquet", ["a", "b"])
    cfg = index_config([str(tmp_path)], str(tmp_path / "db"))
    plan = inspect_shard(list_shards(cfg.input)[0], cfg.input)
    unit = {k: np.asarray([v]) for k, v in work_unit(plan, 0).items()}
    preprocess = model_preprocess(cfg.model)
    (prepared,) = prepare_unit(unit, cfg.model_dump(), preprocess)
    marker = failed_unit(work_unit(plan, 0), "boom", preprocess)
    assert {k: (v.dtype, v.shape[1:]) for k, v in marker.items()} == {
        k: (v.dtype, v.shape[1:]) for k, v in prepared.items()
    }
    assert marker["outcome"][0] == UNREADABLE and marker["shard"][0] == plan.shard.name


def test_oversized_text_fails_its_row_is_stored_cut_and_a_huge_key_loses_its_id(tmp_path):
    captions = pa.array(["fine", "c" * 5000, "ok"], pa.string())
    _shard(tmp_path / "s.parquet", ["a", "b", "k" * 3000], captions)
    cfg = index_config([str(tmp_path)], str(tmp_path / "db"), "input.max_text_bytes=1024")
    plan = inspect_shard(list_shards(cfg.input)[0], cfg.input)
    table = next(read_chunks(plan, 0, cfg.input, 16))
    assert table.column("id").to_pylist() == ["s.parquet/a", "s.parquet/b", "s.parquet#2"]
    assert [len(c) for c in table.column("caption").to_pylist()] == [4, 1024, 2]
    assert len(table.column("key").to_pylist()[2]) == 1024
    assert table.column("text_error").to_pylist() == [
        None,
        "caption is 5000 bytes, over input.max_text_bytes=1024",
        "key is 3000 bytes, over input.max_text_bytes=1024",
    ]
    batch = prepare_rows(table, cfg, model_preprocess(cfg.model))
    outcome = dict(zip(batch["id"], batch["outcome"], strict=True))
    assert outcome == {"s.parquet/a": OK, "s.parquet/b": "failed", "s.parquet#2": "failed"}


def test_a_shard_larger_than_the_buffer_is_written_in_parts_once_and_replaced_whole(ray_local, tmp_path):
    shards = tmp_path / "in"
    shards.mkdir()
    for i in range(4):
        _shard(shards / f"small{i}.parquet", [f"s{i}-{k}" for k in range(8)])
    big = [f"k{r % 100}" for r in range(120)]  # keys 0-19 repeat 100 rows later: in another part
    pq.write_table(
        pa.table({"key": big, "jpg": [_jpeg(r) for r in range(120)]}),
        shards / "big.parquet",
        row_group_size=30,
    )
    cfg = index_config([str(shards)], str(tmp_path / "db"), "output.max_buffered_rows=40")
    summary = run_index(cfg)

    assert pq.read_metadata(shards / "big.parquet").num_rows > 40  # the shard cannot be held whole
    assert summary.peak_buffered_rows <= 40 + 30  # the buffer plus at most one row group's rows
    ids = lance_table(cfg.output.uri, "images").column("id").to_pylist()
    expected = [f"big.parquet/k{k}" for k in range(100)] + [
        f"small{i}.parquet/s{i}-{k}" for i in range(4) for k in range(8)
    ]
    assert sorted(ids) == sorted(expected)
    rejected = lance_table(cfg.output.uri, "images_rejected").to_pylist()
    assert len(rejected) == 20 and all(r["reason"].startswith("duplicate key") for r in rejected)
    manifest = {Path(m["shard"]).name: m for m in lance_table(cfg.output.uri, "images_manifest").to_pylist()}
    assert (manifest["big.parquet"]["status"], manifest["big.parquet"]["rows_ok"]) == ("done", 100)
    assert manifest["big.parquet"]["rows_skipped"] == 20

    # the big shard rewritten with 60 rows: replaced in parts, its 40 vanished keys deleted
    pq.write_table(
        pa.table({"key": [f"n{r}" for r in range(60)], "jpg": [_jpeg(r) for r in range(60)]}),
        shards / "big.parquet",
        row_group_size=30,
    )
    again = run_index(cfg)
    assert (again.shards_committed, again.rows_ok) == (1, 60)
    ids = lance_table(cfg.output.uri, "images").column("id").to_pylist()
    assert sorted(ids) == sorted([f"big.parquet/n{r}" for r in range(60)] + expected[100:])
