"""Shards are known by dataset and name, not by location: a moved bucket is the same shards (nothing
re-embedded, duplicated or removed), and two datasets with the same file names share a table without
sharing ids or manifest rows."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from uuid import uuid4

import pyarrow.parquet as pq
import pytest
from conftest import index_config, input_ids, lance_s3_options, lance_table
from processes import assert_exactly_once

from pipeline.config import ConfigError, load_config
from pipeline.job import run_index
from pipeline.reindex import run_reindex

KEY = SECRET = "testing"
REGION = "us-east-1"


def _move(source: Path, target: Path) -> Path:
    """Move a folder of shards as `cp -p` / `rsync -a` do (contents and mtimes kept), leaving none behind."""
    shutil.copytree(source, target)  # copy2: keeps mtimes, the local fingerprint's change marker
    shutil.rmtree(source)
    return target


def test_a_moved_bucket_is_the_same_shards_nothing_reembedded_duplicated_or_removed(
    ray_local, scene_shards, tmp_path
):
    old = tmp_path / "old"
    shutil.copytree(scene_shards, old)
    db = str(tmp_path / "db")
    first = run_index(index_config([str(old)], db))
    assert (first.shards_committed, first.rows_ok) == (3, 72)

    new = _move(old, tmp_path / "elsewhere" / "new")
    moved = run_reindex(index_config([str(new)], db))
    s = moved.summary
    assert (s["shards_total"], s["shards_already_done"], s["shards_committed"], s["rows_ok"]) == (3, 3, 0, 0)
    assert moved.shards_removed == [] and moved.rows_before == moved.rows_after == 72
    assert_exactly_once(lance_table(db, "images").column("id").to_pylist(), input_ids(new))
    manifest = lance_table(db, "images_manifest").to_pylist()
    assert sorted((m["shard"], m["uri"], m["status"]) for m in manifest) == [
        (name, str(new / name), "done") for name in ("00000.parquet", "00001.parquet", "00002.parquet")
    ]

    # a shard changed at the new location replaces the rows it had at the old one
    pq.write_table(pq.read_table(new / "00001.parquet").slice(0, 10), new / "00001.parquet")
    changed = run_index(index_config([str(new)], db))
    assert (changed.shards_already_done, changed.shards_committed, changed.rows_ok) == (2, 1, 10)
    assert_exactly_once(lance_table(db, "images").column("id").to_pylist(), input_ids(new))


def test_two_datasets_with_the_same_file_names_share_a_table_apart(ray_local, scene_shards, tmp_path):
    laion, coco, db = tmp_path / "laion", tmp_path / "coco", str(tmp_path / "db")
    shutil.copytree(scene_shards, laion)
    shutil.copytree(scene_shards, coco)  # the same file names (and here even the same keys)
    for dataset, folder in (("laion", laion), ("coco", coco)):
        summary = run_index(index_config([str(folder)], db, f"input.dataset={dataset}"))
        assert (summary.shards_already_done, summary.shards_committed) == (0, 3)

    ids = lance_table(db, "images").column("id").to_pylist()
    expected = [f"{d}/{i}" for d in ("laion", "coco") for i in input_ids(scene_shards)]
    assert_exactly_once(ids, expected)
    assert "laion/00000.parquet/" + pq.read_table(laion / "00000.parquet")["key"][0].as_py() in ids
    manifest = lance_table(db, "images_manifest").to_pylist()
    assert Counter((m["dataset"], m["status"]) for m in manifest) == {
        ("laion", "done"): 3,
        ("coco", "done"): 3,
    }
    assert len({(m["dataset"], m["shard"]) for m in manifest}) == 6

    # the nightly run of one dataset removes its own missing shard and never sees the other's as removed
    (laion / "00002.parquet").unlink()
    report = run_reindex(index_config([str(laion)], db, "input.dataset=laion"))
    assert report.shards_removed == ["laion/00002.parquet"]
    assert report.summary["shards_already_done"] == 2 and report.summary["shards_committed"] == 0
    remaining = [i for i in expected if not i.startswith("laion/00002.parquet/")]
    assert_exactly_once(lance_table(db, "images").column("id").to_pylist(), remaining)
    states = {(m["dataset"], m["shard"]): m["status"] for m in lance_table(db, "images_manifest").to_pylist()}
    # the removed shard's state is `removed` until the log is compacted, then forgotten
    assert states.pop(("laion", "laion/00002.parquet"), "removed") == "removed"
    assert states == {
        **{("coco", f"coco/0000{i}.parquet"): "done" for i in range(3)},
        **{("laion", f"laion/0000{i}.parquet"): "done" for i in range(2)},
    }


def test_the_same_shards_under_another_s3_prefix_are_already_done(ray_local, s3_server, scene_shards):
    import boto3

    bucket = f"icar-{uuid4().hex[:8]}"
    client = boto3.client(
        "s3", endpoint_url=s3_server, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name=REGION
    )
    client.create_bucket(Bucket=bucket)
    for path in sorted(scene_shards.glob("*.parquet")):
        client.upload_file(str(path), bucket, f"2025/{path.name}")
    lance_options = lance_s3_options(s3_server)

    def config(prefix: str):
        cfg = index_config([f"s3://{bucket}/{prefix}/"], f"s3://{bucket}/lance", "input.dataset=scenes")
        cfg.input.storage_options = {"endpoint_url": s3_server, "key": KEY, "secret": SECRET}
        cfg.output.storage_options = lance_options
        return cfg

    assert run_index(config("2025")).shards_committed == 3
    for path in sorted(scene_shards.glob("*.parquet")):  # a server-side copy keeps the ETag
        client.copy_object(Bucket=bucket, Key=f"archive/{path.name}", CopySource=f"{bucket}/2025/{path.name}")
        client.delete_object(Bucket=bucket, Key=f"2025/{path.name}")

    report = run_reindex(config("archive"))
    assert report.shards_removed == [] and report.summary["shards_committed"] == 0
    expected = [f"scenes/{i}" for i in input_ids(scene_shards)]
    assert_exactly_once(
        lance_table(config("archive").output.uri, "images", **lance_options)["id"].to_pylist(), expected
    )
    manifest = lance_table(f"s3://{bucket}/lance", "images_manifest", **lance_options).to_pylist()
    assert sorted(m["uri"] for m in manifest) == [f"s3://{bucket}/archive/0000{i}.parquet" for i in range(3)]


@pytest.mark.parametrize("name", ["a/b", "", "-x", "x y"])
def test_a_dataset_name_that_could_blur_ids_is_refused_naming_the_field(name):
    with pytest.raises(ConfigError, match="input.dataset"):
        load_config(None, [f"input.dataset={name!r}"])
