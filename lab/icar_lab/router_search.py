"""Given every candidate route measured on a captioned sample, the best router for a target: the fastest
meeting a quality floor, or the most faithful within a GFLOPs budget.

A router is a ladder of routes plus ascending score thresholds. For a given scorer we search ladders and
threshold quantiles; every candidate assignment goes through the runtime's own `assign_routes` and only
gathers precomputed similarities, so the search encodes nothing and assigns exactly as the job will. It
tries thousands of plans, so the cheapest that passes on a sample tends to be one the sample flatters.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from icar_lab.catalogue import spec_key
from icar_lab.metrics import K, hits_at_k, relevance
from icar_lab.targets import QualityFloor, Target
from pipeline.config import RouterConfig, RouteSpec
from pipeline.route import assign_routes

BOOTSTRAP_RESAMPLES = 400  # resamples of the queries for the R@10 ratio's lower bound
NEW_SAMPLE_WIDTH = 2**0.5  # a new sample's ratio differs from this one's by both samples' noise


@dataclass
class RouteMeasurement:
    """One route on the sample: every image's embedding and GFLOPs, and its measured cost."""

    route: RouteSpec
    embeddings: torch.Tensor  # [N, D]
    gflops: np.ndarray  # [N]
    seconds_per_image: float
    speedup: dict[str, float] | None = None  # vs encode_image, same-round ratios (for the report)


@dataclass(frozen=True)
class PlanQuality:
    """What an assignment of images to routes gives on a sample, and what it costs. Recall is text->image
    R@10 with each caption searching its own gallery (`t2i_R@10_in_gallery`)."""

    mean_cosine: float
    recall_at_10: float
    full_recall_at_10: float
    seconds_per_image: float  # the scorer's CPU time included for multi-route plans
    gflops_per_image: float
    recall_ratio_lower: float | None = None  # lower prediction bound (QualityFloor.confidence)

    @property
    def recall_ratio(self) -> float:
        """Routed R@10 / full-depth R@10 (1 when full depth finds nothing either)."""
        if self.full_recall_at_10 == 0:
            return 1.0 if self.recall_at_10 == 0 else float("inf")
        return self.recall_at_10 / self.full_recall_at_10

    def cost(self, target: Target) -> float:
        """What `target` minimises: seconds per image for a quality floor, distance from full depth for a
        compute budget."""
        return target.cost(self.mean_cosine, self.seconds_per_image)

    def meets(self, target: Target) -> bool:
        """The target holds; a quality floor with a confidence level judges R@10 by its lower bound."""
        ratio = self.recall_ratio
        if confidence(target) and self.recall_ratio_lower is not None:
            ratio = self.recall_ratio_lower
        return target.admits(self.mean_cosine, ratio, self.gflops_per_image)

    def to_dict(self) -> dict[str, float]:
        """R@10 here is `t2i_R@10_in_gallery`: each caption searches its own gallery (metrics.py)."""
        return {
            "mean_cosine": self.mean_cosine,
            "t2i_R@10_in_gallery": self.recall_at_10,
            "full_t2i_R@10_in_gallery": self.full_recall_at_10,
            "t2i_R@10_in_gallery_ratio": self.recall_ratio,
            "t2i_R@10_in_gallery_ratio_lower": self.recall_ratio_lower,
            "seconds_per_image": self.seconds_per_image,
            "gflops_per_image": self.gflops_per_image,
        }


@dataclass
class RouterPlan:
    routes: list[RouteSpec]
    thresholds: list[float]
    quality: PlanQuality  # on the sample it was searched on
    share: list[float] = field(default_factory=list)  # fraction of that sample per route

    def router(self, scorer: str = "handcrafted") -> RouterConfig:
        return RouterConfig(scorer=scorer, thresholds=self.thresholds, routes=self.routes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "routes": [r.model_dump(exclude_defaults=True) for r in self.routes],
            "thresholds": self.thresholds,
            "share": self.share,
            **self.quality.to_dict(),
        }


def ratio_lower_bound(
    hits: torch.Tensor,
    full_hits: torch.Tensor,
    confidence: float,
    clusters: torch.Tensor | None = None,
    seed: int = 0,
) -> float:
    """One-sided lower prediction bound of mean(hits) / mean(full_hits): the ratio a new sample of the
    same size would still show, at `confidence`.

    Paired bootstrap over queries: each resample takes the same queries for both, so the spread reflects
    how much the plan's misses (not the queries' difficulty) move between samples. That spread bounds this
    sample's ratio; a new sample (the test split, a user's data) adds its own noise of the same size, so
    the bound sits sqrt(2) times the spread below the point estimate. Checked out of sample by
    lab/studies/bound_coverage.py (each stream halved by scene key 30 times, 29 routes): the other half's
    ratio stays at or above this 95% bound in 87-92% of cases on calib, test and their bimodal mixes,
    above the unwidened bound in 82-84%. Still short of 95%: the bootstrap keeps the gallery fixed, and a
    new gallery brings distractors of its own (resampling it too overshoots: see the README).
    `clusters` ([Q] ids, e.g. scene keys) resamples whole groups: queries sharing a caption hit or miss
    together, so counting them as independent draws would make the bound too tight where captions repeat."""
    if clusters is None:
        clusters = torch.arange(len(hits))
    ids, groups = torch.unique(clusters, return_inverse=True)
    per_group = torch.zeros(len(ids), 2).index_add_(0, groups, torch.stack([hits, full_hits], 1).float())
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(ids), (BOOTSTRAP_RESAMPLES, len(ids)), generator=gen)
    drawn = per_group[idx].sum(dim=1)  # [resamples, 2]
    ratios = drawn[:, 0] / drawn[:, 1].clamp_min(1e-9)
    total = per_group.sum(dim=0)
    point = float(total[0] / total[1].clamp_min(1e-9))
    return point - NEW_SAMPLE_WIDTH * (point - float(torch.quantile(ratios, 1 - confidence)))


class PlanEvaluator:
    """Scores an assignment (image -> route) using precomputed text-image similarities per route.

    Queries that share a caption and a key (repeated captions: most of a sample of simple scenes) rank the
    gallery identically, so each distinct one is ranked once and its hit counted for all of its copies.

    `galleries` ([N] ids, default one gallery) splits the sample into separate retrieval problems: each
    row's caption searches only the images of its own gallery. R@10 falls as a gallery grows (more
    distractors), so a claim about galleries of 2,000 images is judged on galleries of 2,000; a larger
    sample cut into such galleries brings more queries, and the bound's margin shrinks with their square
    root."""

    def __init__(
        self,
        measurements: list[RouteMeasurement],
        full: torch.Tensor,
        text: torch.Tensor,
        keys: list[str],
        router_seconds: float = 0.0,
        confidence: float = 0.0,
        galleries: np.ndarray | None = None,
    ):
        self.router_seconds = router_seconds  # the scorer's CPU time, paid only by multi-route plans
        self.confidence = confidence  # > 0: also compute the R@10 ratio's lower bound at this level
        _, inverse = np.unique(np.asarray(keys), return_inverse=True)
        key_ids = torch.from_numpy(inverse)
        self.key_ids = key_ids  # queries sharing a key (one caption) resample together in the bound
        gallery = _gallery_ids(galleries, len(text))
        _, text_ids = torch.unique(text, dim=0, return_inverse=True)
        pairs = (gallery * len(text) + key_ids) * len(text) + text_ids
        _, self.copies = torch.unique(pairs, return_inverse=True)  # [Q]: query -> its distinct query
        rows = torch.empty(int(self.copies.max()) + 1, dtype=torch.long).scatter_(
            0, self.copies, torch.arange(len(text))
        )  # one row per distinct query: its copies are equal, so any serves
        distinct = text[rows]
        self.sims = torch.stack([distinct @ m.embeddings.T for m in measurements])  # [R, U, N]
        self.cos = torch.stack([(m.embeddings * full).sum(-1) for m in measurements])  # [R, N]
        self.hit, self.outside = relevance(key_ids[rows], key_ids, gallery[rows], gallery)  # [U, N] each
        self.seconds = np.array([m.seconds_per_image for m in measurements])
        self.gflops = np.stack([m.gflops for m in measurements])  # [R, N]
        self.full_hits = self._ranked_hits(distinct @ full.T)[self.copies]  # [Q]
        self.full_recall = float(self.full_hits.float().mean())

    def _ranked_hits(self, sims: torch.Tensor) -> torch.Tensor:
        """[U] bool: each distinct query finds a same-key image of its gallery in its top K of `sims`."""
        return hits_at_k(sims, self.hit, K, self.outside).any(dim=1)

    def hits(self, assign: np.ndarray) -> torch.Tensor:
        """[Q] bool: text query q finds a same-key image in its top K when image j is on route assign[j]."""
        idx = torch.from_numpy(assign)
        sims = self.sims[idx, :, torch.arange(len(assign))].T  # [U, N]: column j from image j's route
        return self._ranked_hits(sims)[self.copies]

    def cost(self, assign: np.ndarray, routes_in_plan: int) -> tuple[float, float]:
        seconds = float(self.seconds[assign].mean()) + (self.router_seconds if routes_in_plan > 1 else 0.0)
        gflops = float(self.gflops[assign, np.arange(len(assign))].mean())
        return seconds, gflops

    def measure(self, assign: np.ndarray, routes_in_plan: int, bound: bool = True) -> PlanQuality:
        """Quality and cost; with `bound` (and a confidence level) also the R@10 ratio's lower bound."""
        hits = self.hits(assign)
        cosine = float(self.cos[torch.from_numpy(assign), torch.arange(len(assign))].mean())
        seconds, gflops = self.cost(assign, routes_in_plan)
        wanted = bound and self.confidence
        lower = ratio_lower_bound(hits, self.full_hits, self.confidence, self.key_ids) if wanted else None
        return PlanQuality(cosine, float(hits.float().mean()), self.full_recall, seconds, gflops, lower)


def _gallery_ids(galleries: np.ndarray | None, n: int) -> torch.Tensor:
    """[N] long gallery index per row (all 0 without `galleries`); every gallery must hold K images."""
    if galleries is None:
        return torch.zeros(n, dtype=torch.long)
    if len(galleries) != n:
        raise ValueError(f"{len(galleries)} gallery ids for {n} rows")
    _, inverse, counts = np.unique(np.asarray(galleries), return_inverse=True, return_counts=True)
    if counts.min() < K:
        raise ValueError(f"a gallery of {counts.min()} images: R@{K} needs at least {K} per gallery")
    return torch.from_numpy(inverse.astype(np.int64))


def split_galleries(n: int, size: int | None, seed: int = 0) -> np.ndarray | None:
    """Gallery ids cutting `n` rows at random into n // size galleries of (nearly) `size` rows; None (one
    gallery) when `size` is None or covers the sample."""
    if size is None or size >= n:
        return None
    if size < K:
        raise ValueError(f"gallery size {size}: R@{K} needs at least {K} images per gallery")
    return np.random.default_rng(seed).permutation(n) % (n // size)


def confidence(target: Target) -> float:
    """The confidence level a target judges R@10 at (0: the point estimate)."""
    return target.confidence if isinstance(target, QualityFloor) else 0.0


def pareto_routes(measurements: list[RouteMeasurement], full: torch.Tensor, target: Target) -> list[int]:
    """Route indices by ascending cost under `target`, minus any route dearer and worse (mean cosine to
    full depth) than another: the rungs ladders are built from (a heuristic: mean cosine does not decide
    the R@10 bound, but the combinations of every route are too many to search)."""
    spend = [target.spend(m.seconds_per_image, float(m.gflops.mean())) for m in measurements]
    mean_cos = [float((m.embeddings * full).sum(-1).mean()) for m in measurements]
    kept, best_cos = [], -np.inf
    for i in np.argsort(spend, kind="stable"):
        if mean_cos[i] > best_cos:
            kept.append(int(i))
            best_cos = mean_cos[i]
    return kept


def _admissible(
    ev: PlanEvaluator, assign: np.ndarray, routes_in_plan: int, target: Target, best_cost: float
) -> PlanQuality | None:
    """The quality of `assign` if it meets `target` and costs less than `best_cost`, else None. The point
    estimate is checked first: the bound sits below it and costs a bootstrap."""
    seconds, _ = ev.cost(assign, routes_in_plan)
    if isinstance(target, QualityFloor) and seconds >= best_cost:
        return None  # cannot win: skip the (dearer) quality evaluation
    quality = ev.measure(assign, routes_in_plan, bound=False)
    if quality.cost(target) >= best_cost or not quality.meets(target):
        return None
    if ev.confidence:
        quality = ev.measure(assign, routes_in_plan)
        if not quality.meets(target):
            return None
    return quality


def route_qualities(
    measurements: list[RouteMeasurement],
    full: torch.Tensor,
    text: torch.Tensor,
    keys: list[str],
    target: Target,
    galleries: np.ndarray | None = None,
) -> list[PlanQuality]:
    """Each route alone on every image: its quality, cost and (at `target`'s confidence) the R@10 ratio's
    lower bound. One evaluator per route, so this never holds every route's [queries x images]
    similarities."""
    assign = np.zeros(len(full), dtype=np.int64)
    level = confidence(target)
    return [
        PlanEvaluator([m], full, text, keys, 0.0, level, galleries).measure(assign, 1) for m in measurements
    ]


def cheapest_admissible(
    measurements: list[RouteMeasurement], qualities: list[PlanQuality], target: Target
) -> RouterPlan | None:
    """The route (of `route_qualities`) that meets `target` at the lowest cost, the earliest on a tie; None
    if no route meets it."""
    admissible = [(q.cost(target), i) for i, q in enumerate(qualities) if q.meets(target)]
    if not admissible:
        return None
    i = min(admissible)[1]
    return RouterPlan([measurements[i].route], [], qualities[i], [1.0])


def best_single_route(
    measurements: list[RouteMeasurement],
    full: torch.Tensor,
    text: torch.Tensor,
    keys: list[str],
    target: Target,
    galleries: np.ndarray | None = None,
) -> RouterPlan | None:
    """The best route for `target` on its own (no scorer, no thresholds), or None if none is admissible."""
    qualities = route_qualities(measurements, full, text, keys, target, galleries)
    return cheapest_admissible(measurements, qualities, target)


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
    galleries: np.ndarray | None = None,
) -> RouterPlan | None:
    """The best (ladder, thresholds) on this sample for `target`, or None if no plan is admissible.

    Every route alone is a candidate (`best_single_route`). Ladders of two or more routes are built from
    the cost/cosine front only (`pareto_routes`: the combinations of all routes are too many); a ladder
    pays `router_seconds` per image (the scorer's own CPU time), so routing is chosen only where it saves
    more than it costs. The front must not decide single routes: a route dearer and lower in mean cosine
    than another can still be the one whose R@10 bound holds (fewer queries flip), and dropping it would
    let a dearer ladder win."""
    best = best_single_route(measurements, full, text, keys, target, galleries)
    best_cost = best.quality.cost(target) if best else float("inf")
    grid = np.unique(np.quantile(scores, np.linspace(0, 1, quantiles + 1)[1:-1]))
    kept = [measurements[i] for i in pareto_routes(measurements, full, target)]
    ev = PlanEvaluator(kept, full, text, keys, router_seconds, confidence(target), galleries)
    for size in range(2, max_routes + 1):
        for ladder in itertools.combinations(range(len(kept)), size):
            routes = [kept[i].route for i in ladder]
            for cut in itertools.combinations(grid.tolist(), size - 1):
                bucket = assign_routes(scores, RouterConfig(thresholds=list(cut), routes=routes))
                quality = _admissible(ev, np.asarray(ladder)[bucket], size, target, best_cost)
                if quality is None:
                    continue
                share = [float((bucket == j).mean()) for j in range(size)]
                best = RouterPlan(routes, [float(c) for c in cut], quality, share)
                best_cost = quality.cost(target)
    return best


def apply_plan(
    plan: RouterPlan,
    scores: np.ndarray,
    measurements: list[RouteMeasurement],
    full: torch.Tensor,
    text: torch.Tensor,
    keys: list[str],
    router_seconds: float = 0.0,
    confidence_level: float = QualityFloor.confidence,
    galleries: np.ndarray | None = None,
) -> PlanQuality:
    """Quality and cost (the scorer's CPU time included) of a router on a sample it was not fitted on
    (the honest estimate), with the R@10 ratio's lower bound at `confidence_level`."""
    by_key = {spec_key(m.route): m for m in measurements}
    routes = [by_key[spec_key(r)] for r in plan.routes]
    ev = PlanEvaluator(routes, full, text, keys, router_seconds, confidence_level, galleries)
    return ev.measure(assign_routes(scores, plan.router()), len(plan.routes))


def subset(measurements: list[RouteMeasurement], rows: np.ndarray) -> list[RouteMeasurement]:
    """The same measurements restricted to some images (a route's cost per image does not change)."""
    return [
        RouteMeasurement(m.route, m.embeddings[rows], m.gflops[rows], m.seconds_per_image, m.speedup)
        for m in measurements
    ]
