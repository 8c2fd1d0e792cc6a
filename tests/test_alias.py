"""A router (model, heads) change: `icar reindex` re-embeds into a new generation of tables and switches
the `output.table` alias to it in one commit once it is complete; queries see one generation at a time,
a crash before the switch leaves them on the old one, and the old tables stay readable until cleanup.
Two aliases on one uri share nothing: each owns its images, rejected and manifest tables."""

from __future__ import annotations

import lancedb
import pytest
from conftest import index_config, input_ids, lance_table
from processes import assert_exactly_once

from pipeline.alias import ALIAS_TABLE, Aliases, Identity
from pipeline.config import ConfigError
from pipeline.job import run_index
from pipeline.query import Searcher
from pipeline.reindex import run_reindex

ROUTER_B = 'router.routes=[{"name": "exit4", "exit_depth": 4}]'


@pytest.mark.filterwarnings("ignore:optimize\\(cleanup_older_than=0\\):UserWarning")
def test_a_router_change_is_reindexed_into_a_new_table_and_switched_in_one_commit(
    ray_local, scene_shards, tmp_path, monkeypatch
):
    db = str(tmp_path / "db")
    router_a = index_config([str(scene_shards)], db)
    router_b = index_config([str(scene_shards)], db, ROUTER_B)
    expected = input_ids(scene_shards)
    assert run_index(router_a).rows_ok == 72
    searcher = Searcher.open(router_a, refresh_seconds=0)  # resolves the alias at every query
    query = searcher.embed_text(["a red circle on a plain background"])

    def routes_found() -> set[str]:
        return {row["route"] for row in searcher.search(query, k=20)}

    assert routes_found() == {"full"}

    a, b = Identity.of(router_a), Identity.of(router_b)
    assert (a.model_id, a.heads_sha) == (b.model_id, b.heads_sha) and a.digest != b.digest
    with pytest.raises(ConfigError, match=rf"{a.router_sha[:12]}.*{b.router_sha[:12]}.*icar reindex"):
        run_index(router_b)  # index never re-embeds a table: it names both identities and the command

    # a reindex killed just before the switch: the new generation is complete, queries stay on A
    def killed(self, generation):
        raise RuntimeError("injected: killed before the switch")

    with monkeypatch.context() as patch:
        patch.setattr(Aliases, "switch", killed)
        with pytest.raises(RuntimeError, match="injected"):
            run_reindex(router_b)
    new = f"images-{b.digest}"
    built = lance_table(db, new)
    assert_exactly_once(built["id"].to_pylist(), expected)
    assert set(built["route"].to_pylist()) == {"exit4"}
    assert routes_found() == {"full"}

    # the rerun finds the new generation complete (nothing re-embedded) and switches to it
    report = run_reindex(router_b)
    assert (report.switched, report.physical_table, report.identity) == (True, new, b.describe())
    s = report.summary
    assert (s["shards_already_done"], s["shards_committed"], report.replaced_dropped) == (3, 0, None)
    assert routes_found() == {"exit4"}
    old = lance_table(db, "images")  # the replaced generation stays readable until cleanup
    assert old.num_rows == 72 and set(old["route"].to_pylist()) == {"full"}
    assert run_index(router_b).shards_already_done == 3  # B is the live identity now
    with pytest.raises(ConfigError, match="icar reindex"):
        run_index(router_a)

    # the first reindex past reindex.cleanup_older_than_days drops the replaced tables
    later = run_reindex(index_config([str(scene_shards)], db, ROUTER_B, "reindex.cleanup_older_than_days=0"))
    assert later.replaced_dropped == a.describe() and not later.switched
    tables = set(lancedb.connect(db).list_tables().tables)
    assert tables == {new, f"{new}_rejected", f"{new}_manifest", ALIAS_TABLE}
    assert routes_found() == {"exit4"}
    assert_exactly_once([r["id"] for r in searcher.search(query, k=100)], expected)


@pytest.mark.filterwarnings("ignore:optimize\\(cleanup_older_than=0\\):UserWarning")
def test_two_aliases_on_one_uri_each_index_every_row_and_a_reindex_of_one_leaves_the_other(
    ray_local, scene_shards, tmp_path
):
    """Every alias owns its tables (`<table>`, `<table>_rejected`, `<table>_manifest`): a second alias on
    the same uri (float16 vectors) indexes every row, not "already indexed" by the first one's manifest;
    a reindex of it into a new generation, dropping the replaced one at once, leaves the first alias's
    tables as they were, and indexing the first again re-appends nothing."""
    db = str(tmp_path / "db")
    expected = input_ids(scene_shards)
    images = index_config([str(scene_shards)], db)
    images16 = index_config([str(scene_shards)], db, "output.table=images16", "output.vector_dtype=float16")
    first = run_index(images)
    assert (first.shards_committed, first.rows_ok) == (3, 72)

    second = run_index(images16)
    assert (second.shards_already_done, second.shards_committed, second.rows_ok) == (0, 3, 72)
    written = lance_table(db, "images16")
    assert_exactly_once(written["id"].to_pylist(), expected)
    assert str(written.schema.field("vector").type.value_type) == "halffloat"

    reindexed = index_config(
        [str(scene_shards)],
        db,
        "output.table=images16",
        "output.vector_dtype=float16",
        ROUTER_B,
        "reindex.cleanup_older_than_days=0",
    )
    report = run_reindex(reindexed)
    new = f"images16-{Identity.of(reindexed).digest}"
    assert (report.switched, report.physical_table, report.summary["shards_committed"]) == (True, new, 3)
    assert report.replaced_dropped == Identity.of(images16).describe()
    rebuilt = lance_table(db, new)
    assert_exactly_once(rebuilt["id"].to_pylist(), expected)
    assert set(rebuilt["route"].to_pylist()) == {"exit4"}
    assert Aliases(reindexed.output).resolve().table == new

    again = run_index(images)
    assert (again.shards_already_done, again.shards_committed, again.rows_ok) == (3, 0, 0)
    kept = lance_table(db, "images")
    assert_exactly_once(kept["id"].to_pylist(), expected)
    assert set(kept["route"].to_pylist()) == {"full"}
    assert sorted(m["status"] for m in lance_table(db, "images_manifest").to_pylist()) == ["done"] * 3
    tables = set(lancedb.connect(db).list_tables().tables)
    assert tables == {ALIAS_TABLE, "images", "images_rejected", "images_manifest"} | {
        new,
        f"{new}_rejected",
        f"{new}_manifest",
    }
