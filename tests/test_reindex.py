"""The nightly reindex over a folder where shards were added, rewritten and removed between runs."""

from __future__ import annotations

import json
from pathlib import Path

import lancedb
import pyarrow.parquet as pq
import pytest
from conftest import index_config, input_ids, lance_table

from icar_lab.scenes.shards import write_corpus
from pipeline.config import ConfigError
from pipeline.query import build_indexes, stored_settings
from pipeline.reindex import run_reindex


@pytest.fixture
def bucket(tmp_path) -> Path:
    """Four shards of 80 scenes (enough rows for an IVF_PQ index)."""
    write_corpus(tmp_path / "in", seed=3, split="nightly", num_images=320, shard_size=80)
    return tmp_path / "in"


def test_reindex_adds_replaces_and_removes_shards_then_maintains_and_reports(ray_local, bucket, tmp_path):
    cfg = index_config([str(bucket)], str(tmp_path / "db"))
    first = run_reindex(cfg)
    assert (first.summary["shards_committed"], first.shards_removed, first.rows_after) == (4, [], 320)
    build_indexes(cfg)

    # between two nights: one shard deleted, one rewritten with fewer rows, one new shard
    (bucket / "00003.parquet").unlink()
    rewritten = pq.read_table(bucket / "00001.parquet").slice(0, 50)
    pq.write_table(rewritten, bucket / "00001.parquet")
    write_corpus(tmp_path / "new", seed=4, split="nightly", num_images=80, shard_size=80)
    (tmp_path / "new" / "00000.parquet").rename(bucket / "00004.parquet")

    second = run_reindex(cfg)
    assert [Path(uri).name for uri in second.shards_removed] == ["00003.parquet"]
    s = second.summary
    assert (s["shards_total"], s["shards_already_done"], s["shards_committed"]) == (4, 2, 2)
    expected = input_ids(bucket)
    ids = lance_table(cfg.output.uri, "images").column("id").to_pylist()
    assert sorted(ids) == sorted(expected) and len(ids) == 80 + 50 + 80 + 80
    assert second.rows_before == 320 and second.rows_after == len(expected)
    assert second.version_after > second.version_before
    manifest = lance_table(cfg.output.uri, "images_manifest").to_pylist()
    assert {Path(m["shard"]).name: m["status"] for m in manifest}["00003.parquet"] == "removed"
    assert sorted(Path(m["shard"]).name for m in manifest if m["status"] != "removed") == [
        "00000.parquet",
        "00001.parquet",
        "00002.parquet",
        "00004.parquet",
    ]
    # 130 of 290 rows arrived after the index was built: past the 20% threshold, so it is rebuilt
    assert second.maintenance.vector_index == "rebuilt" and second.maintenance.unindexed_rows_before == 130

    report = json.loads(Path(second.paths[0]).read_text())
    assert report["shards_removed"] == second.shards_removed and report["rows_after"] == len(expected)
    latest = Path(second.paths[0]).with_name("latest.md").read_text()
    assert (
        latest == Path(second.paths[1]).read_text()
        and "| table rows before -> after | 320 -> 290 |" in latest
    )

    third = run_reindex(cfg)  # nothing changed: nothing written, the index is whole
    assert third.summary["shards_committed"] == 0 and third.shards_removed == []
    assert third.maintenance.vector_index == "folded in" and third.maintenance.unindexed_rows_before == 0
    images = lancedb.connect(cfg.output.uri).open_table("images")
    tuned = stored_settings(images.to_lance())
    assert tuned is not None and tuned.rows == 290  # retuned when the second night rebuilt the index
    (fts,) = [i for i in images.list_indices() if i.columns == ["caption"]]
    assert fts.index_type == "FTS" and fts.num_unindexed_rows == 0


def test_a_mass_removal_is_refused_and_nothing_is_deleted(ray_local, bucket, tmp_path):
    cfg = index_config([str(bucket)], str(tmp_path / "db"))
    run_reindex(cfg)
    for name in ("00000.parquet", "00001.parquet", "00002.parquet"):
        (bucket / name).unlink()
    with pytest.raises(ConfigError, match=r"3 of the 4 indexed shards are missing .*max_removed_share=0.5"):
        run_reindex(cfg)
    assert lance_table(cfg.output.uri, "images").num_rows == 320
    kept = cfg.model_copy(update={"reindex": cfg.reindex.model_copy(update={"delete_removed": False})})
    assert run_reindex(kept).shards_removed == []  # --keep-removed
    assert lance_table(cfg.output.uri, "images").num_rows == 320
