"""The headroom oracle, the confidence margin of the quality floor, its coverage study and the
patch-redundancy features, on constructed cases whose right answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scripts import load_script

from icar_lab.catalogue import route, unique
from icar_lab.heldout import load_heldout
from icar_lab.router_search import (
    NEW_SAMPLE_WIDTH,
    PlanEvaluator,
    RouteMeasurement,
    ratio_lower_bound,
    search_router,
)
from icar_lab.scenes.splits import TEST
from icar_lab.targets import QualityFloor
from pipeline.config import RouteSpec, load_config
from pipeline.encode.routed import RoutedEncoder
from pipeline.score import patch_redundancy

headroom = load_script("lab/studies/headroom.py")
coverage = load_script("lab/studies/bound_coverage.py")
N = 100


def _routes(hard: np.ndarray) -> tuple[list[RouteMeasurement], torch.Tensor]:
    """`cheap` is exact except on the `hard` images (noise there), `full` is exact and four times dearer."""
    g = torch.Generator().manual_seed(0)
    full = F.normalize(torch.randn(N, 32, generator=g), dim=-1)
    noise = F.normalize(torch.randn(N, 32, generator=g), dim=-1)
    cheap = torch.where(torch.from_numpy(hard)[:, None], noise, full)
    ones = np.ones(N, np.float32)
    return [
        RouteMeasurement(RouteSpec(name="cheap", exit_depth=2), cheap, 0.25 * ones, 0.001),
        RouteMeasurement(RouteSpec(name="full"), full, ones, 0.004),
    ], full


def test_oracle_sends_each_image_to_the_cheapest_route_that_keeps_it():
    cos = np.array([[1.0, 0.2, 0.97], [1.0, 1.0, 1.0]])  # cheap route first
    assert headroom.oracle_assign(cos, np.array([0.001, 0.004]), 0.95).tolist() == [0, 1, 0]
    assert headroom.oracle_assign(cos, np.array([0.001, 0.004]), 0.99).tolist() == [0, 1, 1]
    assert headroom.oracle_assign(cos[::-1], np.array([0.004, 0.001]), 0.99).tolist() == [1, 0, 0]


def test_headroom_is_the_oracle_against_the_best_static_route():
    hard = np.arange(N) % 2 == 1  # half the images need full depth
    routes, full = _routes(hard)
    keys = [f"scene{i}" for i in range(N)]
    ev = PlanEvaluator(routes, full, full, keys)
    found = headroom.find_headroom(ev, routes, QualityFloor(0.95, 0.99))
    assert found.static is not None and found.static.name == "full"  # cheap alone loses half the scenes
    assert found.oracle is not None and found.oracle.assign.tolist() == hard.astype(int).tolist()
    assert found.oracle.quality.recall_ratio == 1.0
    assert found.gain == pytest.approx(0.004 / (0.5 * 0.001 + 0.5 * 0.004))
    assert found.split is None and found.split_gain is None  # no route here decides per image


def test_an_in_vit_split_is_judged_apart_from_the_static_routes():
    """A route that decides per image inside the ViT is not a static route: it is the realisable plan
    between the best static route and the oracle."""
    hard = np.arange(N) % 2 == 1
    routes, full = _routes(hard)
    split = RouteSpec(
        name="split", merge="tome", merge_keep=0.8, late_keep=0.65, late_after=2, late_similarity=0.9
    )
    routes.append(RouteMeasurement(split, full, 0.5 * np.ones(N, np.float32), 0.003))
    ev = PlanEvaluator(routes, full, full, [f"scene{i}" for i in range(N)])
    found = headroom.find_headroom(ev, routes, QualityFloor(0.95, 0.99))
    assert found.static.name == "full" and found.split.name == "split"
    assert found.split_gain == pytest.approx(0.004 / 0.003)


def test_a_plan_that_only_just_meets_the_floor_is_refused_at_a_confidence_level():
    hard = np.zeros(N, bool)
    hard[7] = True  # one scene in a hundred lost: R@10 ratio exactly 0.99 on this sample
    routes, full = _routes(hard)
    keys = [f"scene{i}" for i in range(N)]
    scores = np.zeros(N)
    point = search_router(scores, routes, full, full, keys, QualityFloor(0.95, 0.99, confidence=0.0))
    robust = search_router(scores, routes, full, full, keys, QualityFloor(0.95, 0.99, confidence=0.95))
    assert [r.name for r in point.routes] == ["cheap"] and point.quality.recall_ratio == pytest.approx(0.99)
    assert point.quality.recall_ratio_lower is None
    assert [r.name for r in robust.routes] == ["full"] and robust.quality.recall_ratio_lower == 1.0


def test_ratio_lower_bound_is_paired_and_below_the_point_estimate():
    full_hits = torch.ones(200, dtype=torch.bool)
    assert ratio_lower_bound(full_hits, full_hits, 0.95) == 1.0
    hits = full_hits.clone()
    hits[:10] = False  # 5% of the queries lost
    lower = ratio_lower_bound(hits, full_hits, 0.95)
    assert float(hits.float().mean()) == pytest.approx(0.95) and 0.9 < lower < 0.95
    assert ratio_lower_bound(hits, full_hits, 0.95, seed=1) == pytest.approx(lower, abs=0.01)


def test_the_bound_holds_for_a_new_sample_of_the_same_size():
    """A plan that loses 6% of full depth's hits and gains 30% of its misses, drawn twice: the bound on
    the first sample must sit below the second sample's ratio about 95% of the time. A bound on this
    sample's ratio alone (the spread unwidened) does not: the new sample's own noise comes on top."""
    gen = torch.Generator().manual_seed(0)

    def draw(n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        full = torch.rand(n, generator=gen) < 0.9
        flip = torch.rand(n, generator=gen)
        return torch.where(full, flip >= 0.06, flip < 0.3), full

    held, unwidened, trials = 0, 0, 150
    for seed in range(trials):
        (hits, full), (new_hits, new_full) = draw(), draw()
        point = float(hits.float().mean() / full.float().mean())
        lower = ratio_lower_bound(hits, full, 0.95, seed=seed)
        new_ratio = float(new_hits.float().mean() / new_full.float().mean())
        held += new_ratio >= lower
        unwidened += new_ratio >= point - (point - lower) / NEW_SAMPLE_WIDTH
    assert held / trials >= 0.92 and unwidened / trials < 0.92


def test_queries_sharing_a_caption_resample_together():
    """20 captions asked 10 times each, two of them missed: 20 queries lost, but only 2 draws' worth of
    evidence. Treating the queries as independent would claim a bound the data cannot support."""
    full_hits = torch.ones(200, dtype=torch.bool)
    captions = torch.arange(200) // 10
    hits = captions >= 2  # every ask of captions 0 and 1 misses
    independent = ratio_lower_bound(hits, full_hits, 0.95)
    clustered = ratio_lower_bound(hits, full_hits, 0.95, clusters=captions)
    assert clustered < independent - 0.05 and 0.8 < independent < 0.9
    assert ratio_lower_bound(hits, full_hits, 0.95, clusters=torch.arange(200)) == independent


def test_repeated_captions_are_ranked_once_and_counted_for_every_copy():
    """Each query's hit equals a brute-force top-10 over its own row, although only the distinct
    (caption, key) queries are ranked; two different captions under one key stay apart."""
    g = torch.Generator().manual_seed(1)
    key_of = torch.randint(0, 12, (N,), generator=g)
    captions = F.normalize(torch.randn(13, 32, generator=g), dim=-1)
    caption_of = torch.where(torch.arange(N) == 0, 12, key_of)  # row 0: a second caption of its key
    text = captions[caption_of]
    routes, full = _routes(np.arange(N) % 3 == 0)
    keys = [f"scene{int(k)}" for k in key_of]
    ev = PlanEvaluator(routes, full, text, keys)
    assert ev.sims.shape[1] == 13  # 12 keys, one with two captions
    assign = (np.arange(N) % 2).astype(np.int64)
    gallery = torch.where(torch.from_numpy(assign == 0)[:, None], routes[0].embeddings, full)
    top = (text @ gallery.T).topk(10, dim=1).indices
    expected = (key_of[top] == key_of[:, None]).any(dim=1)
    assert torch.equal(ev.hits(assign), expected) and not bool(expected.all())
    full_top = (text @ full.T).topk(10, dim=1).indices
    assert torch.equal(ev.full_hits, (key_of[full_top] == key_of[:, None]).any(dim=1))


def test_galleries_rank_each_caption_against_its_own_gallery_only():
    """Each query's hit equals a brute-force top-10 over the images of its own gallery; a same-key image
    in another gallery is no hit, and repeated captions in different galleries are ranked apart."""
    g = torch.Generator().manual_seed(2)
    key_of = torch.randint(0, 12, (N,), generator=g)
    text = F.normalize(torch.randn(12, 32, generator=g), dim=-1)[key_of]
    routes, full = _routes(np.arange(N) % 3 == 0)
    keys = [f"scene{int(k)}" for k in key_of]
    galleries = np.arange(N) % 4  # four galleries of 25
    ev = PlanEvaluator(routes, full, text, keys, galleries=galleries)
    asked = {(gallery, int(k)) for gallery, k in zip(galleries.tolist(), key_of, strict=True)}
    assert ev.sims.shape[1] == len(asked) > 12  # a caption is ranked once per gallery that asks it
    assign = (np.arange(N) % 2).astype(np.int64)
    images = torch.where(torch.from_numpy(assign == 0)[:, None], routes[0].embeddings, full)
    expected = torch.zeros(N, dtype=torch.bool)
    for gallery in range(4):
        rows = torch.from_numpy(np.flatnonzero(galleries == gallery))
        top = rows[(text[rows] @ images[rows].T).topk(10, dim=1).indices]
        expected[rows] = (key_of[top] == key_of[rows, None]).any(dim=1)
    assert torch.equal(ev.hits(assign), expected) and not bool(expected.all())
    one_gallery = PlanEvaluator(routes, full, text, keys).hits(assign)
    assert not torch.equal(one_gallery, expected)  # 100 images are a harder search than 25
    with pytest.raises(ValueError, match="at least 10 per gallery"):
        PlanEvaluator(routes, full, text, keys, galleries=np.arange(N) % 20)


def test_three_galleries_of_new_scenes_narrow_the_bound_by_about_root_three():
    """The same retrieval problem three times over (new keys, same embeddings) as three galleries: the
    R@10 ratio is unchanged and the bound's margin shrinks by about sqrt(3), the point of judging a
    larger sample at the reported gallery size."""
    routes, full = _routes(np.arange(N) % 4 == 0)
    keys = [f"scene{i}" for i in range(N)]
    one = PlanEvaluator(routes, full, full, keys, confidence=0.95)
    tiled = [
        RouteMeasurement(m.route, m.embeddings.repeat(3, 1), np.tile(m.gflops, 3), 0.001) for m in routes
    ]
    three = PlanEvaluator(
        tiled,
        full.repeat(3, 1),
        full.repeat(3, 1),
        [f"{copy}/{key}" for copy in range(3) for key in keys],
        confidence=0.95,
        galleries=np.repeat(np.arange(3), N),
    )
    small, large = one.measure(np.zeros(N, np.int64), 1), three.measure(np.zeros(3 * N, np.int64), 1)
    assert large.recall_ratio == pytest.approx(small.recall_ratio) and small.recall_ratio < 1
    narrowing = (small.recall_ratio - small.recall_ratio_lower) / (
        large.recall_ratio - large.recall_ratio_lower
    )
    assert 1.4 < narrowing < 2.1


def test_patch_redundancy_counts_alike_flat_patches():
    rng = np.random.default_rng(0)
    plain = np.full((1, 64, 64, 4), 120.0, np.float32)
    noisy = rng.uniform(0, 255, (1, 64, 64, 4)).astype(np.float32)
    halves = plain.copy()
    halves[:, :, 32:, :] = 30.0  # two flat colours: pairs across the seam differ
    planes = np.concatenate([plain, noisy, halves])  # r, g, b, grey
    features = patch_redundancy(planes[..., :3], planes[..., 3], side=8)
    flat, alike, mean_std, spread = features.T
    assert flat.tolist() == [1.0, 0.0, 1.0]
    assert alike[0] == 1.0 and alike[1] == 0.0 and alike[2] == pytest.approx(1 - 8 / 112)
    assert mean_std[0] == 0.0 and mean_std[1] > 50 and spread[0] == 0.0 and spread[2] == 45.0


def test_measure_headroom_reports_the_three_plans_on_a_split():
    """The embedded model with its shipped router on a few test scenes, searched in two galleries of 12:
    every plan carries its quality, speed and per-level breakdown, the one-route router equals that
    route measured alone, and the re-timed gains are the ratios of the plans' re-timed costs."""
    cfg = load_config(None)
    probe = RoutedEncoder.from_config(cfg.model, cfg.router.routes)
    routes = unique([route(), route(8), *cfg.router.routes])
    encoder = RoutedEncoder(probe.loaded, routes, probe.vit.heads)
    heldout = load_heldout(TEST, 24, probe.loaded.image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = headroom.measure_headroom(
            encoder, cfg.model.name, heldout, QualityFloor(), cfg.router, 8, 24, 1, 12, retime_rounds=1
        )
    finally:
        torch.set_num_threads(threads)
    assert report["split"] == TEST and report["images"] == 24 and len(report["routes"]) == 3
    assert set(report["plans"]) == {"best static route", "best in-ViT split", "oracle", "router"}
    assert report["plans"]["best in-ViT split"] is None  # no splitting route was measured
    router = report["plans"]["router"]
    alone = next(
        r for r in report["routes"] if r["route"] == cfg.router.routes[0].model_dump(exclude_defaults=True)
    )
    assert router["share"] == {cfg.router.routes[0].name: 1.0}
    assert router["t2i_R@10_in_gallery"] == alone["t2i_R@10_in_gallery"]
    for plan in report["plans"].values():
        assert plan is None or sum(level["images"] for level in plan["per_level"].values()) == 24
    retimed = report["retimed"]
    assert retimed["rounds"] == 1 and retimed["images"] == 8
    assert set(retimed["plans"]) == {name for name, plan in report["plans"].items() if plan is not None}
    ms = {name: plan["ms_per_image"] for name, plan in retimed["plans"].items()}
    gain = retimed["oracle_gain_over_static"]
    assert (
        gain["median"] == pytest.approx(ms["best static route"] / ms["oracle"]) == gain["min"] == gain["max"]
    )
    static, oracle = report["plans"]["best static route"], report["plans"]["oracle"]
    flops = static["gflops_per_image"] / oracle["gflops_per_image"]
    assert report["oracle_gflops_gain_over_static"] == pytest.approx(flops)
    markdown = headroom.headroom_markdown(report)
    assert "| router |" in markdown and "24 scenes in 2 galleries of 12;" in markdown
    assert f"{gain['median']:.3f}x ({gain['min']:.3f}-{gain['max']:.3f}) in 1 fresh rounds" in markdown


def test_bound_coverage_halves_by_key_and_counts_every_split_and_route():
    keys = [f"caption{i // 3}" for i in range(60)]  # 20 captions, 3 scenes each
    first, second = coverage.halves_by_key(keys, seed=0)
    assert sorted([*first, *second]) == list(range(60))
    assert not {keys[i] for i in first} & {keys[i] for i in second} and len(first) == 30
    gen = torch.Generator().manual_seed(0)
    full = F.normalize(torch.randn(60, 16, generator=gen), dim=-1)
    noisy = F.normalize(full + 0.8 * torch.randn(60, 16, generator=gen), dim=-1)
    ones = np.ones(60, np.float32)
    exact = RouteMeasurement(RouteSpec(name="exact", merge="tome", merge_r=1), full.clone(), ones, 0.0)
    lossy = RouteMeasurement(RouteSpec(name="lossy", merge="tome", merge_r=2), noisy, ones, 0.0)
    report = coverage.bound_coverage([exact, lossy], full, full, keys, splits=4)
    assert report["pairs"] == 8 and [p["route"] for p in report["per_pair"][:2]] == ["exact", "lossy"]
    exact_pairs = [p for p in report["per_pair"] if p["route"] == "exact"]
    assert all(p["point"] == p["prediction"] == p["new"] == 1.0 for p in exact_pairs)
    lossy_pairs = [p for p in report["per_pair"] if p["route"] == "lossy"]
    assert all(p["prediction"] <= p["confidence"] <= p["point"] for p in lossy_pairs)
    assert any(p["new"] < 1.0 for p in lossy_pairs)
    whole = {w["route"]: w for w in report["whole_sample"]}
    assert whole["exact"]["ratio"] == whole["exact"]["prediction"] == 1.0
    assert whole["lossy"]["prediction"] < whole["lossy"]["ratio"] < 1.0
