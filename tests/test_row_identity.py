"""Ids unique by construction, errors kept per shard, and a manifest that never forgets a partial write.

A null key never takes a real key's id; a non-UTF-8 caption or a corrupt page stays inside its row or
shard, never failing the job; a huge key costs its own bytes, not every row's; a `failed` record never
replaces `writing` (the shard would be appended twice). A shard that several workers write in parts
becomes visible whole, once. Repeated keys are marked by the reader: tests/test_shard_reading.py.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import index_config, lance_table
from PIL import Image
from processes import assert_exactly_once

from pipeline.config import InputConfig, OutputConfig
from pipeline.encode.model import model_preprocess
from pipeline.job import run_index
from pipeline.prepare import FAILED, OK, UNREADABLE, failed_unit, prepare_rows, prepare_unit, work_unit
from pipeline.read import inspect_shard, list_shards, read_chunks
from pipeline.storage import dataset_uri
from pipeline.write.commit import Committer, WrittenShard
from pipeline.write.fragments import FragmentTarget, fragments_of, images_rows, write_part
from pipeline.write.manifest import DONE, WRITING, ShardRecord
from pipeline.write.output import OutputTables
from pipeline.write.schema import images_schema

DIM = 4


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def _rows(ids: list[str], rows: list[int], shard: str = "x.parquet") -> dict[str, np.ndarray]:
    """Encoded rows as an encoder actor holds them before writing its part (`write_part`)."""
    n = len(ids)
    text = np.asarray([f"k{r}" for r in rows], dtype=object)
    return {
        "id": np.asarray(ids, dtype=object),
        "row": np.asarray(rows, np.int64),
        "shard": np.full(n, shard, dtype=object),
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


def test_one_huge_key_costs_its_own_bytes_not_every_rows():
    n, huge = 2000, "k" * 1_000_000
    ids = [f"x/{i}" for i in range(n - 1)] + [f"x/{huge}"]
    target = FragmentTarget("", "", images_schema(DIM, "float32", "m"), "m", {}, 1 << 20)
    images = images_rows(_rows(ids, list(range(n))), target)
    assert images.num_rows == n
    assert images.column("id").nbytes < 2 * len(huge)  # numpy astype(str): n x 4 MB = 8 GB


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


def _output(tmp_path: Path, model_id: str = "m", dim: int = DIM) -> OutputTables:
    return OutputTables(OutputConfig(uri=str(tmp_path / "db"), commit_backoff_seconds=0), model_id, dim)


def _written(tables: OutputTables, shard: str, keys: list[str], fingerprint: str = "f1") -> WrittenShard:
    """A shard whose rows an encoder actor wrote as fragment files (uncommitted)."""
    ids = [f"{shard}/{k}" for k in keys]
    part = write_part([_rows(ids, list(range(len(ids))), shard)], shard, tables.target())
    record = ShardRecord(shard, fingerprint, DONE, rows_ok=part["rows_ok"])
    return WrittenShard(record, fragments_of(part["images"]), fragments_of(part["rejected"]))


def test_a_failure_never_replaces_writing_or_done_and_a_known_shard_is_replaced_not_appended(tmp_path):
    shard = "it's.parquet"  # a quote in the shard name: a literal in the delete, never SQL
    tables = _output(tmp_path)
    manifest = tables.fence()
    # the state a kill after the images commit leaves behind: `writing`, the rows in the table
    manifest.record([ShardRecord(shard, "f1", WRITING)])
    tables.images.append(_written(tables, shard, ["a", "b"]).images)
    manifest.record(
        [
            ShardRecord(shard, "f1", FAILED, error="timeout reading it's.parquet"),
            ShardRecord("s2", "f2", FAILED, error="s2: not parquet"),
        ]
    )
    assert (manifest.status(shard), manifest.state(shard)["error"]) == (
        WRITING,
        "timeout reading it's.parquet",
    )
    assert manifest.status("s2") == FAILED
    assert manifest.known() == {shard} and manifest.committed() == {}

    # the next run replaces the shard it knows: every id stays once
    tables = _output(tmp_path)
    manifest = tables.fence()
    assert manifest.known() == {shard} and manifest.status(shard) == WRITING
    committer = Committer(tables, manifest, tables.cfg)
    committer.add(_written(tables, shard, ["a", "b"]))
    committer.flush()
    assert_exactly_once(lance_table(tables.cfg.uri, "images")["id"].to_pylist(), [f"{shard}/a", f"{shard}/b"])
    assert manifest.committed() == {shard: "f1"}
    manifest.record([ShardRecord(shard, "f1", FAILED, error="later failure")])
    assert manifest.committed() == {shard: "f1"}  # done stays done, with its counts
    assert (manifest.state(shard)["rows_ok"], manifest.state(shard)["error"]) == (2, "later failure")
    state = {m["shard"]: m for m in lance_table(tables.cfg.uri, "images_manifest").to_pylist()}[shard]
    assert (state["status"], state["rows_ok"], state["error"]) == (DONE, 2, "later failure")


def test_a_second_model_into_the_same_table_is_refused_naming_both(tmp_path):
    first = _output(tmp_path, "ViT-B-32:openai")
    manifest = first.fence()
    committer = Committer(first, manifest, first.cfg.model_copy(update={"compact_fragments": 1}))
    committer.add(_written(first, "s1", ["a"]))
    committer.flush()  # appended, compacted: the table's model survives the write path
    first.optimize()

    with pytest.raises(ValueError, match=r"ViT-B-32:openai.*ViT-B-32:laion2b.*icar reindex"):
        _output(tmp_path, "ViT-B-32:laion2b")
    with pytest.raises(ValueError, match=r"holds vectors \(4, 'float'\), this job writes \(8, 'float'\)"):
        _output(tmp_path, "ViT-B-32:openai", dim=8)
    again = _output(tmp_path, "ViT-B-32:openai")  # the same model reopens its table
    assert again.fence().committed() == {"s1": "f1"}


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


def _shard_ids_by_version(uri: str, shard: str) -> list[frozenset[str]]:
    """The ids of one shard that each version of a table showed, oldest first."""
    latest = lance.dataset(uri)
    return [
        frozenset(
            lance.dataset(uri, version=v["version"])
            .to_table(columns=["id"], filter=f"shard = '{shard}'")["id"]
            .to_pylist()
        )
        for v in latest.versions()
    ]


def test_a_shard_written_in_parts_by_several_actors_is_committed_whole_once_and_replaced_whole(
    ray_local, tmp_path
):
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
    assert pq.read_metadata(shards / "big.parquet").num_row_groups == 4  # four parts, on two actors
    cfg = index_config([str(shards)], str(tmp_path / "db"), "encoder.actors=2")
    summary = run_index(cfg)

    assert (summary.shards_committed, summary.rows_ok, summary.rows_skipped) == (5, 132, 20)
    old = [f"big.parquet/k{k}" for k in range(100)]
    small = [f"small{i}.parquet/s{i}-{k}" for i in range(4) for k in range(8)]
    assert_exactly_once(lance_table(cfg.output.uri, "images").column("id").to_pylist(), old + small)
    rejected = lance_table(cfg.output.uri, "images_rejected").to_pylist()
    assert len(rejected) == 20 and all(r["reason"].startswith("duplicate key") for r in rejected)
    manifest = {m["shard"]: m for m in lance_table(cfg.output.uri, "images_manifest").to_pylist()}
    assert (manifest["big.parquet"]["status"], manifest["big.parquet"]["rows_ok"]) == ("done", 100)
    assert manifest["big.parquet"]["rows_skipped"] == 20
    images = dataset_uri(cfg.output, "images")
    appeared = next(v for v, ids in enumerate(_shard_ids_by_version(images, "big.parquet"), 1) if ids)
    at = lance.dataset(images, version=appeared)
    by_file = {f.metadata.files[0].path: f for f in at.get_fragments()}
    parts = [
        f
        for f in at.read_transaction(appeared).operation.fragments
        if by_file[f.files[0].path].count_rows("shard = 'big.parquet'")
    ]
    assert len(parts) == 4  # each row group's part, in the one commit that showed the shard

    # the big shard rewritten with 60 rows in two row groups: replaced whole, its old ids gone
    new = [f"big.parquet/n{r}" for r in range(60)]
    pq.write_table(
        pa.table({"key": [f"n{r}" for r in range(60)], "jpg": [_jpeg(r) for r in range(60)]}),
        shards / "big.parquet",
        row_group_size=30,
    )
    again = run_index(cfg)
    assert (again.shards_already_done, again.shards_committed, again.rows_ok) == (4, 1, 60)
    assert_exactly_once(lance_table(cfg.output.uri, "images").column("id").to_pylist(), new + small)
    assert lance_table(cfg.output.uri, "images_rejected").num_rows == 0
    # no version of the table ever showed part of the shard, nor old rows beside new ones
    seen = set(_shard_ids_by_version(images, "big.parquet"))
    assert seen == {frozenset(), frozenset(old), frozenset(new)}
