"""What calibration optimises: a quality floor (the fastest router meeting it) or a compute budget (the
most faithful router within it). Plain data, cheap to import, so the CLI can show the defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class QualityFloor:
    """Both must hold. R@10 is what users feel but moves in steps of 1/queries; the mean cosine to full
    depth is the steady proxy: on the embedded model's held-out set, routes at cosine >= 0.985 keep R@10
    within 1% of full depth and routes below 0.985 mostly do not (results/calibration.json)."""

    min_cosine: float = 0.985  # mean cosine of routed embeddings to full-depth ones
    min_recall_ratio: float = 0.99  # routed text->image R@10 / full-depth R@10
    # R@10 ratio judged by its one-sided lower prediction bound (paired bootstrap over the sample's
    # captions, widened for a new sample's own noise: router_search.ratio_lower_bound), so a plan that only
    # just passes on the calibration sample is not chosen: on fresh scenes the point estimate of such a
    # plan falls below the floor (issue 10). 0 = the point estimate.
    confidence: float = 0.95

    def admits(self, cosine: float, recall_ratio: float, gflops: float) -> bool:
        return cosine >= self.min_cosine and recall_ratio >= self.min_recall_ratio

    def cost(self, cosine: float, seconds: float) -> float:
        """Lower is better: among plans meeting the floor, the fastest."""
        return seconds

    def spend(self, seconds: float, gflops: float) -> float:
        """What a route costs under this target (ladders climb from cheaper to dearer routes)."""
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

    def spend(self, seconds: float, gflops: float) -> float:
        return gflops


Target = QualityFloor | ComputeBudget
