"""A worker holding one row group marks a shard's repeated keys as if it had seen the whole shard, and a
shard that changes between listing and reading fails alone, under its name.

Real parquet files (several row groups) of real PNG/JPEG bytes; the reference for duplicates is what the
driver did before, over all of a shard's rows at once (`_drivers_marking`).
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import IndexConfig
from pipeline.encode.model import model_preprocess
from pipeline.prepare import OK, SKIPPED, UNREADABLE, Batch, prepare_rows, prepare_unit, work_unit
from pipeline.read import ShardChanged, ShardPlan, inspect_shard, list_shards, read_chunks, row_id

LIMIT = 64  # input.max_text_bytes: a longer key loses its id
LONG = "L" * 100


def _image(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG" if seed % 2 else "JPEG")
    return out.getvalue()


def _write(path: Path, keys: list[str | None], row_group_size: int) -> None:
    images = pa.array([_image(i) for i in range(len(keys))], pa.binary())
    pq.write_table(
        pa.table({"key": pa.array(keys, pa.string()), "jpg": images}), path, row_group_size=row_group_size
    )


def _config(folder: Path, chunk_rows: int = 3) -> IndexConfig:
    return IndexConfig.model_validate(
        {
            "input": {"paths": [str(folder)], "max_text_bytes": LIMIT},
            "router": {"routes": [{"name": "full"}]},
            "ray": {"decode_batch_size": chunk_rows},
        }
    )


def _plan(cfg: IndexConfig) -> ShardPlan:
    (shard,) = list_shards(cfg.input)
    plan = inspect_shard(shard, cfg.input)
    assert plan.error is None
    return plan


def _drivers_marking(rows: Batch, shard_name: str) -> Batch:
    """`assemble.mark_duplicates` as the driver ran it on a whole shard (commit 126e68a; the module goes
    with the driver-side writer), kept here as the reference the workers' marking must equal."""
    order = np.argsort(rows["row"], kind="stable")
    rows = {k: v[order] for k, v in rows.items()}
    codes = pa.array(rows["id"], pa.string()).dictionary_encode().indices.to_numpy()
    unique, first = np.unique(codes, return_index=True)
    first_row = rows["row"][first[np.searchsorted(unique, codes)]]
    repeat = first_row != rows["row"]
    if repeat.any():
        rows["outcome"][repeat] = SKIPPED
        rows["reason"][repeat] = [
            f"duplicate key: row {r} of the shard has it and was kept" for r in first_row[repeat]
        ]
        rows["id"][repeat] = [row_id(shard_name, None, int(r)) for r in rows["row"][repeat]]
    return rows


def _prepare_all(plan: ShardPlan, cfg: IndexConfig, raw: bool = False) -> Batch:
    """Every row group, each read on its own as a worker reads it, prepared and joined in shard order.
    `raw`: with no row marked at read time, as the driver's marking received them."""
    preprocess = model_preprocess(cfg.model)
    batches = []
    for row_group in range(plan.row_groups):
        for table in read_chunks(plan, row_group, cfg.input, cfg.ray.decode_batch_size):
            if raw:
                none = pa.array(np.full(table.num_rows, -1, np.int64))
                table = table.set_column(table.schema.get_field_index("repeat_of"), "repeat_of", none)
            batches.append(prepare_rows(table, cfg, preprocess))
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    order = np.argsort(rows["row"], kind="stable")
    return {k: v[order] for k, v in rows.items()}


# 4 row groups of 5 rows. "a" repeats inside row group 0 and in row groups 1 and 3, "b" in row group 2,
# "c" twice in row group 3 (first in row group 1); null keys (rows 3, 7, 18) and over-long keys (rows 4
# and 9, equal, but they lose their ids) never repeat.
KEYS: list[str | None] = (
    ["a", "b", "a", None, LONG]
    + ["c", "a", None, "d", LONG]
    + ["e", "b", "f", "g", "h"]
    + ["c", "c", "a", None, "i"]
)
REPEATS = {2: 0, 6: 0, 11: 1, 15: 5, 16: 5, 17: 0}  # repeated row -> the row kept


def test_marking_per_row_group_equals_the_drivers_marking_over_the_whole_shard(tmp_path):
    _write(tmp_path / "s.parquet", KEYS, row_group_size=5)
    cfg = _config(tmp_path)
    plan = _plan(cfg)
    assert plan.row_groups == 4

    got = _prepare_all(plan, cfg)
    want = _drivers_marking(_prepare_all(plan, cfg, raw=True), plan.shard.name)

    for column in ("row", "id", "outcome", "reason", "key", "route"):
        assert got[column].tolist() == want[column].tolist(), column
    assert np.array_equal(got["image"][got["outcome"] == OK], want["image"][want["outcome"] == OK])
    assert sorted(got["row"][got["outcome"] == SKIPPED].tolist()) == sorted(REPEATS)
    assert len(set(got["id"].tolist())) == len(KEYS)


def test_repeats_across_row_groups_take_their_positional_id_and_name_the_kept_row(tmp_path):
    _write(tmp_path / "s.parquet", KEYS, row_group_size=5)
    cfg = _config(tmp_path)
    plan = _plan(cfg)

    (chunk,) = read_chunks(plan, 3, cfg.input, 10)  # row group 3 alone, as its worker reads it
    assert chunk.column("row").to_pylist() == [15, 16, 17, 18, 19]
    assert chunk.column("repeat_of").to_pylist() == [5, 5, 0, -1, -1]

    rows = _prepare_all(plan, cfg)
    by_row = {
        int(r): (i, o, why)
        for r, i, o, why in zip(rows["row"], rows["id"], rows["outcome"], rows["reason"], strict=True)
    }
    for row, kept in REPEATS.items():
        reason = f"duplicate key: row {kept} of the shard has it and was kept"
        assert by_row[row] == (f"s.parquet#{row}", SKIPPED, reason)
    assert [by_row[r][:2] for r in (0, 1, 5, 3, 18)] == [
        ("s.parquet/a", OK),
        ("s.parquet/b", OK),
        ("s.parquet/c", OK),
        ("s.parquet#3", OK),
        ("s.parquet#18", OK),
    ]
    # over-long keys: positional ids, failed for their text, never taken for repeats of one another
    assert [by_row[r][:2] for r in (4, 9)] == [("s.parquet#4", "failed"), ("s.parquet#9", "failed")]


def _units(plan: ShardPlan, cfg: IndexConfig) -> list[Batch]:
    preprocess = model_preprocess(cfg.model)
    out = []
    for row_group in range(plan.row_groups):
        unit = {k: np.asarray([v]) for k, v in work_unit(plan, row_group).items()}
        out += list(prepare_unit(unit, cfg.model_dump(), preprocess))
    return out


def test_an_unchanged_shard_reads_whole(tmp_path):
    _write(tmp_path / "s.parquet", [f"k{i}" for i in range(12)], row_group_size=4)
    cfg = _config(tmp_path)
    plan = _plan(cfg)
    batches = _units(plan, cfg)
    rows = np.concatenate([b["row"] for b in batches])
    outcome = np.concatenate([b["outcome"] for b in batches])
    assert sorted(rows.tolist()) == list(range(12)) and set(outcome.tolist()) == {OK}


def test_a_shard_rewritten_after_listing_fails_alone_naming_its_file(tmp_path):
    shard = tmp_path / "s.parquet"
    _write(shard, [f"k{i}" for i in range(8)], row_group_size=4)
    cfg = _config(tmp_path)
    plan = _plan(cfg)
    _write(shard, [f"k{i}" for i in range(12)], row_group_size=4)  # rows appended: another size

    for row_group in range(plan.row_groups):
        unit = {k: np.asarray([v]) for k, v in work_unit(plan, row_group).items()}
        (marker,) = prepare_unit(unit, cfg.model_dump(), model_preprocess(cfg.model))
        assert marker["outcome"].tolist() == [UNREADABLE] and marker["row"].tolist() == [-1]
        assert marker["shard"][0] == "s.parquet"
        (reason,) = marker["reason"]
        assert reason.startswith(
            f"{shard}: changed while being read (listed as {plan.shard.fingerprint}, now "
        )
        assert "rerun to index its new content" in reason


def test_a_change_is_not_retried(tmp_path, monkeypatch):
    _write(tmp_path / "s.parquet", ["a", "b"], row_group_size=2)
    cfg = _config(tmp_path)
    stale = dataclasses.replace(_plan(cfg), shard=dataclasses.replace(_plan(cfg).shard, fingerprint="1:0"))
    opened = []
    real = read_chunks

    def counting(*args, **kwargs):
        opened.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("pipeline.prepare.read_chunks", counting)
    monkeypatch.setattr("pipeline.prepare.RETRY_BACKOFF_S", 0.0)
    unit = {k: np.asarray([v]) for k, v in work_unit(stale, 0).items()}
    (marker,) = prepare_unit(unit, cfg.model_dump(), model_preprocess(cfg.model))
    assert marker["outcome"][0] == UNREADABLE and "listed as 1:0" in marker["reason"][0]
    assert len(opened) == 1


def test_rows_beyond_the_listed_footer_are_a_change_naming_the_file(tmp_path):
    _write(tmp_path / "s.parquet", ["a", "b", "c"], row_group_size=3)
    cfg = _config(tmp_path)
    plan = _plan(cfg)
    listed_fewer = dataclasses.replace(plan, num_rows=2)  # same fingerprint, a footer of 2 rows listed
    with pytest.raises(ShardChanged, match=r"s\.parquet: changed while being read \(listed with 2 rows"):
        next(read_chunks(listed_fewer, 0, cfg.input, 8))


def test_on_s3_the_listed_etag_matches_the_workers_and_an_overwrite_is_caught(s3_server, tmp_path):
    import boto3

    bucket = "icar-shard-reading"
    client = boto3.client(
        "s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    client.create_bucket(Bucket=bucket)
    local = tmp_path / "s.parquet"
    _write(local, KEYS, row_group_size=5)
    client.upload_file(str(local), bucket, "in/s.parquet")
    cfg = _config(tmp_path)
    cfg.input.paths = [f"s3://{bucket}/in"]
    cfg.input.storage_options = {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}
    plan = _plan(cfg)

    rows = _prepare_all(plan, cfg)  # the listing's fingerprint is the one a worker sees
    assert sorted(rows["row"][rows["outcome"] == SKIPPED].tolist()) == sorted(REPEATS)

    _write(local, KEYS[:10], row_group_size=5)
    client.upload_file(str(local), bucket, "in/s.parquet")
    (marker,) = _units(dataclasses.replace(plan, row_groups=1), cfg)
    assert marker["outcome"][0] == UNREADABLE
    assert marker["reason"][0].startswith(f"s3://{bucket}/in/s.parquet: changed while being read")
