"""Retrieval metrics as pure tensor functions, shared by training, calibration and the quality harness.

Text->image R@K has two settings, reported under two names: `t2i_R@10`, each caption searching every
image of the set (the quality harness, the frontier, training), and `t2i_R@10_in_gallery`, each caption
searching its own gallery of a given size (calibration and the headroom, `router_search.PlanEvaluator`).
Both rank with `hits_at_k`.
"""

from __future__ import annotations

import numpy as np
import torch

K = 10  # retrieval quality is text->image R@K


def _key_ids(keys: list[str]) -> torch.Tensor:
    _, inverse = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)
    return torch.from_numpy(inverse.astype(np.int64))


def relevance(
    query_ids: torch.Tensor,
    item_ids: torch.Tensor,
    query_galleries: torch.Tensor | None = None,
    item_galleries: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([Q, N] bool: item n answers query q, i.e. same match id and same gallery; [Q, N] bool: item n lies
    outside q's gallery, or None when every query searches every item)."""
    relevant = query_ids[:, None] == item_ids[None, :]
    if query_galleries is None or item_galleries is None:
        return relevant, None
    same_gallery = query_galleries[:, None] == item_galleries[None, :]
    outside = None if bool(same_gallery.all()) else ~same_gallery
    return relevant & same_gallery, outside


def hits_at_k(
    sims: torch.Tensor, relevant: torch.Tensor, k: int, outside: torch.Tensor | None = None
) -> torch.Tensor:
    """[Q, k] bool: whether each of a query's k most similar items is relevant to it; items `outside` its
    gallery are never ranked. The one ranking behind every R@K the lab reports."""
    if outside is not None:
        sims = sims.masked_fill(outside, -torch.inf)
    return relevant.gather(1, sims.topk(k, dim=1).indices)


def recall_at_k(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    query_keys: list[str],
    gallery_keys: list[str],
    ks: tuple[int, ...] = (1, 5, K),
) -> dict[int, float]:
    """Fraction of queries with a same-key item among their top k of the whole gallery (cosine; inputs
    L2-normalised)."""
    all_keys = _key_ids(list(query_keys) + list(gallery_keys))
    relevant, _ = relevance(all_keys[: len(query_keys)], all_keys[len(query_keys) :])
    hits = hits_at_k(queries @ gallery.T, relevant, max(ks))
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
