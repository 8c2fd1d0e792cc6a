"""A router (model, heads) change: `icar reindex` re-embeds into a new generation of tables and switches
the `output.table` alias to it in one commit once it is complete; queries see one generation at a time,
a crash before the switch leaves them on the old one, and the old tables stay readable until cleanup."""

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
    assert tables == {new, f"rejected-{b.digest}", f"manifest-{b.digest}", ALIAS_TABLE}
    assert routes_found() == {"exit4"}
    assert_exactly_once([r["id"] for r in searcher.search(query, k=100)], expected)


def test_a_table_from_before_aliases_is_adopted_when_its_model_matches_else_needs_a_reindex(tmp_path):
    """Tables made before aliases existed have no alias row: the same model's table becomes the first
    generation under the config's identity; another model's is a live generation of unknown identity."""
    from pipeline.alias import target_generation
    from pipeline.config import OutputConfig
    from pipeline.write import LanceWriter

    db = str(tmp_path / "db")
    cfg = index_config([str(tmp_path)], db)
    LanceWriter(OutputConfig(uri=db), "ViT-B-32:openai", 512)  # creates images/rejected/manifest
    with pytest.raises(ConfigError, match=r"ViT-B-32:openai \(heads and router unknown.*icar reindex"):
        target_generation(cfg, switch=False)
    generation, live = target_generation(cfg, switch=True)
    assert live.suffix == "" and generation.suffix == f"-{Identity.of(cfg).digest}"

    other = index_config([str(tmp_path)], str(tmp_path / "db2"))
    LanceWriter(OutputConfig(uri=other.output.uri), other.model.model_id, 512)
    generation, live = target_generation(other, switch=False)
    assert live is None and generation.suffix == "" and generation.identity == Identity.of(other).describe()
