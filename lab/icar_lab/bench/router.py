"""Router cost: CPU seconds per image of the complexity features plus the scorer, next to the encoder's.
CPU time (process_time, all threads) is the honest unit: the router runs on the decode workers, the
encoder on its own cores, and the question is what share of the machine routing takes."""

from __future__ import annotations

from typing import Any

import numpy as np

from icar_lab.timing import best_of
from pipeline.encode.routed import RoutedEncoder
from pipeline.score import Scorer, complexity_features


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
    chunks = [
        (images[i : i + batch_size], bytes_per_pixel[i : i + batch_size]) for i in range(0, n, batch_size)
    ]

    def route() -> None:
        for pixels, bpp in chunks:
            scorer(complexity_features(pixels, bpp))

    def embed() -> None:
        for i, (pixels, _) in enumerate(chunks):
            encoder.encode(pixels, route_ids[i * batch_size : (i + 1) * batch_size])

    route()
    embed()  # warm-up
    router, encoder = best_of(route, n, repeats), best_of(embed, n, repeats)
    return {
        "images": n,
        "image_size": int(images.shape[1]),
        "router": router,
        "encoder": encoder,
        "router_share_of_encoder_cpu": router["cpu_s_per_image"] / encoder["cpu_s_per_image"],
    }
