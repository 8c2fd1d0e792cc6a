"""Does the quality floor's R@10 bound hold on scenes it was not computed on?

    python lab/studies/bound_coverage.py --split calib-bimodal --images 2000
    python lab/studies/bound_coverage.py --split calib --images 2000
    python lab/studies/bound_coverage.py --split test-bimodal --images 2000     # and --split test

Embeds the split's scenes on every catalogue route at full depth (or at --exits) with the embedded model,
then splits the sample in two halves by scene key (queries sharing a caption stay on one side) --splits
times. On one half it computes each route's lower bound exactly as calibration does
(`ratio_lower_bound`), on the other, a new sample of the same size, its R@10 ratio. The share of
(split, route) pairs whose other-half ratio stays at or above the bound is the bound's coverage; at 95%
it should be about 0.95. The plain confidence bound (the bootstrap spread not widened) is reported
beside it, and each route's ratio and bound on the whole sample (what calibration would judge it by).
Writes <out>/bound-coverage-<split>.json. Quality only: nothing is timed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icar_lab.catalogue import FULL_KEY, calibration_routes, spec_key
from icar_lab.embed import embed_routes, embed_texts
from icar_lab.heldout import load_heldout
from icar_lab.outputs import output_path
from icar_lab.router_search import NEW_SAMPLE_WIDTH, PlanEvaluator, RouteMeasurement, subset
from icar_lab.targets import QualityFloor
from pipeline.config import load_config
from pipeline.encode.routed import RoutedEncoder

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


def embedded_routes(
    split: str, images: int, exits: list[int], cache_dir: str | None
) -> tuple[list[RouteMeasurement], torch.Tensor, torch.Tensor, list[str]]:
    """The embedded model's embeddings of the split's scenes on every catalogue route at `exits` and full
    depth (full depth itself left out: its bound is 1 and always holds), full depth's, the captions'
    and the scenes' keys."""
    probe = RoutedEncoder.from_config(load_config(None).model, [])
    encoder = RoutedEncoder(probe.loaded, calibration_routes(exits, probe.vit.heads), probe.vit.heads)
    sample = load_heldout(split, images, probe.loaded.image_size, cache_dir=cache_dir)
    embedded = embed_routes(encoder, sample.images, batch_size=64)
    full = next(emb for r, (emb, _) in zip(encoder.routes, embedded, strict=True) if spec_key(r) == FULL_KEY)
    measurements = [
        RouteMeasurement(route, emb, gflops, 0.0)
        for route, (emb, gflops) in zip(encoder.routes, embedded, strict=True)
        if spec_key(route) != FULL_KEY
    ]
    return measurements, full, embed_texts(encoder.loaded, sample.captions), sample.keys


def summary(report: dict[str, Any]) -> str:
    """Each route's ratio and bound on the whole sample, then the coverage over the halvings."""
    lines = [
        f"  {route['route']:42s} R@10 ratio {route['ratio']:.4f}, prediction bound {route['prediction']:.4f}"
        for route in report["whole_sample"]
    ]
    lines.append(
        f"{report['split']}, {report['images']} scenes, {report['pairs']} (split, route) pairs: the other "
        f"half's R@10 ratio >= the {report['confidence']:.0%} prediction bound in "
        f"{report['prediction_bound_coverage']:.1%}, >= the plain confidence bound in "
        f"{report['confidence_bound_coverage']:.1%}; mean prediction margin "
        f"{report['mean_prediction_margin']:.4f}; sd of the half-to-half difference "
        f"{report['sd_of_half_to_half_ratio_difference']:.4f}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--split",
        default="calib-bimodal",
        help="scene stream; on a test stream it checks the bound where nothing was designed or chosen",
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--exits", type=int, nargs="*", default=[], help="exit depths (default: none)")
    parser.add_argument("--splits", type=int, default=30, help="random halvings by scene key")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", help="where rendered scene sets are cached")
    parser.add_argument("--out", default="results/quality")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    measurements, full, text, keys = embedded_routes(args.split, args.images, args.exits, args.cache_dir)
    report = bound_coverage(measurements, full, text, keys, QualityFloor.confidence, args.splits)
    report |= {"split": args.split, "images": len(keys), "args": vars(args)}
    out = output_path(Path(args.out) / f"bound-coverage-{args.split}.json")
    out.write_text(json.dumps(report, indent=2))
    print(f"{summary(report)}\nwrote {out}")


if __name__ == "__main__":
    main()
