"""The write path's protocol on real Lance datasets on local disk: fencing, the shard manifest's log,
commit rounds, compaction, and fragment files that no commit ever made visible.

Rows are written the way the encoder actors write them (`write_part` on encoded batches); each test says
which promise of `pipeline/write/*` it holds to."""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
from processes import assert_exactly_once

from pipeline.config import OutputConfig
from pipeline.lease import LeaseLost
from pipeline.prepare import FAILED, OK, UNREADABLE, Batch
from pipeline.read import Shard, ShardPlan
from pipeline.write.collect import ShardCollector
from pipeline.write.commit import Committer, WrittenShard
from pipeline.write.fenced import FencedTable
from pipeline.write.fragments import fragments_of, part_batch, write_part
from pipeline.write.manifest import DONE, REMOVED, WRITING, ShardManifest, ShardRecord
from pipeline.write.output import OutputTables
from pipeline.write.schema import MANIFEST_SCHEMA

DIM = 4
MODEL = "m"


def _cfg(tmp_path: Path, **overrides) -> OutputConfig:
    return OutputConfig(uri=str(tmp_path / "db"), commit_backoff_seconds=0, **overrides)


def _open(cfg: OutputConfig, dataset: str | None = None) -> tuple[OutputTables, ShardManifest]:
    """What a run does when it takes the output: open the tables, fence them, read the manifest."""
    tables = OutputTables(cfg, MODEL, DIM, dataset)
    return tables, tables.fence()


def _encoded(ids: list[str], shard: str, rejected: tuple[str, ...] = ()) -> Batch:
    """Encoded rows as an encoder actor holds them before writing; ids in `rejected` failed to decode."""
    n = len(ids)
    text = np.asarray([i.rsplit("/", 1)[-1] for i in ids], dtype=object)
    bad = np.asarray([i in rejected for i in ids])
    return {
        "id": np.asarray(ids, dtype=object),
        "row": np.arange(n, dtype=np.int64),
        "shard": np.full(n, shard, dtype=object),
        "key": text,
        "url": text,
        "caption": text,
        "outcome": np.where(bad, FAILED, OK).astype(object),
        "reason": np.where(bad, "not an image", "").astype(object),
        "vector": np.arange(n * DIM, dtype=np.float32).reshape(n, DIM),
        "complexity": np.zeros(n, np.float32),
        "route_name": np.full(n, "full", dtype=object),
        "exit_depth": np.full(n, 12, np.int32),
        "tokens": np.full(n, 65, np.int32),
        "gflops": np.ones(n, np.float32),
        "thumbnail": np.full(n, None, dtype=object),
        **{t: np.zeros(n, np.float32) for t in ("t_read", "t_decode", "t_score", "t_encode")},
    }


def _unreadable(shard: str) -> Batch:
    """The marker a worker gets for a row group it could not read (`prepare.failed_unit`)."""
    return _encoded([f"{shard}#0"], shard) | {
        "outcome": np.asarray([UNREADABLE], dtype=object),
        "reason": np.asarray([f"/in/{shard}: row group 1 unreadable"], dtype=object),
    }


def _part(tables: OutputTables, shard: str, ids: list[str], rejected: tuple[str, ...] = ()) -> dict:
    part = write_part([_encoded(ids, shard, rejected)], shard, tables.target())
    assert part["error"] == ""
    return part


def _written(
    tables: OutputTables, shard: str, ids: list[str], rejected: tuple[str, ...] = (), fingerprint: str = "f1"
) -> WrittenShard:
    """A shard whose rows a worker wrote as fragment files, as the collector hands it to the committer."""
    part = _part(tables, shard, ids, rejected)
    record = ShardRecord(
        shard,
        fingerprint,
        DONE,
        rows_ok=part["rows_ok"],
        rows_failed=part["rows_failed"],
        uri=f"/in/{shard}",
    )
    return WrittenShard(record, fragments_of(part["images"]), fragments_of(part["rejected"]))


def _ids(table: FencedTable | str) -> list[str]:
    """The ids the table's latest version shows (what any reader opening it now sees)."""
    uri = table if isinstance(table, str) else table.uri
    return lance.dataset(uri).to_table(columns=["id"])["id"].to_pylist()


def _data_files(table: FencedTable) -> set[str]:
    return {p.name for p in (Path(table.uri) / "data").glob("*.lance")}


def _log(table: FencedTable) -> list[dict]:
    return lance.dataset(table.uri).to_table().to_pylist()


# --- fencing ---------------------------------------------------------------------------------------------


def test_a_fenced_table_refuses_every_commit_of_the_run_it_replaced_and_keeps_its_rows(tmp_path):
    cfg = _cfg(tmp_path)
    old, _ = _open(cfg)
    for i in range(3):  # three small fragments: something for a compaction to merge
        old.images.append(fragments_of(_part(old, f"s{i}", [f"s{i}/a", f"s{i}/b"])["images"]))
    before = sorted(_ids(old.images))
    late = fragments_of(_part(old, "late", ["late/a"])["images"])

    new = FencedTable(old.images.uri, cfg)
    new.fence()

    with pytest.raises(LeaseLost, match="another job took over"):
        old.images.append(late)
    with pytest.raises(LeaseLost):
        old.images.delete("shard = 's0'")
    with pytest.raises(LeaseLost):
        old.images.compact(1000)
    latest = lance.dataset(old.images.uri)
    assert sorted(_ids(old.images)) == before
    assert latest.version == new.version and len(latest.get_fragments()) == 3

    new.append(late)  # the holder commits on its fence
    assert sorted(_ids(new)) == sorted([*before, "late/a"])


def test_a_fenced_runs_manifest_compaction_is_refused_and_the_new_holders_states_stay(tmp_path):
    """Each table's every commit is fenced: the manifest's compaction (a rewrite of the log) too."""
    cfg = _cfg(tmp_path)
    _, stale = _open(cfg)
    stale.record([ShardRecord("s1", "f1", DONE, rows_ok=2)])
    _, holder = _open(cfg)
    holder.record([ShardRecord("s2", "f2", DONE, rows_ok=3)])

    with pytest.raises(LeaseLost):
        stale.compact()
    _, reread = _open(cfg)
    assert reread.committed() == {"s1": "f1", "s2": "f2"}


def test_a_stale_committers_whole_round_is_refused_and_no_id_is_visible_twice(tmp_path):
    cfg = _cfg(tmp_path, commit_shards=100, commit_seconds=3600)
    old, old_manifest = _open(cfg)
    old_committer = Committer(old, old_manifest, cfg)
    old_committer.add(_written(old, "s1", ["s1/a", "s1/b"]))
    old_committer.flush()
    # the old run goes on writing (s1 changed, s2 new) but stalls before its round commits
    old_committer.add(_written(old, "s1", ["s1/a", "s1/b", "s1/c"], fingerprint="f2"))
    old_committer.add(_written(old, "s2", ["s2/a", "s2/x"], rejected=("s2/x",), fingerprint="f2"))

    new, new_manifest = _open(cfg)  # the lease expired; another run took the output over
    assert new_manifest.committed() == {"s1": "f1"}
    new_committer = Committer(new, new_manifest, cfg)
    new_committer.add(_written(new, "s1", ["s1/a", "s1/b", "s1/c"], fingerprint="f2"))
    new_committer.add(_written(new, "s2", ["s2/a", "s2/x"], rejected=("s2/x",), fingerprint="f2"))
    new_committer.flush()
    versions = [t.version for t in (new.images, new.rejected, new.manifest_log)]

    with pytest.raises(LeaseLost):
        old_committer.flush()

    assert [lance.dataset(t.uri).version for t in (new.images, new.rejected, new.manifest_log)] == versions
    assert_exactly_once(_ids(new.images), ["s1/a", "s1/b", "s1/c", "s2/a"])
    assert_exactly_once(_ids(new.rejected), ["s2/x"])
    _, reread = _open(cfg)
    assert reread.committed() == {"s1": "f2", "s2": "f2"}


def test_a_run_fenced_between_the_commits_of_its_round_leaves_shards_the_new_holder_replaces_once(
    tmp_path, monkeypatch
):
    cfg = _cfg(tmp_path, commit_shards=100, commit_seconds=3600)
    old, old_manifest = _open(cfg)
    old_committer = Committer(old, old_manifest, cfg)
    old_committer.add(_written(old, "s1", ["s1/a", "s1/b"]))
    old_committer.flush()
    old_committer.add(_written(old, "s1", ["s1/a", "s1/c"], rejected=("s1/c",), fingerprint="f2"))
    old_committer.add(_written(old, "s2", ["s2/a"], fingerprint="f2"))
    taken: list[ShardManifest] = []
    append = FencedTable.append

    def taken_over_before_the_images_commit(self, fragments):
        if self is old.images and not taken:
            taken.append(OutputTables(cfg, MODEL, DIM).fence())  # manifest `writing`, rejected rows in
        append(self, fragments)

    monkeypatch.setattr(FencedTable, "append", taken_over_before_the_images_commit)
    with pytest.raises(LeaseLost):
        old_committer.flush()
    monkeypatch.undo()

    (seen,) = taken
    assert {s: seen.status(s) for s in ("s1", "s2")} == {"s1": WRITING, "s2": WRITING}
    assert sorted(_ids(old.images)) == []  # s1's old rows deleted, its new ones and s2's never appended
    new, new_manifest = _open(cfg)
    assert new_manifest.known() == {"s1", "s2"}
    committer = Committer(new, new_manifest, cfg)
    committer.add(_written(new, "s1", ["s1/a", "s1/c"], rejected=("s1/c",), fingerprint="f2"))
    committer.add(_written(new, "s2", ["s2/a"], fingerprint="f2"))
    committer.flush()
    assert_exactly_once(_ids(new.images), ["s1/a", "s2/a"])
    assert_exactly_once(_ids(new.rejected), ["s1/c"])  # the old run's rejected row was replaced


# --- the shard manifest -------------------------------------------------------------------------------------


def test_manifest_states_survive_reopening_and_the_record_with_the_highest_seq_wins(tmp_path):
    cfg = _cfg(tmp_path)
    _, manifest = _open(cfg)
    manifest.record([ShardRecord("s1", "f1", WRITING), ShardRecord("s2", "f1", DONE, rows_ok=4)])
    manifest.record([ShardRecord("s1", "f1", DONE, rows_ok=5, rows_skipped=1, uri="/in/s1")])
    manifest.record([ShardRecord("s2", "f1", "failed", error="s2: timeout")])  # keeps done, adds error
    manifest.record([ShardRecord("s3", "f3", "failed", error="s3: not parquet")])
    # a row appended after the others but older in the log (a lower seq) is not the state
    stale = {field: None for field in MANIFEST_SCHEMA.names} | {
        "shard": "s1",
        "seq": 0,
        "fingerprint": "f0",
        "status": REMOVED,
    }
    manifest.table.append_rows(pa.Table.from_pylist([stale], schema=MANIFEST_SCHEMA))

    _, reread = _open(cfg)
    assert reread.committed() == {"s1": "f1", "s2": "f1"}
    assert reread.known() == {"s1", "s2"}
    assert (reread.state("s1")["rows_ok"], reread.state("s1")["rows_skipped"]) == (5, 1)
    assert reread.state("s1")["uri"] == "/in/s1"
    assert (reread.status("s2"), reread.state("s2")["error"]) == (DONE, "s2: timeout")
    assert reread.state("s2")["rows_ok"] == 4
    assert reread.status("s3") == "failed" and reread.status("s4") is None
    seqs = [r["seq"] for r in _log(reread.table)]
    reread.record([ShardRecord("s4", "f4", DONE)])
    assert reread.state("s4")["seq"] > max(seqs)  # a reopened log goes on after its highest seq


def test_compacting_the_manifest_keeps_every_state_in_one_row_each_and_forgets_removed_shards(tmp_path):
    cfg = _cfg(tmp_path)
    _, manifest = _open(cfg)
    for round_ in range(3):
        manifest.record([ShardRecord(f"s{i}", f"f{round_}", WRITING) for i in range(4)])
        manifest.record([ShardRecord(f"s{i}", f"f{round_}", DONE, rows_ok=round_) for i in range(4)])
    manifest.record([ShardRecord("s3", "f2", REMOVED)])
    manifest.record([ShardRecord("s2", "f2", "failed", error="later")])
    states = {s: manifest.state(s) for s in ("s0", "s1", "s2")}
    assert manifest.table.fragment_count() == 8

    manifest.compact()

    log = _log(manifest.table)
    assert sorted(r["shard"] for r in log) == ["s0", "s1", "s2"]
    assert manifest.table.fragment_count() == 1 and manifest.table.appended_since_compaction == 0
    _, reread = _open(cfg)
    assert {s: reread.state(s) for s in ("s0", "s1", "s2")} == states
    assert reread.status("s3") is None and reread.committed() == {"s0": "f2", "s1": "f2", "s2": "f2"}


def test_two_datasets_in_one_manifest_stay_apart_and_compaction_keeps_the_others_shards(tmp_path):
    cfg = _cfg(tmp_path)
    _, laion = _open(cfg, "laion")
    laion.record([ShardRecord("00000.parquet", "laion-f", DONE), ShardRecord("00001.parquet", "l1", DONE)])
    _, coco = _open(cfg, "coco")
    assert (coco.committed(), coco.known(), coco.status("00000.parquet")) == ({}, set(), None)
    coco.record([ShardRecord("00000.parquet", "coco-f", WRITING)])
    _, unnamed = _open(cfg)  # input.dataset unset: a dataset of its own
    unnamed.record([ShardRecord("00000.parquet", "plain-f", DONE)])

    _, laion = _open(cfg, "laion")
    laion.record([ShardRecord("00001.parquet", "l1", REMOVED)])
    laion.compact()

    _, laion = _open(cfg, "laion")
    _, coco = _open(cfg, "coco")
    _, unnamed = _open(cfg)
    assert laion.committed() == {"00000.parquet": "laion-f"}
    assert (coco.committed(), coco.known()) == ({}, {"00000.parquet"})
    assert unnamed.committed() == {"00000.parquet": "plain-f"}
    assert Counter((r["dataset"], r["shard"]) for r in _log(laion.table)) == {
        ("laion", "00000.parquet"): 1,
        ("coco", "00000.parquet"): 1,
        (None, "00000.parquet"): 1,
    }


def test_relocate_records_where_done_shards_are_read_now_and_nothing_else(tmp_path):
    cfg = _cfg(tmp_path)
    _, manifest = _open(cfg)
    manifest.record(
        [
            ShardRecord("s1", "f1", DONE, rows_ok=7, rows_failed=1, rows_skipped=2, uri="s3://old/s1"),
            ShardRecord("s2", "f2", WRITING, uri="s3://old/s2"),
            ShardRecord("s3", "f3", DONE, rows_ok=3, uri="s3://new/s3"),
        ]
    )
    moved = manifest.relocate(
        {"s1": "s3://new/s1", "s2": "s3://new/s2", "s3": "s3://new/s3", "s4": "s3://new/s4"}
    )
    assert moved == ["s1"]
    _, reread = _open(cfg)
    s1 = reread.state("s1")
    assert (s1["uri"], s1["status"], s1["fingerprint"]) == ("s3://new/s1", DONE, "f1")
    assert (s1["rows_ok"], s1["rows_failed"], s1["rows_skipped"]) == (7, 1, 2)
    assert (reread.state("s2")["uri"], reread.status("s2")) == ("s3://old/s2", WRITING)
    assert reread.status("s4") is None
    assert manifest.relocate({"s1": "s3://new/s1"}) == []  # where it already is: no commit
    assert len(_log(reread.table)) == 4


# --- commit rounds -----------------------------------------------------------------------------------------


def test_a_round_commits_commit_shards_shards_at_once_or_sooner_once_the_oldest_waited(tmp_path):
    cfg = _cfg(tmp_path, commit_shards=2, commit_seconds=3600)
    tables, manifest = _open(cfg)
    heard: list[tuple[list[str], list[str]]] = []
    committer = Committer(
        tables,
        manifest,
        cfg,
        on_commit=lambda d, f: heard.append(([r.shard for r in d], [r.shard for r in f])),
    )
    version = tables.images.version
    committer.add(_written(tables, "s1", ["s1/a"]))
    committer.fail(ShardRecord("bad", "fb", "failed", error="bad: not parquet"))
    assert (_ids(tables.images), tables.images.version, heard) == ([], version, [])
    committer.add(_written(tables, "s2", ["s2/a", "s2/b"]))  # the second shard: a round
    assert sorted(_ids(tables.images)) == ["s1/a", "s2/a", "s2/b"]
    assert tables.images.version == version + 1  # both shards in one commit
    assert heard == [(["s1", "s2"], ["bad"])]
    assert manifest.committed() == {"s1": "f1", "s2": "f1"} and manifest.status("bad") == "failed"

    committer.add(_written(tables, "s3", ["s3/a"]))
    assert len(_ids(tables.images)) == 3
    committer.flush()  # the stream ended: what waits is committed
    assert heard[-1] == (["s3"], []) and committer.stats.rounds == 2

    patient = Committer(tables, manifest, cfg.model_copy(update={"commit_seconds": 0.2}))
    patient.add(_written(tables, "s4", ["s4/a"]))
    patient.flush_if_due()
    assert "s4/a" not in _ids(tables.images)
    time.sleep(0.3)
    patient.flush_if_due()
    assert "s4/a" in _ids(tables.images)
    assert_exactly_once(_ids(tables.images), ["s1/a", "s2/a", "s2/b", "s3/a", "s4/a"])


@pytest.mark.parametrize("left_as", [DONE, WRITING])
def test_a_known_shard_loses_its_old_rows_before_its_new_fragments_are_appended(tmp_path, left_as):
    cfg = _cfg(tmp_path)
    shard = "it's here.parquet"  # a quote in a shard name: a literal in the delete, never SQL
    tables, manifest = _open(cfg)
    first = Committer(tables, manifest, cfg)
    first.add(_written(tables, shard, [f"{shard}/a", f"{shard}/b", f"{shard}/x"], rejected=(f"{shard}/x",)))
    first.add(_written(tables, "other", ["other/a"], rejected=()))
    first.flush()
    if left_as == WRITING:  # a run killed after its images commit, before `done`: the rows are in
        left = _written(tables, shard, [f"{shard}/a", f"{shard}/b"], fingerprint="f2")
        manifest.record([ShardRecord(shard, "f2", WRITING)])
        tables.images.append(left.images)
        assert Counter(_ids(tables.images))[f"{shard}/a"] == 2

    tables, manifest = _open(cfg)  # the next run: the shard changed (b gone, c new)
    assert shard in manifest.known()
    committer = Committer(tables, manifest, cfg)
    committer.add(_written(tables, shard, [f"{shard}/a", f"{shard}/c"], fingerprint="f3"))
    committer.flush()

    assert_exactly_once(_ids(tables.images), [f"{shard}/a", f"{shard}/c", "other/a"])
    assert _ids(tables.rejected) == []  # its old rejected row went with its old rows
    assert manifest.committed() == {shard: "f3", "other": "f1"}
    operations = [
        type(tables.images.ds.read_transaction(v).operation).__name__
        for v in range(tables.images.version - 1, tables.images.version + 1)
    ]
    assert operations == ["Delete", "Append"]


def test_compaction_after_compact_fragments_appended_fragments_brings_the_fragment_count_down(tmp_path):
    cfg = _cfg(tmp_path, commit_shards=1, compact_fragments=3)
    tables, manifest = _open(cfg)
    committer = Committer(tables, manifest, cfg)
    counts = []
    for i in range(4):
        committer.add(_written(tables, f"s{i}", [f"s{i}/a", f"s{i}/b"]))
        counts.append(tables.images.fragment_count())
    assert counts == [1, 2, 1, 2]  # three appended fragments, then one merged fragment
    assert committer.stats.compactions >= 2  # the images table and the manifest log
    assert tables.manifest_log.fragment_count() < 2 * 4  # two manifest commits per round, compacted
    assert_exactly_once(_ids(tables.images), [f"s{i}/{k}" for i in range(4) for k in "ab"])
    _, reread = _open(cfg)
    assert reread.committed() == {f"s{i}": "f1" for i in range(4)}


def test_remove_deletes_every_row_of_the_shards_and_records_them_removed(tmp_path):
    cfg = _cfg(tmp_path, commit_shards=100)
    tables, manifest = _open(cfg)
    committer = Committer(tables, manifest, cfg)
    for i in range(3):
        committer.add(_written(tables, f"s{i}", [f"s{i}/a", f"s{i}/x"], rejected=(f"s{i}/x",)))
    committer.flush()

    committer.remove(["s0", "s2"])

    assert (_ids(tables.images), _ids(tables.rejected)) == (["s1/a"], ["s1/x"])
    _, reread = _open(cfg)
    assert (reread.status("s0"), reread.status("s2"), reread.known()) == (REMOVED, REMOVED, {"s1"})
    assert reread.state("s0")["fingerprint"] == "f1"


# --- fragment files no commit made visible ----------------------------------------------------------------


def test_remove_orphans_deletes_fragment_files_never_committed_and_keeps_committed_ones(tmp_path):
    cfg = _cfg(tmp_path)
    tables, manifest = _open(cfg)
    committer = Committer(tables, manifest, cfg)
    committer.add(_written(tables, "s1", ["s1/a", "s1/x"], rejected=("s1/x",)))
    committer.flush()
    committed = {t: _data_files(t) for t in (tables.images, tables.rejected)}
    _part(tables, "s2", ["s2/a", "s2/x"], rejected=("s2/x",))  # written; the run dies before its round
    assert all(len(_data_files(t)) == len(committed[t]) + 1 for t in committed)

    again, _ = _open(cfg)
    removed = again.remove_orphans(timedelta(days=7))

    assert removed == 2
    assert [_data_files(t) for t in (again.images, again.rejected)] == list(committed.values())
    assert (_ids(again.images), _ids(again.rejected)) == (["s1/a"], ["s1/x"])


def test_fragment_files_no_commit_named_never_show_as_rows(tmp_path):
    cfg = _cfg(tmp_path)
    tables, manifest = _open(cfg)
    orphan = _part(tables, "s1", ["s1/a", "s1/b"])  # its shard failed: never committed
    unreadable = _unreadable("s2")
    failed = write_part([_encoded(["s2/b", "s2/c"], "s2"), unreadable], "s2", tables.target())
    assert failed["error"] and failed["images"] == "[]"  # an unreadable part writes no file at all
    assert len(_data_files(tables.images)) == 1

    committer = Committer(tables, manifest, cfg)
    committer.add(_written(tables, "s3", ["s3/a"]))
    committer.flush()

    assert fragments_of(orphan["images"])
    assert _ids(tables.images) == ["s3/a"]
    assert lance.dataset(tables.images.uri).count_rows() == 1
    assert len(_data_files(tables.images)) == 2


def test_a_shard_is_committed_once_all_its_parts_are_in_and_a_failed_part_commits_none_of_it(tmp_path):
    cfg = _cfg(tmp_path, commit_shards=1)
    tables, manifest = _open(cfg)
    plans = {
        name: ShardPlan(Shard(f"/in/{name}", name, f"fp-{name}"), num_rows=4, row_groups=2)
        for name in ("good", "bad")
    }
    collector = ShardCollector(plans, Committer(tables, manifest, cfg))

    assert collector.add(part_batch([_part(tables, "good", ["good/a", "good/b"])])) == []
    assert _ids(tables.images) == []  # half a shard is never visible
    bad_parts = [
        _part(tables, "bad", ["bad/a", "bad/b"]),
        write_part([_unreadable("bad")], "bad", tables.target()),
    ]
    assert collector.add(part_batch(bad_parts)) == []
    assert collector.add(part_batch([_part(tables, "good", ["good/c", "good/x"], ("good/x",))])) == ["good"]

    assert_exactly_once(_ids(tables.images), ["good/a", "good/b", "good/c"])
    assert _ids(tables.rejected) == ["good/x"]
    assert manifest.committed() == {"good": "fp-good"} and manifest.status("bad") == "failed"
    assert collector.incomplete() == {}
