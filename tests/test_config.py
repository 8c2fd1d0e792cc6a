"""Configuration is validated up front, and every error names the field at fault."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.config import (
    ConfigError,
    ExitRoute,
    MergeRoute,
    PruneRoute,
    RouterConfig,
    RouteSpec,
    TwoPhaseRoute,
    load_config,
)


def test_yaml_and_overrides_combine(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input:\n  paths: [a/*.parquet]\nencoder:\n  batch_size: 32\n")
    cfg = load_config(path, ["encoder.batch_size=128", "output.vector_dtype=float16"])
    assert cfg.input.paths == ["a/*.parquet"]
    assert (cfg.encoder.batch_size, cfg.output.vector_dtype) == (128, "float16")


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("encoder.batch_size=0", "encoder.batch_size"),
        ("output.vector_dtype=float64", "output.vector_dtype"),
        ("encoder.batchsize=3", "encoder.batchsize"),
        ("decode.max_pixels=-1", "decode.max_pixels"),
    ],
)
def test_bad_field_is_named(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_router_needs_one_more_route_than_thresholds():
    with pytest.raises(ConfigError, match="len\\(routes\\) == len\\(thresholds\\) \\+ 1"):
        load_config(None, ["router.thresholds=[0.5]"])


def test_route_cannot_have_two_budgets():
    routes = "[{name: a, energy_tau: 0.9, keep_tokens: 8}]"
    with pytest.raises(ConfigError, match="set energy_tau or keep_tokens, not both"):
        load_config(None, [f"router.routes={routes}"])


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ("{name: a, merge: tome}", "merge_r > 0 or merge_keep"),
        ("{name: a, merge: tome, merge_r: 4, merge_keep: 0.7}", "merge_r > 0 or merge_keep"),
        ("{name: a, merge: tome, merge_keep: 0.3}", "merge_keep"),
        # a two-phase route needs a keep schedule to follow and a block to start from
        ("{name: a, merge: tome, merge_keep: 0.8, late_keep: 0.7}", "two-phase.late_after: Field required"),
        ("{name: a, merge: tome, merge_r: 4, late_keep: 0.7, late_after: 2}", "merge_keep: Field required"),
        ("{name: a, merge: tome, merge_keep: 0.8, late_after: 2}", "late_keep: Field required"),
        ("{name: a, merge: tome, merge_keep: 0.8, late_similarity: 0.9}", "late_keep: Field required"),
        ("{name: a, merge_keep: 0.8}", "merge.merge: Field required"),
        # the kinds do not combine: a two-phase route cannot prune, a pruning one cannot merge
        (
            "{name: a, merge: tome, merge_keep: 0.8, late_keep: 0.7, late_after: 2, keep_tokens: 16}",
            "two-phase.keep_tokens: Extra inputs are not permitted",
        ),
        ("{name: a, energy_tau: 0.9, merge: tome, merge_r: 2}", "prune.merge: Extra inputs"),
    ],
)
def test_merging_needs_exactly_one_valid_schedule(route, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"router.routes=[{route}]"])


def test_merge_schedules_count_tokens_per_block():
    constant = RouteSpec(name="c", merge="tome", merge_r=6)
    assert [constant.merge_count(n) for n in (65, 7)] == [6, 6]
    front = RouteSpec(name="f", merge="tome", merge_keep=0.7, merge_floor=16)
    tokens, schedule = 65, []
    while (r := front.merge_count(tokens)) > 0:
        schedule.append(r)
        tokens -= r
    assert schedule == [19, 13, 9, 7, 1] and tokens == 16  # ceil(0.7 n) kept, never below the floor
    assert RouteSpec(name="n", merge="none", merge_r=0).merge_count(65) == 0  # 'none' and 0 mean off


def test_late_schedule_takes_over_only_for_late_blocks():
    two = RouteSpec(name="t", merge="tome", merge_keep=0.8, merge_floor=8, late_keep=0.65, late_after=3)
    assert two.merge_count(65) == two.merge_count(65, late=False) == 13  # 65 - ceil(0.8 * 65)
    assert two.merge_count(34, late=True) == 11  # 34 - ceil(0.65 * 34)
    assert not two.splits
    assert RouteSpec(**{**two.model_dump(), "late_similarity": 0.9}).splits


def test_thresholds_must_ascend():
    routes = "[{name: a}, {name: b}, {name: c}]"
    with pytest.raises(ConfigError, match="strictly ascending"):
        load_config(None, [f"router.routes={routes}", "router.thresholds=[0.6, 0.2]"])


def test_missing_and_malformed_files_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_cli_reports_config_errors_with_exit_status_2(capsys):
    assert main(["index", "--input", "x.parquet", "--set", "encoder.actors=0"]) == 2
    assert "encoder.actors" in capsys.readouterr().err


def test_a_route_is_the_kind_its_fields_name_and_dumps_back_flat():
    fields = {
        ExitRoute: {"exit_depth": 6},
        MergeRoute: {"merge": "crossget", "merge_keep": 0.8, "merge_floor": 8, "tuned": True},
        TwoPhaseRoute: {"merge": "tome", "merge_keep": 0.8, "late_keep": 0.65, "late_after": 3},
        PruneRoute: {"exit_depth": 8, "energy_tau": 0.99, "prune_after": 2},
    }
    for kind, spec in fields.items():
        route = RouteSpec(name="r", **spec)
        assert type(route) is kind and route.model_dump(exclude_defaults=True) == {"name": "r", **spec}
        assert type(RouterConfig(routes=[{"name": "r", **spec}]).routes[0]) is kind
