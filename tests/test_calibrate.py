"""Calibration picks the cheapest router that meets the quality floor, from measured routes; the winner
rule and the fit/test split behave as documented; the learned scorer it may ship fits and round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from icar_lab.calibrate import (
    Calibration,
    ScorerTrial,
    cheapest_route_labels,
    choose_winner,
    final_plan,
    fit_test_split,
    verdict,
)
from icar_lab.router_search import (
    PlanQuality,
    RouteMeasurement,
    RouterPlan,
    apply_plan,
    best_single_route,
    route_qualities,
    search_router,
    split_galleries,
)
from icar_lab.routes_file import write_calibration
from icar_lab.targets import ComputeBudget, QualityFloor
from pipeline.config import ModelConfig, RouteSpec, load_config
from pipeline.route import assign_routes
from pipeline.score import LearnedScorer, load_scorer

N = 40


def _measurements() -> tuple[list[RouteMeasurement], torch.Tensor, np.ndarray]:
    """Three routes over N images with distinct scenes: `cheap` is exact on the low-score half and
    noise on the rest, `mid` costs more than `cheap` yet is worse on average (so never worth a rung),
    `full` is exact and dearest."""
    g = torch.Generator().manual_seed(0)
    full = F.normalize(torch.randn(N, 32, generator=g), dim=-1)
    scores = np.linspace(0.0, 1.0, N)
    easy = torch.from_numpy(scores < 0.5)
    noise = F.normalize(torch.randn(N, 32, generator=g), dim=-1)
    cheap = torch.where(easy[:, None], full, noise)
    mid = F.normalize(full + 3.0 * noise, dim=-1)  # cosine ~0.3 everywhere
    ones = np.ones(N, np.float32)
    routes = [
        RouteMeasurement(RouteSpec(name="cheap", exit_depth=2), cheap, 0.2 * ones, 0.001),
        RouteMeasurement(RouteSpec(name="mid", exit_depth=6), mid, 0.5 * ones, 0.002),
        RouteMeasurement(RouteSpec(name="full"), full, ones, 0.004),
    ]
    return routes, full, scores


def test_search_sends_easy_images_to_the_cheap_route_and_meets_the_floor():
    routes, full, scores = _measurements()
    keys = [f"scene{i}" for i in range(N)]
    plan = search_router(scores, routes, full, full, keys, QualityFloor(0.95, 0.99))
    assert plan is not None
    assert [r.name for r in plan.routes] == ["cheap", "full"]
    assert plan.thresholds == [np.quantile(scores, 0.5)]
    assert plan.share == [0.5, 0.5]
    assert plan.quality.seconds_per_image == pytest.approx(0.5 * 0.001 + 0.5 * 0.004)
    assert plan.quality.mean_cosine == pytest.approx(1.0, abs=1e-5) and plan.quality.recall_at_10 == 1.0
    # the plan assigns exactly as the runtime will, and judged on the same rows it keeps its numbers
    np.testing.assert_array_equal(assign_routes(scores, plan.router()), (scores >= plan.thresholds[0]))
    again = apply_plan(plan, scores, routes, full, full, keys)
    assert again == plan.quality


def test_the_scorer_cost_is_charged_to_routing_plans_only():
    routes, full, scores = _measurements()
    keys = [f"scene{i}" for i in range(N)]
    # routing saves 0.0015 s/image; a scorer costing more than that makes one route (full) the fastest
    plan = search_router(scores, routes, full, full, keys, QualityFloor(0.95, 0.99), router_seconds=0.002)
    assert [r.name for r in plan.routes] == ["full"] and plan.thresholds == []
    assert plan.quality.seconds_per_image == pytest.approx(0.004)


def test_search_returns_none_when_no_route_meets_the_floor():
    routes, full, scores = _measurements()
    keys = [f"scene{i}" for i in range(N)]
    assert search_router(scores, routes[:2], full, full, keys, QualityFloor(0.99, 0.99)) is None


def test_a_route_below_the_cosine_front_is_still_a_candidate_on_its_own():
    """`churn` is cheaper and closer to full depth on average than `steady`, but swaps 6% of the images
    for noise, so queries flip and its R@10 fails; `steady` is a little off everywhere and flips none.
    The cosine front drops `steady` from the ladders; alone it must still be found, not a dearer plan."""
    n = 200
    g = torch.Generator().manual_seed(1)
    full = F.normalize(torch.randn(n, 64, generator=g), dim=-1)
    noise = F.normalize(torch.randn(n, 64, generator=g), dim=-1)
    swapped = torch.arange(n) % 16 == 0
    churn = torch.where(swapped[:, None], noise, full)
    steady = F.normalize(full + 0.45 * noise, dim=-1)
    ones = np.ones(n, np.float32)
    routes = [
        RouteMeasurement(RouteSpec(name="churn", exit_depth=2), churn, 0.2 * ones, 0.001),
        RouteMeasurement(RouteSpec(name="steady", exit_depth=6), steady, 0.5 * ones, 0.002),
        RouteMeasurement(RouteSpec(name="full"), full, ones, 0.004),
    ]
    cosines = [float((m.embeddings * full).sum(-1).mean()) for m in routes]
    assert cosines[0] > cosines[1] > 0.9  # steady is dearer and worse on the mean: off the front
    keys = [f"scene{i}" for i in range(n)]
    scores = np.random.default_rng(0).random(n)  # a scorer that cannot find the swapped images
    plan = search_router(scores, routes, full, full, keys, QualityFloor(0.9, 0.99))
    assert [r.name for r in plan.routes] == ["steady"]
    assert plan.quality.recall_ratio == 1.0 and plan.quality.seconds_per_image == pytest.approx(0.002)


def test_compute_budget_buys_the_most_faithful_plan_it_can_afford():
    routes, full, scores = _measurements()
    keys = [f"scene{i}" for i in range(N)]
    # 0.61 GFLOPs/image affords full depth on at most 50% of images (cheap 0.2, full 1.0 GFLOPs)
    plan = search_router(scores, routes, full, full, keys, ComputeBudget(max_gflops=0.61))
    assert plan is not None and [r.name for r in plan.routes] == ["cheap", "full"]
    assert plan.share == [0.5, 0.5] and plan.quality.gflops_per_image == pytest.approx(0.6)
    assert plan.quality.mean_cosine == pytest.approx(1.0, abs=1e-5)  # easy half exact on cheap, rest on full
    tight = search_router(scores, routes, full, full, keys, ComputeBudget(max_gflops=0.21))
    assert [r.name for r in tight.routes] == ["cheap"]
    assert search_router(scores, routes, full, full, keys, ComputeBudget(max_gflops=0.1)) is None


def test_cheapest_route_label_is_the_rank_of_the_cheapest_good_enough_route():
    routes, full, scores = _measurements()
    labels = cheapest_route_labels(routes, full, min_cosine=0.95)
    np.testing.assert_array_equal(labels, np.where(scores < 0.5, 0.0, 2.0))


def _quality(cosine: float, recall: float, seconds: float, gflops: float = 0.5) -> PlanQuality:
    return PlanQuality(cosine, recall, 0.8, seconds_per_image=seconds, gflops_per_image=gflops)


def _trial(name: str, test: PlanQuality | None) -> ScorerTrial:
    return ScorerTrial(name, 0.0, 1e-4, None, test)


def test_winner_is_admissible_first_then_cheapest():
    floor = QualityFloor(0.98, 0.99)
    slow_ok = _trial("handcrafted", _quality(0.99, 0.8, seconds=0.003))
    fast_bad = _trial("learned", _quality(0.97, 0.8, seconds=0.001))  # faster, but below the cosine floor
    assert choose_winner([slow_ok, fast_bad], floor).name == "handcrafted"
    fast_ok = _trial("learned", _quality(0.985, 0.792, seconds=0.002))  # ratio exactly 0.99
    assert choose_winner([slow_ok, fast_ok], floor).name == "learned"
    assert verdict(fast_ok.test, floor) == (0, 0.002)
    budget = ComputeBudget(max_gflops=0.4)  # within budget, the closer to full depth wins, not the faster
    near = _trial("handcrafted", _quality(0.99, 0.7, seconds=0.003, gflops=0.4))
    far = _trial("learned", _quality(0.95, 0.8, seconds=0.001, gflops=0.2))
    over = _trial("other", _quality(1.0, 0.8, seconds=0.001, gflops=0.41))
    assert choose_winner([far, over, near], budget).name == "handcrafted"


def test_winner_without_an_admissible_plan_is_the_best_recall_ratio_and_ties_keep_the_first():
    floor = QualityFloor(0.999, 0.99)
    low = _trial("handcrafted", _quality(0.99, 0.6, seconds=0.001))
    high = _trial("learned", _quality(0.98, 0.7, seconds=0.005))
    none = _trial("other", None)  # found no plan on the fit rows: always last
    assert choose_winner([none, low, high], floor).name == "learned"
    assert verdict(high.test, floor) == (1, pytest.approx(-0.875)) and verdict(None, floor) == (2, 0.0)
    twin = _trial("learned", _quality(0.99, 0.6, seconds=0.001))
    assert choose_winner([low, twin], floor).name == "handcrafted"


def test_a_routing_plan_ships_only_when_the_held_back_rows_vouch_for_it_and_it_beats_the_best_route():
    floor = QualityFloor(0.98, 0.99)
    routes, full, scores = _measurements()
    keys = [f"scene{i}" for i in range(N)]
    single = best_single_route(routes, full, full, keys, floor)
    assert [r.name for r in single.routes] == ["full"] and single.quality.seconds_per_image == 0.004
    fitted = search_router(scores, routes, full, full, keys, floor)  # cheap + full, 0.0025 s/image
    assert [r.name for r in fitted.routes] == ["cheap", "full"]

    def trial(held_out: PlanQuality) -> ScorerTrial:
        return ScorerTrial("learned", 0.0, 1e-4, fitted, held_out)

    vouched = _quality(0.99, 0.8, seconds=0.003)
    plan = final_plan(single, trial(vouched), floor)
    assert (
        plan.routes == fitted.routes and plan.thresholds == fitted.thresholds and plan.share == fitted.share
    )
    assert plan.quality == vouched  # reported as judged on rows it never saw, not as fitted
    # fails on the held-back rows (ratio 0.95): however good it looked where it was fitted, it does not ship
    assert final_plan(single, trial(_quality(0.99, 0.76, seconds=0.002)), floor) is single
    assert final_plan(single, trial(_quality(0.99, 0.8, seconds=0.004)), floor) is single  # no cheaper
    assert final_plan(None, trial(vouched), floor).quality == vouched
    assert final_plan(None, trial(_quality(0.9, 0.8, seconds=0.001)), floor) is None
    one_route = RouterPlan(single.routes, [], single.quality, [1.0])
    assert final_plan(single, ScorerTrial("handcrafted", 0.0, 0.0, one_route, vouched), floor) is single


def test_fit_test_split_is_a_seeded_random_partition():
    fit, test = fit_test_split(101, seed=0)
    assert len(fit) == 51 and len(test) == 50
    np.testing.assert_array_equal(np.sort(np.concatenate([fit, test])), np.arange(101))
    assert np.all(np.diff(fit) > 0) and np.all(np.diff(test) > 0)
    assert not np.array_equal(test, np.arange(50)) and not np.array_equal(test, np.arange(51, 101))
    again, other = fit_test_split(101, seed=0), fit_test_split(101, seed=1)
    np.testing.assert_array_equal(again[1], test)
    assert not np.array_equal(other[1], test)
    fit, test = fit_test_split(40, seed=3, test_fraction=0.25)
    assert (len(fit), len(test)) == (30, 10)


def test_galleries_are_random_near_equal_and_each_is_split_in_proportion():
    galleries = split_galleries(6001, 2000, seed=0)
    assert np.bincount(galleries).tolist() == [2001, 2000, 2000]
    assert not np.array_equal(galleries[:2000], np.zeros(2000))  # drawn at random, not in row order
    assert split_galleries(6001, None) is None and split_galleries(2000, 2000) is None
    fit, test = fit_test_split(6001, seed=0, galleries=galleries)
    np.testing.assert_array_equal(np.sort(np.concatenate([fit, test])), np.arange(6001))
    assert np.bincount(galleries[test]).tolist() == [1000, 1000, 1000]  # round(2001 / 2) == 1000
    assert np.bincount(galleries[fit]).tolist() == [1001, 1000, 1000]
    one = fit_test_split(101, seed=0, galleries=np.zeros(101, np.int64))
    np.testing.assert_array_equal(one[1], fit_test_split(101, seed=0)[1])  # one gallery: as without
    with pytest.raises(ValueError, match="at least 10 images"):
        split_galleries(100, 5)


def test_a_learned_scorer_that_routes_ships_beside_the_yaml_by_absolute_path(tmp_path, monkeypatch):
    routes, full, scores = _measurements()
    keys = [f"scene{i}" for i in range(N)]
    floor = QualityFloor(0.95, 0.99)
    plan = search_router(scores, routes, full, full, keys, floor)
    learned = LearnedScorer(np.zeros(22), np.ones(22), np.zeros(22), 0.25)
    qualities = route_qualities(routes, full, full, keys, floor)
    calibration = Calibration(floor, routes, qualities, [], "learned", plan, learned, {"images": N})
    monkeypatch.chdir(tmp_path)
    written = write_calibration(calibration, ModelConfig(), "out/routes.yaml", options={"images": N})
    assert written == {
        "routes": str(tmp_path / "out" / "routes.yaml"),
        "report": str(tmp_path / "out" / "routes.report.json"),
        "scorer": str(tmp_path / "out" / "routes.scorer.json"),
    }
    monkeypatch.chdir(tmp_path.parent)  # loaded from elsewhere, the scorer path still resolves
    cfg = load_config(written["routes"])
    assert cfg.router.scorer == written["scorer"] and cfg.router.thresholds == plan.thresholds
    assert [r.name for r in cfg.router.routes] == ["cheap", "full"] and cfg.model == ModelConfig()
    np.testing.assert_allclose(load_scorer(cfg.router.scorer)(np.ones((3, 22), np.float32)), 0.25)
    report = json.loads(Path(written["report"]).read_text())
    assert report["winner"] == "learned" and report["final_plan"]["meets_target"] is True
    assert [r["name"] for r in report["routes"]] == ["cheap", "mid", "full"]
    cheap, _, full_row = report["routes"]  # each route alone on every row, with its bound and verdict
    ratio = "t2i_R@10_in_gallery_ratio"
    assert full_row["mean_cosine"] == pytest.approx(1.0, abs=1e-5) and full_row[ratio] == 1.0
    assert full_row[f"{ratio}_lower"] == pytest.approx(1.0) and full_row["meets_target"] is True
    assert cheap["mean_cosine"] == pytest.approx(qualities[0].mean_cosine) and cheap["mean_cosine"] < 0.95
    assert cheap[f"{ratio}_lower"] <= cheap[ratio] and cheap["meets_target"] is False
    assert cheap["seconds_per_image"] == 0.001 and cheap["gflops_per_image"] == pytest.approx(0.2)


def test_learned_scorer_fits_a_linear_target_and_round_trips_through_its_file(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 22)).astype(np.float32)
    target = (2.0 * features[:, 0] - features[:, 5] + 1.0).astype(np.float32)
    scorer = LearnedScorer.fit(features, target, l2=1e-3)
    np.testing.assert_allclose(scorer(features), target, atol=1e-2)
    scorer.save(tmp_path / "router.json")
    reloaded = load_scorer(str(tmp_path / "router.json"))
    np.testing.assert_allclose(reloaded(features), scorer(features), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="no such learned-scorer file"):
        load_scorer(str(tmp_path / "missing.json"))
