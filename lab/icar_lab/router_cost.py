"""What routing adds to each image: the complexity features plus the scorer, in CPU seconds per image.

One definition for calibration (charged to every plan with more than one route), the headroom study and
the bench's router section. CPU time, not wall time: the router runs on the decode workers beside the
encoder, so its cost is the share of the cores it takes from the job; and on a shared machine another
process's load stretches a call's wall time but not the CPU time the call itself spends.
"""

from __future__ import annotations

import numpy as np

from icar_lab.timing import best_cpu_seconds
from pipeline.score import Scorer, complexity_features


def router_seconds(
    scorer: Scorer, images: np.ndarray, bytes_per_pixel: np.ndarray, batch_size: int = 256, repeats: int = 3
) -> float:
    """Best of `repeats` CPU seconds per image of features + score over `images`, in batches of
    `batch_size` as the job's prepare stage scores them, after one warm-up pass."""
    chunks = [
        (images[i : i + batch_size], bytes_per_pixel[i : i + batch_size])
        for i in range(0, len(images), batch_size)
    ]

    def route() -> None:
        for pixels, bpp in chunks:
            scorer(complexity_features(pixels, bpp))

    route()
    return best_cpu_seconds(route, len(images), repeats)
