"""Calibration: measure every candidate route on a captioned sample, then pick the router that meets a
quality floor at the lowest measured cost (or, given a compute budget, the most faithful one within it).

For each route we keep each image's embedding, GFLOPs and the route's measured seconds per image (one
dense batch per route, as the encoder actor runs it). A router is a ladder of routes plus ascending score
thresholds; for a given scorer we search ladders and threshold quantiles for the cheapest assignment whose
mean cosine to full depth and text->image R@10 stay above the floor (or for the highest mean cosine within
the GFLOPs budget). Because every candidate assignment
only gathers precomputed similarities, the search costs seconds.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.config import RouteSpec
from pipeline.encode.routed import RoutedEncoder
from pipeline.lab.metrics import recall_at_k
from pipeline.lab.timing import alternate


@dataclass
class RouteMeasurement:
    route: RouteSpec
    embeddings: torch.Tensor  # [N, D]
    gflops: np.ndarray  # [N]
    seconds_per_image: float


@dataclass
class QualityFloor:
    """Both must hold. R@10 is what users feel but moves in steps of 1/queries; the mean cosine to full
    depth is the steady proxy: on the embedded model's held-out set, routes at cosine >= 0.985 kept R@10
    within 1% of full depth and routes below 0.985 mostly did not (results/calibration.json)."""

    min_cosine: float = 0.985  # mean cosine of routed embeddings to full-depth ones
    min_recall_ratio: float = 0.99  # routed text->image R@10 / full-depth R@10

    def admits(self, cosine: float, recall_ratio: float, gflops: float) -> bool:
        return cosine >= self.min_cosine and recall_ratio >= self.min_recall_ratio

    def cost(self, cosine: float, seconds: float) -> float:
        """Lower is better: among plans meeting the floor, the fastest."""
        return seconds


@dataclass
class ComputeBudget:
    """The other calibration target: the best quality (mean cosine to full depth) within a GFLOPs budget
    per image. GFLOPs, not seconds, so a budget set on one machine means the same on another."""

    max_gflops: float

    def admits(self, cosine: float, recall_ratio: float, gflops: float) -> bool:
        return gflops <= self.max_gflops

    def cost(self, cosine: float, seconds: float) -> float:
        """Lower is better: among plans within budget, the closest to full depth."""
        return -cosine


Target = QualityFloor | ComputeBudget


@dataclass
class RouterPlan:
    routes: list[RouteSpec]
    thresholds: list[float]
    mean_cosine: float
    recall_at_10: float
    seconds_per_image: float
    gflops_per_image: float
    share: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "routes": [r.model_dump(exclude_defaults=True) for r in self.routes],
            "thresholds": self.thresholds,
            "mean_cosine": self.mean_cosine,
            "t2i_R@10": self.recall_at_10,
            "seconds_per_image": self.seconds_per_image,
            "gflops_per_image": self.gflops_per_image,
            "share": self.share,
        }


# Front-loaded ToMe schedules (fraction kept per block, token floor): the candidates worth measuring on
# the embedded model; a constant r collapses the last blocks to 2-3 tokens, these stop at the floor.
MERGE_SCHEDULES: tuple[tuple[float, int], ...] = tuple(
    (keep, floor) for keep in (0.65, 0.7, 0.75, 0.8) for floor in (8, 16)
)


def schedule_route(name: str, keep: float, floor: int, exit_depth: int | None = None) -> RouteSpec:
    """ToMe keeping `keep` of the tokens per block down to `floor`, named `<name>-keep70-floor16`."""
    return RouteSpec(
        name=f"{name}-keep{round(keep * 100)}-floor{floor}",
        exit_depth=exit_depth,
        merge="tome",
        merge_keep=keep,
        merge_floor=floor,
    )


def candidate_routes(depth: int, exits: list[int]) -> list[RouteSpec]:
    """Exits x token paths: plain, constant-r ToMe, front-loaded ToMe schedules, energy-budget pruning."""
    routes = []
    for d in [*exits, depth]:
        tag = "full" if d == depth else f"d{d}"
        exit_depth = None if d == depth else d
        routes.append(RouteSpec(name=tag, exit_depth=exit_depth))
        for r in (4, 6, 8):
            routes.append(RouteSpec(name=f"{tag}-tome{r}", exit_depth=exit_depth, merge="tome", merge_r=r))
        routes += [schedule_route(tag, keep, floor, exit_depth) for keep, floor in MERGE_SCHEDULES]
        for tau in (0.99,):  # block-2 token features are low-rank: tau 0.9 keeps ~6 of 64 tokens
            name = f"{tag}-energy{tau * 100:g}"
            routes.append(RouteSpec(name=name, exit_depth=exit_depth, energy_tau=tau, prune_after=2))
    return routes


def measure_routes(
    encoder: RoutedEncoder,
    images: np.ndarray,
    routes: list[RouteSpec],
    batch_size: int = 64,
    timing_images: int = 512,
    rounds: int = 3,
) -> list[RouteMeasurement]:
    """Embed all images on every route, then time each route's dense batches on the first
    `timing_images`, routes alternating round by round so machine noise hits them alike."""
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    embedded = []
    for i in range(len(routes)):
        results = [encoder.encode(b, np.full(len(b), i, np.int32)) for b in batches]
        embedded.append(
            (
                torch.from_numpy(np.concatenate([r.vectors for r in results])),
                np.concatenate([r.gflops for r in results]),
            )
        )
    timed = batches[: max(1, -(-min(timing_images, len(images)) // batch_size))]
    n_timed = sum(len(b) for b in timed)
    calls = {
        str(i): lambda i=i: [encoder.encode(b, np.full(len(b), i, np.int32)) for b in timed]
        for i in range(len(routes))
    }
    seconds = alternate(calls, rounds)
    return [
        RouteMeasurement(route, emb, gflops, statistics.median(seconds[str(i)]) / n_timed)
        for i, (route, (emb, gflops)) in enumerate(zip(routes, embedded, strict=True))
    ]


class _Evaluator:
    """Scores an assignment (image -> route) using precomputed text-image similarities per route."""

    def __init__(
        self,
        measurements: list[RouteMeasurement],
        full: torch.Tensor,
        text: torch.Tensor,
        keys: list[str],
        router_seconds: float = 0.0,
    ):
        self.m = measurements
        self.router_seconds = router_seconds  # the scorer's CPU time, paid only by multi-route plans
        self.sims = torch.stack([text @ m.embeddings.T for m in measurements])  # [R, Q, N]
        self.cos = torch.stack([(m.embeddings * full).sum(-1) for m in measurements])  # [R, N]
        _, inverse = np.unique(np.asarray(keys), return_inverse=True)
        key_ids = torch.from_numpy(inverse)
        self.hit = key_ids[None, :] == key_ids[:, None]  # [Q, N]
        self.seconds = np.array([m.seconds_per_image for m in measurements])
        self.gflops = np.stack([m.gflops for m in measurements])  # [R, N]
        self.full_recall = recall_at_k(text, full, keys, keys, (10,))[10]

    def quality(self, assign: np.ndarray) -> tuple[float, float]:
        idx = torch.from_numpy(assign)
        n = len(assign)
        sims = self.sims[idx, :, torch.arange(n)].T  # [Q, N]: column j from image j's route
        top = sims.topk(10, dim=1).indices
        recall = float(self.hit.gather(1, top).any(dim=1).float().mean())
        cosine = float(self.cos[idx, torch.arange(n)].mean())
        return cosine, recall

    def cost(self, assign: np.ndarray, routes_in_plan: int) -> tuple[float, float]:
        seconds = float(self.seconds[assign].mean()) + (self.router_seconds if routes_in_plan > 1 else 0.0)
        gflops = float(self.gflops[assign, np.arange(len(assign))].mean())
        return seconds, gflops


def pareto_routes(ev: _Evaluator) -> np.ndarray:
    """Route indices by ascending cost, minus any route slower and worse (mean cosine) than another."""
    mean_cos = ev.cos.mean(dim=1).numpy()
    order = np.argsort(ev.seconds)
    kept, best_cos = [], -np.inf
    for i in order:
        if mean_cos[i] > best_cos:
            kept.append(int(i))
            best_cos = mean_cos[i]
    return np.asarray(kept)


def search_router(
    scores: np.ndarray,
    measurements: list[RouteMeasurement],
    full: torch.Tensor,
    text: torch.Tensor,
    keys: list[str],
    target: Target,
    max_routes: int = 3,
    quantiles: int = 10,
    router_seconds: float = 0.0,
) -> RouterPlan | None:
    """The best (ladder, thresholds) on this sample for `target` (the fastest meeting a quality floor, or
    the most faithful within a compute budget), or None if no plan is admissible.

    A ladder of two or more routes pays `router_seconds` per image (the scorer's own CPU time), so
    routing is chosen only where it saves more than it costs; a single route needs no scorer."""
    ev = _Evaluator(measurements, full, text, keys, router_seconds)
    order = pareto_routes(ev)  # ladders go from cheaper to dearer routes, none dominated
    grid = np.quantile(scores, np.linspace(0, 1, quantiles + 1)[1:-1])
    best: RouterPlan | None = None
    best_cost = float("inf")
    for size in range(1, max_routes + 1):
        for ladder in itertools.combinations(order.tolist(), size):
            for cut in itertools.combinations(grid.tolist(), size - 1):
                bucket = np.searchsorted(np.asarray(cut), scores, side="right")
                assign = np.asarray(ladder)[bucket]
                seconds, gflops = ev.cost(assign, size)
                if isinstance(target, QualityFloor) and seconds >= best_cost:
                    continue  # cannot win: skip the (dearer) quality evaluation
                cosine, recall = ev.quality(assign)
                cost = target.cost(cosine, seconds)
                if cost >= best_cost or not target.admits(cosine, recall / ev.full_recall, gflops):
                    continue
                best_cost = cost
                share = [float((bucket == j).mean()) for j in range(size)]
                best = RouterPlan(
                    [measurements[r].route for r in ladder],
                    [float(c) for c in cut],
                    cosine,
                    recall,
                    seconds,
                    gflops,
                    share,
                )
    return best


def apply_plan(
    plan: RouterPlan,
    scores: np.ndarray,
    measurements: list[RouteMeasurement],
    full: torch.Tensor,
    text: torch.Tensor,
    keys: list[str],
    router_seconds: float = 0.0,
) -> dict[str, float]:
    """Quality and cost (the scorer's CPU time included) of a router on a sample it was not fitted on
    (the honest estimate)."""
    ev = _Evaluator(measurements, full, text, keys, router_seconds)
    index = {m.route.name: i for i, m in enumerate(measurements)}
    ladder = np.asarray([index[r.name] for r in plan.routes])
    assign = ladder[np.searchsorted(np.asarray(plan.thresholds), scores, side="right")]
    cosine, recall = ev.quality(assign)
    seconds, gflops = ev.cost(assign, len(plan.routes))
    return {
        "mean_cosine": cosine,
        "t2i_R@10": recall,
        "full_R@10": ev.full_recall,
        "seconds_per_image": seconds,
        "gflops_per_image": gflops,
    }


def subset(measurements: list[RouteMeasurement], rows: np.ndarray) -> list[RouteMeasurement]:
    return [
        RouteMeasurement(m.route, m.embeddings[rows], m.gflops[rows], m.seconds_per_image)
        for m in measurements
    ]


def cheapest_route_labels(measurements: list[RouteMeasurement], full: torch.Tensor, min_cosine: float):
    """Per image, the rank (by measured cost) of the cheapest route keeping cos-to-full >= min_cosine:
    the self-supervised target of the learned router."""
    order = np.argsort([m.seconds_per_image for m in measurements])
    cos = np.stack([(measurements[i].embeddings * full).sum(-1).numpy() for i in order])  # [R, N] by cost
    ok = cos >= min_cosine
    ok[-1] |= ~ok.any(axis=0)  # no route is good enough: the dearest one
    return ok.argmax(axis=0).astype(np.float32)
