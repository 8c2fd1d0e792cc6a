"""Does the quality floor's R@10 bound hold on scenes it was not computed on?

Split a sample in two halves by scene key (queries sharing a caption stay on one side), compute each
route's lower bound on one half exactly as calibration does (`ratio_lower_bound`), and its R@10 ratio
on the other half, a new sample of the same size. Over many splits, the share of (split, route) pairs
whose other-half ratio stays at or above the bound is the bound's coverage; at 95% it should be about
0.95. The plain confidence bound (the bootstrap spread not widened) is reported beside it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.lab.router_search import (
    NEW_SAMPLE_WIDTH,
    PlanEvaluator,
    RouteMeasurement,
    ratio_lower_bound,
    subset,
)

FIELDS = ("route", "point", "prediction", "confidence", "new")  # per (split, route): ratios and bounds


def halves_by_key(keys: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of two halves of the sample, every key wholly in one of them."""
    unique, inverse = np.unique(np.asarray(keys), return_inverse=True)
    first = np.random.default_rng(seed).permutation(len(unique))[: len(unique) // 2]
    in_first = np.isin(inverse, first)
    return np.flatnonzero(in_first), np.flatnonzero(~in_first)


def _half(
    measurements: list[RouteMeasurement],
    full: torch.Tensor,
    text: torch.Tensor,
    keys: list[str],
    rows: np.ndarray,
) -> PlanEvaluator:
    """The evaluator of one half: its rows are both the queries and the gallery."""
    return PlanEvaluator(subset(measurements, rows), full[rows], text[rows], [keys[i] for i in rows])


def bound_coverage(
    measurements: list[RouteMeasurement],
    full: torch.Tensor,
    text: torch.Tensor,
    keys: list[str],
    confidence: float = 0.95,
    splits: int = 30,
) -> dict[str, Any]:
    """Coverage of the prediction bound and of the plain confidence bound over `splits` halvings."""
    pairs = []
    for seed in range(splits):
        bound_rows, new_rows = halves_by_key(keys, seed)
        on_bound, on_new = (_half(measurements, full, text, keys, r) for r in (bound_rows, new_rows))
        clusters = on_bound.key_ids
        for i, m in enumerate(measurements):
            hits = on_bound.hits(np.full(len(bound_rows), i))
            point = float(hits.float().mean()) / on_bound.full_recall
            lower = ratio_lower_bound(hits, on_bound.full_hits, confidence, clusters, seed)
            new = float(on_new.hits(np.full(len(new_rows), i)).float().mean()) / on_new.full_recall
            pairs.append((m.route.name, point, lower, point - (point - lower) / NEW_SAMPLE_WIDTH, new))
    point, prediction, plain, new = (np.array([p[k] for p in pairs]) for k in (1, 2, 3, 4))
    return {
        "confidence": confidence,
        "splits": splits,
        "routes": len(measurements),
        "pairs": len(pairs),
        "prediction_bound_coverage": float(np.mean(new >= prediction)),
        "confidence_bound_coverage": float(np.mean(new >= plain)),
        "mean_prediction_margin": float(np.mean(point - prediction)),
        "sd_of_half_to_half_ratio_difference": float(np.std(point - new)),
        "per_pair": [dict(zip(FIELDS, p, strict=True)) for p in pairs],
    }
