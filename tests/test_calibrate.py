"""Calibration picks the cheapest router that meets the quality floor, from measured routes; the learned
scorer it may ship fits and round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import RouteSpec
from pipeline.lab.calibrate import (
    ComputeBudget,
    QualityFloor,
    RouteMeasurement,
    cheapest_route_labels,
    search_router,
)
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
    assert plan.seconds_per_image == np.float64(0.5 * 0.001 + 0.5 * 0.004)
    assert plan.mean_cosine >= 0.95 and plan.recall_at_10 == 1.0


def test_search_returns_none_when_no_route_meets_the_floor():
    routes, full, scores = _measurements()
    keys = [f"scene{i}" for i in range(N)]
    assert search_router(scores, routes[:2], full, full, keys, QualityFloor(0.99, 0.99)) is None


def test_compute_budget_buys_the_most_faithful_plan_it_can_afford():
    routes, full, scores = _measurements()
    keys = [f"scene{i}" for i in range(N)]
    # 0.61 GFLOPs/image affords full depth on at most 50% of images (cheap 0.2, full 1.0 GFLOPs)
    plan = search_router(scores, routes, full, full, keys, ComputeBudget(max_gflops=0.61))
    assert plan is not None and [r.name for r in plan.routes] == ["cheap", "full"]
    assert plan.share == [0.5, 0.5] and plan.gflops_per_image == pytest.approx(0.6)
    assert plan.mean_cosine == pytest.approx(1.0, abs=1e-5)  # easy half exact on cheap, rest on full
    tight = search_router(scores, routes, full, full, keys, ComputeBudget(max_gflops=0.21))
    assert [r.name for r in tight.routes] == ["cheap"]
    assert search_router(scores, routes, full, full, keys, ComputeBudget(max_gflops=0.1)) is None


def test_cheapest_route_label_is_the_rank_of_the_cheapest_good_enough_route():
    routes, full, scores = _measurements()
    labels = cheapest_route_labels(routes, full, min_cosine=0.95)
    np.testing.assert_array_equal(labels, np.where(scores < 0.5, 0.0, 2.0))


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
