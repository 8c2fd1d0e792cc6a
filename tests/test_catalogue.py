"""The route catalogue (names derived from specs, results keyed by spec) and the one speedup definition."""

from __future__ import annotations

import itertools

import pytest

from icar_lab.catalogue import (
    FULL,
    FULL_KEY,
    bench_routes,
    calibration_routes,
    frontier_routes,
    route,
    route_name,
    router_key,
    spec_key,
    unique,
)
from icar_lab.timing import alternate, best_cpu_seconds, paired_speedup, throughput
from pipeline.config import MODELS_DIR, ModelConfig, RouterConfig, RouteSpec, load_config

EXITS = [4, 6, 8, 10]


def keys(routes: list[RouteSpec]) -> list[str]:
    return [spec_key(r) for r in routes]


def test_names_are_derived_from_the_spec():
    assert FULL.name == "full" and FULL_KEY == "{}"
    assert route(6).name == "exit6"
    assert route(merge="tome", merge_r=4).name == "tome4"
    assert route(merge="tome", merge_keep=0.65, merge_floor=16).name == "tome-keep65-floor16"
    assert route(8, merge="crossget", merge_keep=0.725).name == "exit8-crossget-keep72.5"
    assert route(energy_tau=0.995, prune_after=2).name == "energy99.5"
    assert route(energy_tau=0.99, prune_after=1).name == "energy99-after1"
    assert route(keep_tokens=16, prune_after=2).name == "tokens16"
    late = {"merge": "tome", "merge_keep": 0.8, "merge_floor": 8, "late_keep": 0.65, "late_after": 3}
    assert route(**late).name == "tome-keep80-floor8-then65-after3"
    assert route(**late, late_similarity=0.9).name == "tome-keep80-floor8-then65-after3-alike90"
    assert route_name(RouteSpec(name="anything", exit_depth=10, merge="tome", merge_r=6)) == "exit10-tome6"


def test_the_key_is_the_spec_without_its_name_or_defaults():
    shipped = RouteSpec(name="full-keep75-floor16", merge="tome", merge_keep=0.75, merge_floor=16)
    assert spec_key(shipped) == spec_key(route(merge="tome", merge_keep=0.75, merge_floor=16))
    assert spec_key(shipped) == '{"merge": "tome", "merge_floor": 16, "merge_keep": 0.75}'
    explicit = RouteSpec(name="x", exit_depth=None, merge="none", merge_r=0, prune_after=1)
    assert spec_key(explicit) == FULL_KEY
    assert spec_key(route(6)) != spec_key(route(8))


def test_selections_are_one_catalogue_with_unique_names_and_keys():
    calibration = calibration_routes(EXITS)
    assert len(calibration) == 5 * 30
    for selection in (calibration, frontier_routes(EXITS), bench_routes([6, 8])):
        assert len(set(keys(selection))) == len(selection) == len({r.name for r in selection})
    assert set(keys(bench_routes([6, 8]))) <= set(keys(frontier_routes(EXITS))) <= set(keys(calibration))
    frontier = frontier_routes([6])
    assert [r.name for r in frontier[:2]] == ["full", "exit6"]
    assert all(r.exit_depth is None for r in frontier[2:]) and len(frontier) == 2 + 29
    assert all(a.name != b.name for a, b in itertools.combinations(calibration, 2))


def test_the_shipped_heads_add_one_tuned_route_per_tail_to_calibration_and_frontier():
    from pipeline.encode.routed import RoutedEncoder

    heads = RoutedEncoder.from_config(ModelConfig(), []).vit.heads
    tuned = [r for r in calibration_routes(EXITS, heads) if r.tuned]
    assert [r.name for r in tuned] == [f"tome-keep{k}-floor8-tuned" for k in (60, 65, 70, 75)]
    assert keys(tuned) == [k for k in keys(frontier_routes(EXITS, heads)) if '"tuned": true' in k]
    assert all(heads.tail(r) is not None and heads.tail(r).start == 6 for r in tuned)
    untuned = [r.model_copy(update={"tuned": False}) for r in tuned]
    assert set(keys(untuned[1:])) <= set(keys(calibration_routes(EXITS)))  # keep 60% is a tail's own path


def test_the_shipped_router_routes_come_from_the_catalogue():
    """Calibration's catalogue, the shipped heads' tuned routes included."""
    from pipeline.encode.routed import RoutedEncoder

    cfg = load_config(MODELS_DIR / "icar-tiny-vit.routes.yaml")
    heads = RoutedEncoder.from_config(cfg.model, []).vit.heads
    assert set(keys(cfg.router.routes)) <= set(keys(calibration_routes(EXITS, heads)))


def test_router_key_ignores_route_names_but_not_thresholds_or_scorer():
    ladder = [route(6), FULL]
    a = RouterConfig(thresholds=[0.5], routes=ladder)
    renamed = RouterConfig(thresholds=[0.5], routes=[ladder[0].model_copy(update={"name": "e"}), FULL])
    assert router_key(a) == router_key(renamed)
    assert router_key(a) != router_key(RouterConfig(thresholds=[0.6], routes=ladder))
    assert router_key(a) != router_key(RouterConfig(scorer="x.json", thresholds=[0.5], routes=ladder))


def test_unique_keeps_the_first_name_of_each_spec():
    alias = FULL.model_copy(update={"name": "baseline-ish"})
    assert [r.name for r in unique([route(6), alias, FULL, route(6)])] == ["exit6", "baseline-ish"]


def test_speedup_is_the_median_of_same_round_ratios_not_a_ratio_of_medians():
    reference, candidate = [1.0, 1.0, 10.0], [1.0, 2.0, 4.0]  # a load spike hit round 3's reference
    assert paired_speedup(reference, candidate) == {"median": 1.0, "min": 0.5, "max": 2.5}
    assert throughput(reference, 10) == {"median": 10.0, "min": 1.0, "max": 10.0, "rounds": 3}
    with pytest.raises(ValueError):
        paired_speedup([1.0, 2.0], [1.0])


def test_alternate_runs_candidates_in_turn_after_warm_up():
    calls: list[str] = []
    seconds = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2, warmup=1)
    assert calls == ["a", "b"] * 3
    assert {k: len(v) for k, v in seconds.items()} == {"a": 2, "b": 2}


def test_best_cpu_seconds_is_per_item_cpu_time_of_the_least_disturbed_run():
    calls: list[int] = []
    cost = best_cpu_seconds(lambda: calls.append(sum(range(200_000))), items=4, repeats=3)
    assert len(calls) == 3 and 0 < cost < 0.05  # a few ms of CPU per call, over 4 items
