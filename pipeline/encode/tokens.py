"""Token reduction for ViTs as pure tensor functions: merging, energy budgets, pruning, proportional bias.

Nothing here knows about a model: callers pass token features `x: [B, N, C]`, a matching `metric`
(e.g. head-averaged keys), token sizes `size: [B, N, 1]` (how many original patches each token stands
for; starts at ones) and, for pruning, per-token scores. Token 0 is the CLS token and is always
protected: never merged away, never a merge destination, never pruned, and it stays at index 0 with
its value unchanged. Everything is batched; the only Python loop is a bounded number of matching
rounds in `complete_graph_soft_matching`. Every function keeps the batch rectangular (the same token
count in each row), which is what lets the model run the next block on one dense tensor.

Style follows facebookresearch/ToMe `tome/merge.py`: a matcher returns a plan, and the plan is applied
to whichever tensors describe the same tokens (features, sizes, metrics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MergePlan",
    "bipartite_soft_matching",
    "complete_graph_soft_matching",
    "energy_token_budget",
    "match_similarity",
    "prune_and_fuse",
    "proportional_attention_bias",
]


@dataclass(frozen=True)
class MergePlan:
    """Which tokens merge into which, computed once from a metric and reusable on any same-token tensor.

    `src_idx[b, i]` is merged into `dst_idx[b, i]` (original token indices). No token is both a source and
    a destination, so one scatter-add is exact (no chains). `keep_idx` lists the surviving tokens in
    ascending original order, so relative token order is preserved and CLS stays at index 0.
    """

    src_idx: Tensor  # [B, r] long
    dst_idx: Tensor  # [B, r] long
    keep_idx: Tensor  # [B, N - r] long, ascending; keep_idx[:, 0] == 0 (CLS)

    @property
    def r(self) -> int:
        """Number of tokens removed per image (identical for every row)."""
        return self.src_idx.shape[1]

    @classmethod
    def identity(cls, batch: int, num_tokens: int, device: torch.device | None = None) -> MergePlan:
        """A plan that merges nothing (r = 0)."""
        empty = torch.empty(batch, 0, dtype=torch.long, device=device)
        keep = torch.arange(num_tokens, device=device).expand(batch, num_tokens)
        return cls(src_idx=empty, dst_idx=empty, keep_idx=keep)

    @classmethod
    def from_pairs(cls, src_idx: Tensor, dst_idx: Tensor, num_tokens: int) -> MergePlan:
        """Build a plan from source/destination pairs; survivors are all non-sources in original order."""
        batch, r = src_idx.shape
        is_src = torch.zeros(batch, num_tokens, dtype=torch.bool, device=src_idx.device)
        is_src.scatter_(1, src_idx, True)
        # stable sort puts the non-sources first, still in ascending index order
        keep = torch.sort(is_src.to(torch.uint8), dim=1, stable=True).indices[:, : num_tokens - r]
        return cls(src_idx=src_idx, dst_idx=dst_idx, keep_idx=keep)

    def merge(self, x: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
        """Size-weighted average of each destination with its sources -> `(x [B,N-r,C], size [B,N-r,1])`.

        Weighting by size makes repeated merging equal to averaging the original patches, and keeps
        `sum(x * size)` and `sum(size)` invariant. The survivors are gathered first and the sources added
        into them in place, so no full-size copy of the tokens is made.
        """
        if self.r == 0:
            return x, size
        batch, n, c = x.shape
        keep, src = self.keep_idx, self.src_idx[..., None]
        slot = torch.empty(batch, n, dtype=torch.long, device=x.device)  # original index -> survivor index
        slot.scatter_(1, keep, torch.arange(keep.shape[1], device=x.device).expand_as(keep))
        dst = slot.gather(1, self.dst_idx)[..., None]
        kept_size, src_size = size.gather(1, keep[..., None]), size.gather(1, src)
        # x * size promotes half x to float32 when size is float32: accumulate in higher precision
        weighted = x.gather(1, keep[..., None].expand(-1, -1, c)) * kept_size
        weighted.scatter_add_(1, dst.expand(-1, -1, c), x.gather(1, src.expand(-1, -1, c)) * src_size)
        new_size = kept_size.scatter_add(1, dst, src_size)
        return (weighted / new_size).to(x.dtype), new_size


def _cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Batched cosine similarity `[B, Na, Nb]`, in float32 so half-precision metrics rank stably."""
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    return a @ b.transpose(-1, -2)


def _best_bipartite_partners(metric: Tensor) -> tuple[Tensor, Tensor]:
    """Each A (even-index) token's best B (odd-index) partner: `(cosine [B, Na], index into B [B, Na])`.
    CLS (A token 0) scores -inf, so it is never chosen to merge."""
    scores = _cosine_similarity(metric[:, ::2], metric[:, 1::2])  # [B, Na, Nb]
    scores[:, 0, :] = -torch.inf  # protect CLS
    return scores.max(dim=-1)


def bipartite_soft_matching(metric: Tensor, r: int) -> MergePlan:
    """ToMe bipartite soft matching: merge the `r` even-index tokens most similar to an odd-index token.

    Splitting into A (even) / B (odd) makes sources and destinations disjoint by construction, so the
    match is a single parallel argmax. CLS (index 0, in A) gets score -inf and is never merged; it is never
    a destination because B holds only odd indices. `r` is clipped to `(N - 1) // 2`, the number of
    mergeable A tokens.
    """
    batch, n, _ = metric.shape
    r = min(r, (n - 1) // 2)
    if r <= 0:
        return MergePlan.identity(batch, n, metric.device)
    node_max, node_idx = _best_bipartite_partners(metric)
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[:, :r]  # top-r A tokens
    src = 2 * edge_idx
    dst = 2 * node_idx.gather(1, edge_idx) + 1
    return MergePlan.from_pairs(src, dst, n)


def match_similarity(metric: Tensor, r: int) -> Tensor:
    """Per image, the cosine of the `r`-th best ToMe bipartite match `[B]`: how alike the least alike pair
    would be if `r` tokens merged now. High means those merges lose little, so the image can take them.

    Same split and CLS rule as `bipartite_soft_matching`; `r` is clipped to the mergeable A tokens.
    """
    r = max(1, min(r, (metric.shape[1] - 1) // 2))
    return _best_bipartite_partners(metric).values.topk(r, dim=-1).values[:, -1]


def complete_graph_soft_matching(metric: Tensor, r: int) -> MergePlan:
    """CrossGET-style complete-graph matching: any patch may merge into its most similar patch.

    Unlike the bipartite split, every patch pair is a candidate, so near-duplicates always find each other.
    To keep the merge exact (no chains a->b->c), a greedy rule is applied in parallel rounds: a candidate
    (not yet source or destination) ranked by its best similarity is accepted as a source unless a
    better-ranked candidate points at it or its own best match is a better-ranked candidate. The top-ranked
    candidate is always accepted, so each round makes progress; destinations of accepted sources are frozen.
    This guarantees no token is both source and destination. CLS is excluded on both sides.

    Returns a plan removing the same number of tokens in every row: `min(r, N - 2, greedy-feasible)`, where
    the greedy may stop early once every remaining patch is a destination (e.g. two disjoint duplicate
    pairs allow only 2 merges). At most `r` rounds (typically a few); one host sync per round.
    """
    batch, n, _ = metric.shape
    r = min(r, max(n - 2, 0))
    if r <= 0:
        return MergePlan.identity(batch, n, metric.device)
    sim = _patch_similarity(metric)
    positions = torch.arange(n, device=metric.device).expand(batch, n)
    is_src = torch.zeros(batch, n, dtype=torch.bool, device=metric.device)
    is_dst = torch.zeros_like(is_src)
    dst_of = positions.clone()
    accept_key = torch.full((batch, n), n * (r + 1), dtype=torch.long, device=metric.device)  # round-major

    for it in range(r):  # every round accepts at least one source per row still in need
        need = r - is_src.sum(dim=1)  # [B]
        if not bool((need > 0).any()):
            break
        accept, best, rank = _greedy_round(sim, is_src, is_dst, need, positions)
        if not bool(accept.any()):
            break
        is_src |= accept
        dst_of = torch.where(accept, best, dst_of)
        hits = torch.zeros_like(rank).scatter_add(1, best, accept.long())
        is_dst |= hits > 0
        accept_key = torch.where(accept, it * n + rank, accept_key)

    r_eff = int(is_src.sum(dim=1).min())
    if r_eff == 0:
        return MergePlan.identity(batch, n, metric.device)
    # rows that found more sources than the poorest row drop their latest/worst ones; dropping a source
    # never creates a conflict because destinations are never sources
    src = accept_key.argsort(dim=1, stable=True)[:, :r_eff]
    dst = dst_of.gather(1, src)
    return MergePlan.from_pairs(src, dst, n)


def _patch_similarity(metric: Tensor) -> Tensor:
    """Cosine similarity of every token pair `[B, N, N]`, -inf where a merge is not allowed: a token with
    itself, and CLS on either side (its value must stay untouched)."""
    n = metric.shape[1]
    sim = _cosine_similarity(metric, metric)
    sim = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=metric.device), -torch.inf)
    sim[:, 0, :] = -torch.inf  # CLS is never a source
    sim[:, :, 0] = -torch.inf  # nor a destination
    return sim


def _greedy_round(
    sim: Tensor, is_src: Tensor, is_dst: Tensor, need: Tensor, positions: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One round of `complete_graph_soft_matching`'s greedy rule: the sources it accepts `[B, N]` bool (at
    most `need` per row, best-ranked first), each token's best match and each token's rank this round."""
    n = sim.shape[1]
    score, best = sim.masked_fill(is_src[:, None, :], -torch.inf).max(dim=-1)  # sources can't receive
    cand = (positions > 0) & ~is_src & ~is_dst & torch.isfinite(score) & (need > 0)[:, None]
    score = score.masked_fill(~cand, -torch.inf)
    order = score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    cand_rank = rank.masked_fill(~cand, n)  # non-candidates never outrank anyone
    # best rank among candidates pointing at each token
    ptr_rank = torch.full_like(rank, n).scatter_reduce(1, best, cand_rank, reduce="amin")
    accept = cand & (ptr_rank > rank) & (cand_rank.gather(1, best) > rank)
    # cap each row at the number still needed, preferring better ranks
    acc_sorted = accept.gather(1, order)
    acc_sorted &= acc_sorted.cumsum(dim=1) <= need[:, None]
    return torch.zeros_like(accept).scatter(1, order, acc_sorted), best, rank


def energy_token_budget(x: Tensor, tau: float) -> Tensor:
    """E-AdaPrune budget: per image, the smallest k whose top-k squared singular values hold >= tau of energy.

    The spectrum of the patch-token matrix `x[b, 1:]` (CLS excluded) measures how many directions the
    image's tokens really span: a flat image needs few tokens, a busy one many. The matrix is NOT
    centered, so a set of identical tokens is rank 1 (k = 1) rather than zero-energy; the shared mean
    direction is real content the kept tokens must carry. Returns `[B]` long in `[1, N - 1]`; all-zero
    images get 1.
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    patches = x[:, 1:].float()  # svdvals has no half kernels
    n_patches = patches.shape[1]
    energy = torch.linalg.svdvals(patches).square()  # [B, min(N-1, C)], descending
    total = energy.sum(dim=-1, keepdim=True)
    frac = energy.cumsum(dim=-1) / total.clamp_min(torch.finfo(energy.dtype).tiny)
    k = (frac < tau - 1e-6).sum(dim=-1) + 1  # tolerance: tau = 1 must not overshoot on rounding
    k = torch.where(total[:, 0] > 0, k, 1)  # no energy: one token is the minimum
    return k.clamp(max=n_patches).long()


def prune_and_fuse(x: Tensor, size: Tensor, keep: int, scores: Tensor) -> tuple[Tensor, Tensor]:
    """EViT-style prune: keep CLS plus the `keep` highest-scoring patches per image, in original order,
    and append one token fusing all dropped ones.

    `scores: [B, N]` comes from the caller (the model passes CLS attention); `scores[:, 0]` is ignored
    because CLS is always kept. `keep` is one int for the batch so it stays rectangular. The fused token
    is the size-weighted average of all dropped tokens with their total size, so their information (and
    `sum(size)`, `sum(x * size)`) is kept and proportional attention weights it by how many patches it
    absorbed. Output is `[B, 2 + keep, .]`; if nothing is dropped (`keep >= N - 1`) no fused token is
    added (a zero-size token would divide by zero downstream).
    """
    batch, n, c = x.shape
    keep = max(0, min(keep, n - 1))
    order = scores[:, 1:].argsort(dim=1, descending=True, stable=True) + 1  # CLS's score is ignored
    kept, dropped = order[:, :keep].sort(dim=1).values, order[:, keep:]  # kept in original order
    idx = torch.cat([kept.new_zeros(batch, 1), kept], dim=1)[..., None]
    x_keep, size_keep = x.gather(1, idx.expand(-1, -1, c)), size.gather(1, idx)
    if dropped.shape[1] == 0:
        return x_keep, size_keep
    d = dropped[..., None]
    size_drop = size.gather(1, d)
    fused_size = size_drop.sum(dim=1, keepdim=True)  # [B, 1, 1]
    fused = (x.gather(1, d.expand(-1, -1, c)) * size_drop).sum(dim=1, keepdim=True) / fused_size
    return torch.cat([x_keep, fused.to(x.dtype)], dim=1), torch.cat([size_keep, fused_size], dim=1)


def proportional_attention_bias(size: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """ToMe proportional attention: `log(size)` as an additive key bias, shaped `[B, 1, 1, N]`.

    softmax(q.k + log s) weights a token of size s exactly like s identical copies of it, so merged tokens
    keep their share of attention. Pass as `attn_mask` to `F.scaled_dot_product_attention` with q of shape
    `[B, heads, N, d]`; set `dtype` to q's dtype, as SDPA requires a float mask to match it.
    """
    bias = size.log()[:, None, None, :, 0]
    return bias if dtype is None else bias.to(dtype)
