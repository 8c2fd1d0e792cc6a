"""Embedding a sample: its images through the routed encoder, its captions through the model's text tower.

Calibration, the frontier, the quality harness and the studies embed here, so one set of images gives one
set of embeddings whoever asks. Nothing here is timed: speed is the harness's (speed.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.encode.model import LoadedModel
from pipeline.encode.routed import RoutedEncoder


def embed_images(
    encoder: RoutedEncoder, images: np.ndarray, route_ids: np.ndarray, batch_size: int = 256
) -> tuple[torch.Tensor, np.ndarray]:
    """Each image on its route (`route_ids` index `encoder.routes`), in batches of `batch_size`: the
    L2-normalised embeddings [N, D] and the encoder's analytic GFLOPs [N]."""
    out = [
        encoder.encode(images[i : i + batch_size], route_ids[i : i + batch_size])
        for i in range(0, len(images), batch_size)
    ]
    return torch.from_numpy(np.concatenate([o.vectors for o in out])), np.concatenate([o.gflops for o in out])


def embed_routes(
    encoder: RoutedEncoder, images: np.ndarray, batch_size: int = 256
) -> list[tuple[torch.Tensor, np.ndarray]]:
    """Every image on every route of `encoder`: per route, the embeddings [N, D] and GFLOPs [N]."""
    return [
        embed_images(encoder, images, np.full(len(images), i, np.int32), batch_size)
        for i in range(len(encoder.routes))
    ]


@torch.inference_mode()
def embed_texts(loaded: LoadedModel, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Captions -> L2-normalised [N, D] with the model's own text tower (what a query would use)."""
    model = loaded.model
    out = [
        model.encode_text(loaded.tokenizer(list(captions[i : i + batch_size])), normalize=True)
        for i in range(0, len(captions), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, int(model.text_projection.shape[-1]))
