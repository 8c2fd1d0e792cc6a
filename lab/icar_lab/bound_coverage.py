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

from icar_lab.router_search import (
    NEW_SAMPLE_WIDTH,
    PlanEvaluator,
    RouteMeasurement,
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
    confidence: float = 0.0,
) -> PlanEvaluator:
    """The evaluator of one half: its rows are both the queries and the gallery."""
    keys = [keys[i] for i in rows]
    return PlanEvaluator(subset(measurements, rows), full[rows], text[rows], keys, confidence=confidence)


def whole_sample_bound(ev: PlanEvaluator, index: int, name: str) -> dict[str, Any]:
    """One route on the whole sample: its R@10 ratio and the bound calibration would judge it by."""
    quality = ev.measure(np.full(ev.cos.shape[1], index), 1)
    return {"route": name, "ratio": quality.recall_ratio, "prediction": quality.recall_ratio_lower}


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
        on_bound = _half(measurements, full, text, keys, bound_rows, confidence)
        on_new = _half(measurements, full, text, keys, new_rows)
        for i, m in enumerate(measurements):
            quality = on_bound.measure(np.full(len(bound_rows), i), 1)
            point, lower = quality.recall_ratio, quality.recall_ratio_lower
            new = on_new.measure(np.full(len(new_rows), i), 1, bound=False).recall_ratio
            pairs.append((m.route.name, point, lower, point - (point - lower) / NEW_SAMPLE_WIDTH, new))
    point, prediction, plain, new = (np.array([p[k] for p in pairs]) for k in (1, 2, 3, 4))
    whole = PlanEvaluator(measurements, full, text, keys, confidence=confidence)
    return {
        "whole_sample": [whole_sample_bound(whole, i, m.route.name) for i, m in enumerate(measurements)],
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
