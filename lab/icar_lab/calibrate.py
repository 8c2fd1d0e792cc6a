"""Calibration: measure every candidate route on a captioned sample, fit a learned scorer and compare it
with the handcrafted one on a held-back part of the sample, and ship the winner's routing plan if the
held-back rows vouch for it and it beats the best single route on the whole sample. The result is a
router (plus the learned scorer, if it won and the router routes) that meets a quality floor at the lowest
measured cost, or is the most faithful within a GFLOPs budget.

R@10 depends on how many images a caption searches, so a claim is about a gallery size: with
`gallery_size` the sample is cut into galleries of that many images and every caption searches its own.
A sample three times the reported gallery size then gives three times the queries at the same R@10
regime, and the distance from the R@10 ratio to its lower bound shrinks by about sqrt(3).

Route costs come from the shared harness (lab/icar_lab/speed.py): each route's seconds per image is the
full-depth route's, divided by the route's median same-round speedup over it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from icar_lab.catalogue import FULL_KEY, spec_key
from icar_lab.embed import embed_routes, embed_texts
from icar_lab.router_cost import router_seconds
from icar_lab.router_search import (
    PlanQuality,
    RouteMeasurement,
    RouterPlan,
    apply_plan,
    cheapest_admissible,
    route_qualities,
    search_router,
    split_galleries,
    subset,
)
from icar_lab.sample import CaptionedSample
from icar_lab.scenes.splits import refuse_test
from icar_lab.speed import EncoderCase, measure_encoder
from icar_lab.targets import QualityFloor, Target
from pipeline.encode.routed import RoutedEncoder
from pipeline.score import HandcraftedScorer, LearnedScorer, Scorer, complexity_features


class CalibrationError(ValueError):
    """No router meets the target on the sample; the message says which target."""


@dataclass
class CalibrationSettings:
    batch_size: int = 64
    timing_images: int = 512  # each route is timed on this many images of the sample
    rounds: int = 3  # alternating timing rounds (medians kept)
    seed: int = 0  # the fit/test split and the galleries
    test_fraction: float = 0.5
    gallery_size: int | None = None  # judge R@10 in galleries of this many images (None: the whole sample)


def measure_routes(
    encoder: RoutedEncoder,
    model_name: str,
    images: np.ndarray,
    batch_size: int = 64,
    timing_images: int = 512,
    rounds: int = 3,
) -> list[RouteMeasurement]:
    """Embed every image on every route of `encoder`, then time the routes on the first `timing_images`
    with the shared harness. The full-depth route must be one of them: it is the reference."""
    keys = [spec_key(r) for r in encoder.routes]
    if FULL_KEY not in keys:
        raise ValueError("calibration needs the plain full-depth route among the candidates (the reference)")
    embedded = embed_routes(encoder, images, batch_size)
    timed = images[: max(1, min(timing_images, len(images)))]
    case = EncoderCase.of_encoder(encoder, model_name, timed, batch_size)
    points = {p["key"]: p for p in measure_encoder(case, rounds)["points"] if p["key"] is not None}
    full_seconds = points[FULL_KEY]["ms_per_image"] / 1e3
    return [
        RouteMeasurement(
            route,
            emb,
            gflops,
            full_seconds / points[key]["speedup_vs_full_route"]["median"],
            points[key]["speedup"],
        )
        for route, key, (emb, gflops) in zip(encoder.routes, keys, embedded, strict=True)
    ]


def cheapest_route_labels(
    measurements: list[RouteMeasurement], full: torch.Tensor, min_cosine: float
) -> np.ndarray:
    """Per image, the rank (by measured cost) of the cheapest route keeping cos-to-full >= min_cosine:
    the self-supervised target of the learned router."""
    order = np.argsort([m.seconds_per_image for m in measurements])
    cos = np.stack([(measurements[i].embeddings * full).sum(-1).numpy() for i in order])  # [R, N] by cost
    ok = cos >= min_cosine
    ok[-1] |= ~ok.any(axis=0)  # no route is good enough: the dearest one
    return ok.argmax(axis=0).astype(np.float32)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (Pearson correlation of ranks; ties broken by order, fine for a comparison)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def fit_test_split(
    n: int, seed: int = 0, test_fraction: float = 0.5, galleries: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted row indices (fit, test) covering range(n), drawn at random: shards are often
    ordered (by source, by time), so the first half and the second half need not look alike. With
    `galleries`, each gallery is split on its own, so both parts hold every gallery in proportion."""
    order = np.random.default_rng(seed).permutation(n)
    groups = np.zeros(n, np.int64) if galleries is None else np.asarray(galleries)
    order = order[np.argsort(groups[order], kind="stable")]  # gallery by gallery, random within each
    _, first, counts = np.unique(groups[order], return_index=True, return_counts=True)
    position = np.arange(n) - np.repeat(first, counts)  # rank within its gallery
    is_test = position < np.round(np.repeat(counts, counts) * test_fraction)
    return np.sort(order[~is_test]), np.sort(order[is_test])


@dataclass
class ScorerTrial:
    """One scorer's router, searched on the fit rows and judged on the test rows."""

    name: str
    rank_correlation: float  # with the cheapest adequate route, on the test rows
    cpu_seconds_per_image: float  # complexity features + scorer
    fit_plan: RouterPlan | None
    test: PlanQuality | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rank_correlation_with_cheapest_route": self.rank_correlation,
            "cpu_seconds_per_image": self.cpu_seconds_per_image,
            "fit_plan": self.fit_plan.to_dict() if self.fit_plan else None,
            "test": self.test.to_dict() if self.test else None,
        }


def verdict(test: PlanQuality | None, target: Target) -> tuple[int, float]:
    """Sort key of a held-out result, lower is better: admissible plans first, by the target's cost
    (seconds for a quality floor, closeness to full depth for a budget); then inadmissible ones by their
    R@10 ratio to full depth; last, scorers that found no plan on the fit rows."""
    if test is None:
        return (2, 0.0)
    if test.meets(target):
        return (0, test.cost(target))
    return (1, -test.recall_ratio)


def choose_winner(trials: list[ScorerTrial], target: Target) -> ScorerTrial:
    """The trial with the best verdict; on a tie the earlier one (the handcrafted scorer comes first)."""
    return min(trials, key=lambda t: verdict(t.test, target))


def final_plan(single: RouterPlan | None, winner: ScorerTrial, target: Target) -> RouterPlan | None:
    """What ships: the winner's routing plan as fitted, if it met `target` on the held-back rows and costs
    less there than `single` (the best route alone on the whole sample); else `single`.

    A routing plan is never re-searched on the whole sample: the search tries thousands of (ladder,
    thresholds) pairs and the one that passes on the sample is the one the sample flatters (on 6,000 calib
    scenes, the plan searched on all of them claims an R@10 ratio of 1.002, while both ladders fitted on
    half of those scenes fail on the other half). Only the held-back rows, which the plan never saw, can
    vouch for it; its quality there is what the report shows. A single route has no thresholds to fit and
    is one of a few dozen candidates, so it is chosen on every row, where its bound is tightest."""
    fitted, held_out = winner.fit_plan, winner.test
    routed = fitted is not None and len(fitted.routes) > 1 and held_out is not None and held_out.meets(target)
    if not routed:
        return single
    plan = RouterPlan(fitted.routes, fitted.thresholds, held_out, fitted.share)
    if single is None:
        return plan
    return plan if held_out.cost(target) < single.quality.cost(target) else single


@dataclass
class Calibration:
    """Everything a calibration decided, and the numbers it decided on."""

    target: Target
    measurements: list[RouteMeasurement]
    qualities: list[PlanQuality]  # each route alone on every row of the sample
    trials: list[ScorerTrial]
    winner: str
    plan: RouterPlan  # what ships (final_plan), with the quality it was judged by
    learned: LearnedScorer | None  # to ship with the router: the winner as fitted, when the plan routes
    sample: dict[str, Any]

    def route_table(self) -> list[dict[str, Any]]:
        """Per route, on every row: cost, speed, mean cosine, R@10, its ratio to full depth and the ratio's
        lower bound (so a report says which routes a floor rejected, and by how much)."""
        return [
            {
                "name": m.route.name,
                "route": m.route.model_dump(exclude_defaults=True),
                "speedup_vs_encode_image": m.speedup,
                **q.to_dict(),
                "meets_target": q.meets(self.target),
            }
            for m, q in zip(self.measurements, self.qualities, strict=True)
        ]

    def report(self) -> dict[str, Any]:
        return {
            "target": {type(self.target).__name__: vars(self.target)},
            "sample": self.sample,
            "routes": self.route_table(),
            "comparison": {t.name: t.to_dict() for t in self.trials},
            "winner": self.winner,
            "final_plan": self.plan.to_dict()
            | {
                "meets_target": self.plan.quality.meets(self.target),
                # final_plan: a routing plan is judged on the held-back rows only, a single route on all
                "judged_on": "test_rows" if len(self.plan.routes) > 1 else "all_rows",
            },
        }


@dataclass
class Evidence:
    """What every scorer is judged on: the routes measured on the sample, full depth's and the captions'
    embeddings, the match keys, the galleries (None: one) and the fit and test rows."""

    measurements: list[RouteMeasurement]
    full: torch.Tensor
    text: torch.Tensor
    keys: np.ndarray
    galleries: np.ndarray | None
    fit: np.ndarray
    test: np.ndarray

    def on(self, rows: np.ndarray) -> tuple:
        """(measurements, full, text, keys) of `rows`: the positional arguments of a search."""
        return subset(self.measurements, rows), self.full[rows], self.text[rows], self.keys[rows].tolist()

    def galleries_of(self, rows: np.ndarray) -> np.ndarray | None:
        return None if self.galleries is None else self.galleries[rows]


def try_scorer(
    name: str,
    scorer: Scorer,
    features: np.ndarray,
    labels: np.ndarray,
    sample: CaptionedSample,
    evidence: Evidence,
    target: Target,
) -> ScorerTrial:
    """The router searched with `scorer` on the fit rows, judged on the test rows."""
    fit, test = evidence.fit, evidence.test
    scores = scorer(features)
    cpu = router_seconds(scorer, sample.images, sample.bytes_per_pixel)
    plan = search_router(
        scores[fit], *evidence.on(fit), target, router_seconds=cpu, galleries=evidence.galleries_of(fit)
    )
    held_out = None
    if plan:
        held_out = apply_plan(
            plan, scores[test], *evidence.on(test), router_seconds=cpu, galleries=evidence.galleries_of(test)
        )
    return ScorerTrial(name, rank_correlation(scores[test], labels[test]), cpu, plan, held_out)


def sample_info(sample: CaptionedSample, evidence: Evidence, gallery_size: int | None) -> dict[str, Any]:
    galleries = evidence.galleries
    return {
        "images": len(sample),
        "match_key": sample.key_source,
        "distinct_keys": len(set(sample.keys)),
        "skipped": sample.skipped,
        "fit_rows": len(evidence.fit),
        "test_rows": len(evidence.test),
        "galleries": 1 if galleries is None else int(galleries.max()) + 1,
        "gallery_size": gallery_size,
    }


def calibrate(
    encoder: RoutedEncoder,
    model_name: str,
    sample: CaptionedSample,
    target: Target,
    settings: CalibrationSettings | None = None,
    log: Callable[[str], None] = print,
) -> Calibration:
    """Measure `encoder.routes` on `sample`, compare the scorers on held-back rows, pick the router."""
    s = settings or CalibrationSettings()
    refuse_test(sample.splits, "calibration")
    log(f"measuring {len(encoder.routes)} routes on {len(sample)} images ({s.rounds} timing rounds)")
    measurements = measure_routes(encoder, model_name, sample.images, s.batch_size, s.timing_images, s.rounds)
    full = next(m for m in measurements if spec_key(m.route) == FULL_KEY).embeddings
    text = embed_texts(encoder.loaded, sample.captions)
    features = complexity_features(sample.images, sample.bytes_per_pixel)
    label_cosine = target.min_cosine if isinstance(target, QualityFloor) else QualityFloor.min_cosine
    labels = cheapest_route_labels(measurements, full, label_cosine)
    galleries = split_galleries(len(sample), s.gallery_size, s.seed)
    fit, test = fit_test_split(len(sample), s.seed, s.test_fraction, galleries)
    evidence = Evidence(measurements, full, text, np.asarray(sample.keys), galleries, fit, test)
    scorers: dict[str, Scorer] = {
        "handcrafted": HandcraftedScorer(),
        "learned": LearnedScorer.fit(features[fit], labels[fit]),
    }
    trials = []
    for name, scorer in scorers.items():
        trial = try_scorer(name, scorer, features, labels, sample, evidence, target)
        ladder = trial.fit_plan and [r.name for r in trial.fit_plan.routes]
        log(f"{name}: fit plan {ladder}; held out: {trial.test and trial.test.to_dict()}")
        trials.append(trial)
    winner = choose_winner(trials, target)
    qualities = route_qualities(measurements, full, text, sample.keys, target, galleries)
    plan = final_plan(cheapest_admissible(measurements, qualities, target), winner, target)
    if plan is None:
        raise CalibrationError(f"no router meets {target} on the {len(sample)} calibration images")
    scorer = scorers[winner.name]
    learned = scorer if isinstance(scorer, LearnedScorer) and len(plan.routes) > 1 else None
    info = sample_info(sample, evidence, s.gallery_size)
    return Calibration(target, measurements, qualities, trials, winner.name, plan, learned, info)
