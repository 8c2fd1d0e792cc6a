"""Router cost next to the encoder's, both in CPU seconds per image (router_cost.py says why CPU time)."""

from __future__ import annotations

from typing import Any

import numpy as np

from icar_lab.router_cost import router_seconds
from icar_lab.timing import best_cpu_seconds
from pipeline.encode.routed import RoutedEncoder
from pipeline.score import Scorer


def measure_router(
    images: np.ndarray,
    bytes_per_pixel: np.ndarray,
    scorer: Scorer,
    encoder: RoutedEncoder,
    route_ids: np.ndarray,
    batch_size: int = 256,
    repeats: int = 3,
) -> dict[str, Any]:
    """`encoder` with `route_ids` is what the router feeds; both see the same images and batches."""
    n = len(images)

    def embed() -> None:
        for i in range(0, n, batch_size):
            encoder.encode(images[i : i + batch_size], route_ids[i : i + batch_size])

    router_cpu = router_seconds(scorer, images, bytes_per_pixel, batch_size, repeats)
    embed()  # warm-up
    encoder_cpu = best_cpu_seconds(embed, n, repeats)
    return {
        "images": n,
        "image_size": int(images.shape[1]),
        "router_cpu_s_per_image": router_cpu,
        "encoder_cpu_s_per_image": encoder_cpu,
        "router_share_of_encoder_cpu": router_cpu / encoder_cpu,
    }
