"""Calibrate the router: measure candidate routes on a captioned sample, compare the handcrafted scorer with
a learned one, and write the cheapest router meeting the quality floor as a pipeline config (or, with
--max-gflops, the router closest to full depth within that compute budget per image).

    python jobs/calibrate.py --images 2000 --min-cosine 0.985 --min-recall-ratio 0.99
    python jobs/calibrate.py --images 2000 --max-gflops 0.2

Outputs: pipeline/configs/routed.yaml (router section used by `make demo`), the learned scorer (if it wins)
next to the model, and results/calibration.json with every measurement and the router comparison.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.config import ModelConfig
from pipeline.encode.model import MODELS_DIR
from pipeline.encode.routed import RoutedEncoder
from pipeline.lab.calibrate import (
    ComputeBudget,
    QualityFloor,
    RouterPlan,
    Target,
    apply_plan,
    candidate_routes,
    cheapest_route_labels,
    measure_routes,
    search_router,
    subset,
)
from pipeline.lab.heldout import load_heldout
from pipeline.lab.quality import embed_texts
from pipeline.score import HandcraftedScorer, LearnedScorer, complexity_features

CONFIG_OUT = Path(__file__).resolve().parent.parent / "pipeline" / "configs" / "routed.yaml"


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (Pearson correlation of ranks; ties broken by order, fine for a comparison)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def time_scorer(scorer, images: np.ndarray, bpp: np.ndarray, repeats: int = 3) -> float:
    """CPU seconds per image of features + score, best of `repeats` (noise only ever adds time)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        scorer(complexity_features(images, bpp))
        best = min(best, time.perf_counter() - t0)
    return best / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-cosine", type=float, default=QualityFloor.min_cosine)
    parser.add_argument("--min-recall-ratio", type=float, default=QualityFloor.min_recall_ratio)
    parser.add_argument(
        "--max-gflops", type=float, default=None, help="compute budget per image instead of the quality floor"
    )
    parser.add_argument("--exits", type=int, nargs="+", default=[6, 8, 10])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--timing-images", type=int, default=512, help="images each route is timed on")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (median kept)")
    parser.add_argument("--results", default="results/calibration.json")
    parser.add_argument("--config-out", default=str(CONFIG_OUT))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    floor = QualityFloor(args.min_cosine, args.min_recall_ratio)
    target: Target = ComputeBudget(args.max_gflops) if args.max_gflops else floor

    model_cfg = ModelConfig()
    probe = RoutedEncoder.from_config(model_cfg, [])
    routes = candidate_routes(probe.vit.depth, args.exits)
    encoder = RoutedEncoder(probe.loaded, routes, probe.vit.heads)
    sample = load_heldout(args.seed, args.images, probe.loaded.image_size, split="calib")
    print(f"measuring {len(routes)} routes on {len(sample)} calibration images")
    measurements = measure_routes(
        encoder, sample.images, routes, args.batch_size, args.timing_images, args.rounds
    )
    full = next(m for m in measurements if m.route.name == "full").embeddings
    text = embed_texts(probe.loaded, sample.captions)
    for m in measurements:
        cos = float((m.embeddings * full).sum(-1).mean())
        ms = m.seconds_per_image * 1e3
        print(f"  {m.route.name:<24} {ms:6.2f} ms/img  {m.gflops.mean():.3f} GFLOPs  cos {cos:.4f}")

    features = complexity_features(sample.images, sample.bytes_per_pixel)
    labels = cheapest_route_labels(measurements, full, floor.min_cosine)
    n = len(sample)
    fit, test = np.arange(n) < n // 2, np.arange(n) >= n // 2
    learned = LearnedScorer.fit(features[fit], labels[fit])
    scorers = {"handcrafted": HandcraftedScorer(), "learned": learned}
    keys = np.asarray(sample.scene_keys)

    def on(rows: np.ndarray):
        return subset(measurements, rows), full[rows], text[rows], keys[rows].tolist()

    comparison = {}
    for name, scorer in scorers.items():
        scores = scorer(features)
        cpu = time_scorer(scorer, sample.images, sample.bytes_per_pixel)
        entry: dict = {
            "rank_correlation_with_cheapest_route": rank_correlation(scores[test], labels[test]),
            "cpu_seconds_per_image": cpu,
        }
        plan = search_router(scores[fit], *on(fit), target, router_seconds=cpu)
        if plan is not None:
            result = apply_plan(plan, scores[test], *on(test), router_seconds=cpu)
            entry |= {"fit_plan": plan.to_dict(), "test": result}
        comparison[name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if k != "fit_plan"}, indent=1))

    def rank(entry: dict) -> tuple[int, float]:
        """Held-out verdict: admissible first, then the target's cost (total seconds for a quality floor,
        closeness to full depth for a budget); when none is admissible, the best R@10."""
        test_result = entry.get("test")
        if test_result is None:
            return (2, 0.0)
        cosine, seconds = test_result["mean_cosine"], test_result["seconds_per_image"]
        ratio = test_result["t2i_R@10"] / test_result["full_R@10"]
        if target.admits(cosine, ratio, test_result["gflops_per_image"]):
            return (0, target.cost(cosine, seconds))
        return (1, -ratio)

    winner = min(comparison, key=lambda k: rank(comparison[k]))
    scores = scorers[winner](features)
    cpu = comparison[winner]["cpu_seconds_per_image"]

    def search_all(all_scores: np.ndarray) -> RouterPlan | None:
        return search_router(all_scores, measurements, full, text, keys.tolist(), target, router_seconds=cpu)

    final = search_all(scores)
    if final is None:
        raise SystemExit(f"no router meets {target} on the calibration sample")
    scorer_spec = "handcrafted"  # a one-route plan never scores, so it needs no learned file
    if winner == "learned" and len(final.routes) > 1:
        learned_all = LearnedScorer.fit(features, labels)
        learned_all.save(MODELS_DIR / "icar-tiny-vit.router.json")
        scorer_spec = "icar-tiny-vit.router.json"
        final = search_all(learned_all(features)) or final
    router = {
        "scorer": scorer_spec,
        "thresholds": final.thresholds,
        "routes": [r.model_dump(exclude_defaults=True) for r in final.routes],
    }
    Path(args.config_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.config_out).write_text(
        f"# Written by jobs/calibrate.py: the best router for {target} on the calibration set.\n"
        + yaml.safe_dump({"router": router}, sort_keys=False)
    )
    report = {
        "args": vars(args),
        "target": {type(target).__name__: vars(target)},
        "routes": [
            {
                "route": m.route.model_dump(exclude_defaults=True),
                "seconds_per_image": m.seconds_per_image,
                "gflops_per_image": float(m.gflops.mean()),
                "mean_cosine": float((m.embeddings * full).sum(-1).mean()),
            }
            for m in measurements
        ],
        "comparison": comparison,
        "winner": winner,
        "final_plan": final.to_dict(),
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(report, indent=2))
    print(f"winner: {winner}; router written to {args.config_out}")
    print(json.dumps(final.to_dict(), indent=1))


if __name__ == "__main__":
    main()
