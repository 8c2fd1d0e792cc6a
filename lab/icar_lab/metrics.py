"""Retrieval metrics as pure tensor functions, shared by training, calibration and the quality harness."""

from __future__ import annotations

import numpy as np
import torch


def _key_ids(keys: list[str]) -> torch.Tensor:
    _, inverse = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)
    return torch.from_numpy(inverse.astype(np.int64))


def recall_at_k(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    query_keys: list[str],
    gallery_keys: list[str],
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[int, float]:
    """Fraction of queries with a same-key gallery item among their top k (cosine; inputs L2-normalised)."""
    all_keys = _key_ids(list(query_keys) + list(gallery_keys))
    qk, gk = all_keys[: len(query_keys)], all_keys[len(query_keys) :]
    top = (queries @ gallery.T).topk(max(ks), dim=1).indices
    hits = gk[top] == qk[:, None]
    return {k: float(hits[:, :k].any(dim=1).float().mean()) for k in ks}


def neighbour_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Per image, |topk_a ∩ topk_b| / k of its image->image neighbours (self excluded) under two encoders."""

    def neighbours(x: torch.Tensor) -> torch.Tensor:
        sims = x @ x.T
        sims.fill_diagonal_(-float("inf"))
        return sims.topk(k, dim=1).indices

    na, nb = neighbours(a), neighbours(b)
    return (na[:, :, None] == nb[:, None, :]).any(dim=2).float().mean(dim=1)


def multi_positive_infonce(
    image: torch.Tensor, text: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE where every pair sharing a scene key is a positive (no false negatives)."""
    logits = logit_scale * image @ text.T
    positives = (keys[:, None] == keys[None, :]).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    loss_i = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    loss_t = -(targets * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_i + loss_t)
