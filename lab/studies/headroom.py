"""How much per-image routing could ever buy on a sample, before any scorer is tried.

    python lab/studies/headroom.py --split test --images 2000 --out results/headroom
    python lab/studies/headroom.py --split calib --config results/routes.yaml --out /tmp/headroom-calib
    python lab/studies/headroom.py --split test --images 6000 --gallery-size 2000  # 3x the queries

The oracle sees every route's embedding of every image and sends each image down the cheapest route
whose cosine to full depth is at least tau, with tau the loosest that still meets the quality target.
Against it stands the best single static route meeting the same target on the same images (a route that
treats every image alike). If the oracle is barely faster than that static route, no complexity score can
make per-image routing pay on this data, however good; where it is much faster, the gap is what a scorer
can aim at. Between the two sits the best in-ViT split: a route whose images choose their own merge
schedule from their own tokens (`late_similarity`), i.e. per-image routing that is realisable. Beside
them: the router of --config (default: the embedded model's shipped one). Each plan comes with its
quality per complexity level.

Every catalogue route (each token path at each exit the heads serve, and at full depth) is measured on
the split's scenes, timed against open_clip `encode_image` in alternating rounds (icar_lab/calibrate.py
`measure_routes`). Those costs are per image in dense batches, so the oracle's figure assumes its groups
are large enough to run at that speed: an upper bound. The plans are picked on those costs, so their
gains there are flattered by that timing's noise (the oracle leans on whichever of two near-equal routes
happened to time fast); `retime_plans` times the routes the plans use again, in fresh alternating rounds
on other scenes, and reports the gains those rounds give.

Writes <out>/headroom-<split>.json, .md and .png (headroom-<split>-<images>.* for another number of
scenes than the default 2,000). Report on `test`; choose on `calib` (lab/icar_lab/scenes/splits.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icar_lab.calibrate import measure_routes
from icar_lab.catalogue import FULL_KEY, calibration_routes, spec_key, unique
from icar_lab.embed import embed_texts
from icar_lab.heldout import load_heldout
from icar_lab.outputs import output_path
from icar_lab.plots import pyplot
from icar_lab.router_cost import router_seconds
from icar_lab.router_search import PlanEvaluator, PlanQuality, RouteMeasurement, split_galleries
from icar_lab.sample import CaptionedSample
from icar_lab.scenes.splits import TEST
from icar_lab.speed import BASELINE, EncoderCase, measure_encoder, route_images
from icar_lab.targets import QualityFloor
from icar_lab.timing import paired_speedup
from pipeline.config import RouterConfig, load_config
from pipeline.encode.routed import RoutedEncoder
from pipeline.score import load_scorer

TAUS = np.round(np.arange(0.900, 1.0, 0.001), 3)  # per-image cosine floors the oracle tries


@dataclass
class Plan:
    """One way of assigning the sample's images to routes, and what it gives."""

    name: str
    assign: np.ndarray  # [N] index into the measurements
    quality: PlanQuality

    def share(self, measurements: list[RouteMeasurement]) -> dict[str, float]:
        used, counts = np.unique(self.assign, return_counts=True)
        n = len(self.assign)
        return {measurements[i].route.name: float(c) / n for i, c in zip(used, counts, strict=True)}


@dataclass
class Headroom:
    static: Plan | None  # the fastest single route treating every image alike that meets the target
    split: Plan | None  # the fastest route deciding per image inside the ViT that meets the target
    oracle: Plan | None  # the fastest per-image oracle meeting the target
    oracle_tau: float | None

    @property
    def gain(self) -> float | None:
        """How many times faster the oracle is than the best static route (None if either is missing)."""
        return _gain(self.static, self.oracle)

    @property
    def split_gain(self) -> float | None:
        """How many times faster the best in-ViT split is than the best static route."""
        return _gain(self.static, self.split)


def _gain(base: Plan | None, plan: Plan | None, cost: str = "seconds_per_image") -> float | None:
    """How many times less of `cost` (a PlanQuality field) `plan` spends than `base` (None if either is
    missing)."""
    if base is None or plan is None:
        return None
    return getattr(base.quality, cost) / getattr(plan.quality, cost)


def _fastest(ev: PlanEvaluator, plans: list[tuple[str, np.ndarray]], target: QualityFloor) -> Plan | None:
    """The cheapest plan meeting `target`; plans are measured cheapest first and the search stops early."""
    costed = sorted(plans, key=lambda p: ev.cost(p[1], 1)[0])
    for name, assign in costed:
        quality = ev.measure(assign, 1)
        if quality.meets(target):
            return Plan(name, assign, quality)
    return None


def oracle_assign(cos: np.ndarray, seconds: np.ndarray, tau: float) -> np.ndarray:
    """[R, N] cosines to full depth, [R] costs -> per image the cheapest route with cosine >= tau (the
    full-depth route, cosine 1, always qualifies)."""
    order = np.argsort(seconds, kind="stable")
    ok = cos[order] >= tau
    return order[ok.argmax(axis=0)]


def find_headroom(ev: PlanEvaluator, measurements: list[RouteMeasurement], target: QualityFloor) -> Headroom:
    """Best static route and best cosine-floor oracle at `target` over the evaluator's routes (the
    `measurements`, full depth among them), judged by point estimates on this sample: the oracle is an
    upper bound, and confidence margins belong to calibration."""
    if FULL_KEY not in {spec_key(m.route) for m in measurements}:
        raise ValueError("the headroom needs the plain full-depth route among the measurements")
    point = dataclasses.replace(target, confidence=0.0)
    n = ev.cos.shape[1]
    singles = [(m.route.name, np.full(n, i), m.route.splits) for i, m in enumerate(measurements)]
    static = _fastest(ev, [(name, a) for name, a, splits in singles if not splits], point)
    split = _fastest(ev, [(name, a) for name, a, splits in singles if splits], point)
    cos = ev.cos.numpy()
    taus = {f"oracle tau={t:.3f}": float(t) for t in TAUS}
    oracle = _fastest(ev, [(name, oracle_assign(cos, ev.seconds, t)) for name, t in taus.items()], point)
    return Headroom(static, split, oracle, taus[oracle.name] if oracle else None)


def retime_plans(
    encoder: RoutedEncoder,
    model_name: str,
    images: np.ndarray,
    plans: dict[str, Plan | None],
    ev: PlanEvaluator,
    batch_size: int,
    rounds: int,
) -> dict[str, Any]:
    """Time every route the `plans` use again, alternately with `encode_image` on `images`, and cost each
    plan per round as its share-weighted route times (each group at dense-batch speed, as in selection)
    plus what it paid beyond them there (a multi-route router's scorer). Gains over the best static route
    and speedups are same-round ratios: median, min and max."""
    used = sorted({int(i) for plan in plans.values() if plan is not None for i in np.unique(plan.assign)})
    case = EncoderCase.of_encoder(encoder, model_name, images, batch_size, [encoder.routes[i] for i in used])
    timed = {p["name"]: p["seconds_per_round"] for p in measure_encoder(case, rounds)["points"]}
    route_rounds = np.zeros((len(encoder.routes), rounds))  # [R, rounds] seconds per image; unused rows 0
    route_rounds[used] = [np.asarray(timed[encoder.routes[i].name]) / len(images) for i in used]
    per_round = {
        name: route_rounds[plan.assign].mean(axis=0)
        + plan.quality.seconds_per_image
        - ev.seconds[plan.assign].mean()
        for name, plan in plans.items()
        if plan is not None
    }  # the plan's routes at this round's speeds, plus what it paid beyond them (a router's scorer)
    baseline = np.asarray(timed[BASELINE]) / len(images)
    static = per_round.get("best static route")
    gains = {
        f"{key}_gain_over_static": paired_speedup(static.tolist(), per_round[name].tolist())
        for key, name in (("oracle", "oracle"), ("split", "best in-ViT split"))
        if static is not None and name in per_round
    }
    return {
        "rounds": rounds,
        "images": len(images),
        "plans": {
            name: {
                "ms_per_image": 1e3 * float(np.median(seconds)),
                "speedup_vs_encode_image": paired_speedup(baseline.tolist(), seconds.tolist()),
            }
            for name, seconds in per_round.items()
        },
        **gains,
    }


def per_level(ev: PlanEvaluator, plan: Plan, levels: np.ndarray) -> dict[str, dict[str, float]]:
    """The plan's cost, mean cosine and t->i R@10 in gallery (queries of the level) per level."""
    hits = ev.hits(plan.assign).float().numpy()
    full_hits = ev.full_hits.float().numpy()
    cos = ev.cos[torch.from_numpy(plan.assign), torch.arange(len(plan.assign))].numpy()
    out = {}
    for level in np.unique(levels):
        rows = levels == level
        out[str(level)] = {
            "images": int(rows.sum()),
            "ms_per_image": 1e3 * float(ev.seconds[plan.assign[rows]].mean()),
            "mean_cosine": float(cos[rows].mean()),
            "t2i_R@10_in_gallery": float(hits[rows].mean()),
            "full_t2i_R@10_in_gallery": float(full_hits[rows].mean()),
        }
    return out


def router_assignment(
    router: RouterConfig, measurements: list[RouteMeasurement], sample: CaptionedSample
) -> tuple[np.ndarray, float]:
    """Per image, the index (into `measurements`) of the route `router` sends it down, and what routing
    costs per image (router_cost.py; nothing for a router of one route). Each of its routes must be
    among the measured ones."""
    index = {spec_key(m.route): i for i, m in enumerate(measurements)}
    missing = [r.name for r in router.routes if spec_key(r) not in index]
    if missing:
        raise ValueError(f"router routes {missing} are not among the measured routes")
    ids = route_images(router, sample.images, sample.bytes_per_pixel)
    scorer_cpu = 0.0
    if len(router.routes) > 1:
        scorer_cpu = router_seconds(load_scorer(router.scorer), sample.images, sample.bytes_per_pixel)
    return np.asarray([index[spec_key(r)] for r in router.routes])[ids], scorer_cpu


def route_rows(
    ev: PlanEvaluator, measurements: list[RouteMeasurement], encode_image_seconds: float
) -> list[dict[str, Any]]:
    """Every measured route alone on every image: cost, speed and quality."""
    n = ev.cos.shape[1]
    return [
        {
            "name": m.route.name,
            "route": m.route.model_dump(exclude_defaults=True),
            "ms_per_image": 1e3 * m.seconds_per_image,
            "speedup_vs_encode_image": encode_image_seconds / m.seconds_per_image,
            "gflops_per_image": float(m.gflops.mean()),
            **ev.measure(np.full(n, i), 1).to_dict(),
        }
        for i, m in enumerate(measurements)
    ]


def plan_rows(
    ev: PlanEvaluator,
    plans: dict[str, Plan | None],
    measurements: list[RouteMeasurement],
    encode_image_seconds: float,
    levels: np.ndarray,
) -> dict[str, dict[str, Any] | None]:
    """Each plan's quality, speed, share of images per route and per-level breakdown (None: no plan)."""
    return {
        name: None
        if plan is None
        else {
            "plan": plan.name,
            **plan.quality.to_dict(),
            "speedup_vs_encode_image": encode_image_seconds / plan.quality.seconds_per_image,
            "share": plan.share(measurements),
            "per_level": per_level(ev, plan, levels),
        }
        for name, plan in plans.items()
    }


def measure_headroom(
    encoder: RoutedEncoder,
    model_name: str,
    sample: CaptionedSample,
    target: QualityFloor,
    router: RouterConfig | None = None,
    timing_images: int = 512,
    batch_size: int = 64,
    rounds: int = 3,
    gallery_size: int | None = None,
    retime_rounds: int = 0,
) -> dict[str, Any]:
    """Measure every route of `encoder` on `sample`, then the best static route, the oracle and (if
    given) a router side by side. With `gallery_size`, each caption searches a random gallery of that many
    images (router_search.py); with `retime_rounds`, the plans' routes are timed again on the last
    `timing_images` (`retime_plans`)."""
    measurements = measure_routes(encoder, model_name, sample.images, batch_size, timing_images, rounds)
    full_m = next(m for m in measurements if spec_key(m.route) == FULL_KEY)
    encode_image_seconds = full_m.seconds_per_image * full_m.speedup["median"]
    text = embed_texts(encoder.loaded, sample.captions)
    assign, scorer_cpu = router_assignment(router, measurements, sample) if router else (None, 0.0)
    galleries = split_galleries(len(sample), gallery_size)
    full, keys = full_m.embeddings, sample.keys
    ev = PlanEvaluator(measurements, full, text, keys, scorer_cpu, target.confidence, galleries)
    found = find_headroom(ev, measurements, target)
    plans = {"best static route": found.static, "best in-ViT split": found.split, "oracle": found.oracle}
    if router is not None:
        plans["router"] = Plan("router", assign, ev.measure(assign, len(router.routes)))
    report: dict[str, Any] = {
        "split": sample.split,
        "images": len(sample),
        "galleries": 1 if galleries is None else int(galleries.max()) + 1,  # as calibration reports them
        "gallery_size": gallery_size,
        "target": vars(target),
        "encode_image_ms_per_image": 1e3 * encode_image_seconds,
        "routes": route_rows(ev, measurements, encode_image_seconds),
        "plans": plan_rows(ev, plans, measurements, encode_image_seconds, sample.complexity_level),
        "oracle_tau": found.oracle_tau,
        "oracle_gain_over_static": found.gain,
        "split_gain_over_static": found.split_gain,
        "oracle_gflops_gain_over_static": _gain(found.static, found.oracle, "gflops_per_image"),
        "split_gflops_gain_over_static": _gain(found.static, found.split, "gflops_per_image"),
    }
    if retime_rounds:
        others = sample.images[-max(1, min(timing_images, len(sample))) :]
        report["retimed"] = retime_plans(encoder, model_name, others, plans, ev, batch_size, retime_rounds)
    if router is not None:
        report["router"] = router.model_dump(exclude_defaults=True)
    return report


def _plans_table(report: dict[str, Any]) -> list[str]:
    """The plans side by side: speed, quality, the R@10 ratio with its bound, the routes they use."""
    lines = [
        "| plan | speedup vs encode_image | ms/img | t2i R@10 in gallery (full) | ratio (lower bound) "
        "| mean cos | share |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, p in report["plans"].items():
        if p is None:
            lines.append(f"| {name} | none meets the target | | | | | |")
            continue
        share = ", ".join(f"{k} {v:.0%}" for k, v in sorted(p["share"].items(), key=lambda kv: -kv[1])[:4])
        ratio, lower = p["t2i_R@10_in_gallery_ratio"], p["t2i_R@10_in_gallery_ratio_lower"]
        lower = "-" if lower is None else f"{lower:.3f}"
        lines.append(
            f"| {name} | {p['speedup_vs_encode_image']:.2f}x | {1e3 * p['seconds_per_image']:.3f} | "
            f"{p['t2i_R@10_in_gallery']:.4f} ({p['full_t2i_R@10_in_gallery']:.4f}) | {ratio:.4f} ({lower}) | "
            f"{p['mean_cosine']:.4f} | {share} |"
        )
    return lines


def _gains(report: dict[str, Any]) -> list[str]:
    """The split's and the oracle's gain over the best static route, as selected and as re-timed."""
    retimed = report.get("retimed") or {}
    lines = []
    for key, label in (("split", "Best in-ViT split"), ("oracle", "Oracle")):
        gain, flops = report.get(f"{key}_gain_over_static"), report.get(f"{key}_gflops_gain_over_static")
        text = f"{label} over best static route: " + (
            f"{gain:.3f}x in the timing the plans were picked on" if gain else "n/a"
        )
        text += f", {flops:.3f}x in GFLOPs" if flops else ""
        again = retimed.get(f"{key}_gain_over_static")
        if again:
            text += (
                f", {again['median']:.3f}x ({again['min']:.3f}-{again['max']:.3f}) in {retimed['rounds']} "
                f"fresh rounds on the sample's last {retimed['images']} scenes"
            )
        lines += ["", text]
    if retimed:
        lines += ["", "| plan | re-timed speedup vs encode_image | ms/img |", "|---|---|---|"]
        for name, p in retimed["plans"].items():
            x = p["speedup_vs_encode_image"]
            lines.append(
                f"| {name} | {x['median']:.2f}x ({x['min']:.2f}-{x['max']:.2f}) | {p['ms_per_image']:.3f} |"
            )
    return lines


def _levels_table(report: dict[str, Any]) -> list[str]:
    lines = [
        "| plan | level | images | ms/img | mean cos | t2i R@10 in gallery (full) |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in report["plans"].items():
        for level, q in (p or {}).get("per_level", {}).items():
            lines.append(
                f"| {name} | {level} | {q['images']} | {q['ms_per_image']:.3f} | {q['mean_cosine']:.4f} | "
                f"{q['t2i_R@10_in_gallery']:.4f} ({q['full_t2i_R@10_in_gallery']:.4f}) |"
            )
    return lines


def headroom_markdown(report: dict[str, Any]) -> str:
    """The plans side by side, their gains over the best static route, then per complexity level."""
    galleries = report.get("galleries", 1)
    searched = f" in {galleries} galleries of {report['gallery_size']}" if galleries > 1 else ""
    target = report["target"]
    head = [
        f"Split `{report['split']}`, {report['images']} scenes{searched}; target: mean cosine to full depth "
        f">= {target['min_cosine']}, t->i R@10 >= {target['min_recall_ratio']} x full "
        f"(the R@10 ratio's lower prediction bound at {target['confidence']:.0%} shown beside it).",
        "",
    ]
    return "\n".join([*head, *_plans_table(report), *_gains(report), "", *_levels_table(report)]) + "\n"


def plot(report: dict[str, Any], path: Path, title: str) -> None:
    """Every measured route (speedup vs encode_image, R@10 ratio to full depth) with the best static
    route, the best in-ViT split, the oracle and the router marked, and the quality floor drawn."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    routes = report["routes"]
    speedups = [r["speedup_vs_encode_image"] for r in routes]
    ax.scatter(speedups, [r["t2i_R@10_in_gallery_ratio"] for r in routes], s=14, c="grey")
    plans = (("best static route", "s"), ("best in-ViT split", "^"), ("oracle", "*"), ("router", "D"))
    for name, marker in plans:
        plan = report["plans"].get(name)
        if plan:
            xy = plan["speedup_vs_encode_image"], plan["t2i_R@10_in_gallery_ratio"]
            ax.scatter(*xy, marker=marker, s=120, label=name)
    ax.axhline(report["target"]["min_recall_ratio"], ls="--", lw=0.8, c="k")
    ax.set(
        xlabel="speedup vs open_clip encode_image (measured)",
        ylabel="t->i R@10 in gallery / full depth",
        ylim=(0.8, 1.02),
    )
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{title}: catalogue routes (grey) and plans")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split", default=TEST, help="scene stream (default: test, the reporting split)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--timing-images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--retime-rounds",
        type=int,
        default=15,
        help="time the plans' routes again in this many fresh rounds on the last --timing-images scenes "
        "(0: skip): the gains the selection's own timing could not flatter",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--exits", type=int, nargs="*", help="exit depths (default: every depth of the heads)"
    )
    parser.add_argument("--config", help="config with the model and router (default: embedded, shipped)")
    parser.add_argument(
        "--gallery-size", type=int, help="each caption searches a random gallery of this many scenes"
    )
    parser.add_argument("--cache-dir", help="where rendered scene sets are cached")
    parser.add_argument("--out", default="results/headroom")
    return parser


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    probe = RoutedEncoder.from_config(cfg.model, cfg.router.routes)
    heads = probe.vit.heads
    exits = (heads.depths if heads is not None else []) if args.exits is None else args.exits
    routes = unique([*calibration_routes(exits, heads), *cfg.router.routes])
    encoder = RoutedEncoder(probe.loaded, routes, heads)
    sample = load_heldout(args.split, args.images, probe.loaded.image_size, cache_dir=args.cache_dir)
    report = measure_headroom(
        encoder, cfg.model.name, sample, QualityFloor(), cfg.router, args.timing_images, args.batch_size,
        args.rounds, args.gallery_size, args.retime_rounds,
    )  # fmt: skip
    report["args"] = vars(args)
    sized = "" if args.images == parser.get_default("images") else f"-{args.images}"
    out = output_path(Path(args.out) / f"headroom-{args.split}{sized}.json")
    out.write_text(json.dumps(report, indent=2, default=float))
    markdown = headroom_markdown(report)
    out.with_suffix(".md").write_text(markdown)
    plot(report, out.with_suffix(".png"), f"{cfg.model.name} on {args.split}")
    print(markdown)


if __name__ == "__main__":
    main()
