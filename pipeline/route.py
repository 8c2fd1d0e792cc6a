"""Stage 3: complexity score -> route (exit depth, token budget), by ascending thresholds."""

from __future__ import annotations

import numpy as np

from pipeline.config import RouterConfig


def assign_routes(scores: np.ndarray, router: RouterConfig) -> np.ndarray:
    """Route index per image: score < thresholds[0] -> routes[0], …, score >= thresholds[-1] -> routes[-1]."""
    return np.searchsorted(np.asarray(router.thresholds, np.float32), scores, side="right").astype(np.int32)
