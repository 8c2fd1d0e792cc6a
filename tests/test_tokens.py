"""Value-level tests for the pure token-reduction functions in pipeline.encode.tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.encode.tokens import (
    MergePlan,
    bipartite_soft_matching,
    complete_graph_soft_matching,
    energy_token_budget,
    match_similarity,
    proportional_attention_bias,
    prune_and_fuse,
)

MATCHERS = [bipartite_soft_matching, complete_graph_soft_matching]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def _assert_plan_valid(plan: MergePlan, n: int) -> None:
    """No chains, CLS untouched, sources unique, survivors ascending and complementary to sources."""
    src, dst, keep = plan.src_idx, plan.dst_idx, plan.keep_idx
    assert keep.shape[1] == n - plan.r
    assert (keep[:, 0] == 0).all()
    assert (keep[:, 1:] > keep[:, :-1]).all()
    assert not (src == 0).any() and not (dst == 0).any()
    assert not (src[:, :, None] == dst[:, None, :]).any(), "a token is both source and destination"
    assert not (src[:, :, None] == keep[:, None, :]).any()
    assert (src.sort(dim=1).values.diff(dim=1) > 0).all()


# ---------------------------------------------------------------- merging


@pytest.mark.parametrize("matcher", MATCHERS)
@pytest.mark.parametrize("r", [1, 5, 12])
def test_merge_removes_r_tokens_and_conserves_size_and_weighted_features(matcher, r):
    b, n, c = 3, 25, 16
    x = _randn(b, n, c)
    size = torch.ones(b, n, 1, dtype=torch.float64)
    plan = matcher(_randn(b, n, 8, seed=1), r)
    _assert_plan_valid(plan, n)
    x2, s2 = plan.merge(x, size)
    assert x2.shape == (b, n - r, c) and s2.shape == (b, n - r, 1)
    torch.testing.assert_close(s2.sum(dim=(1, 2)), torch.full((b,), float(n), dtype=torch.float64))
    torch.testing.assert_close((x2 * s2).sum(dim=1), (x * size).sum(dim=1))


@pytest.mark.parametrize("matcher", MATCHERS)
def test_repeated_merges_conserve_size_weighted_sum(matcher):
    b, n, c = 2, 33, 8
    x = _randn(b, n, c)
    size = torch.ones(b, n, 1, dtype=torch.float64)
    total = x.sum(dim=1)
    for _ in range(3):
        x, size = matcher(x, 4).merge(x, size)
    assert x.shape[1] == n - 12
    torch.testing.assert_close((x * size).sum(dim=1), total)
    assert (size.sum(dim=(1, 2)) == n).all()


@pytest.mark.parametrize("matcher", MATCHERS)
def test_cls_never_merged_stays_first_and_unchanged(matcher):
    b, n, c = 2, 11, 8
    x = _randn(b, n, c)
    x[:, 1] = x[:, 0]  # CLS has an exact duplicate: the most tempting possible merge
    x[:, 2] = x[:, 0]
    plan = matcher(x, 4)
    _assert_plan_valid(plan, n)
    x2, s2 = plan.merge(x, torch.ones(b, n, 1, dtype=torch.float64))
    assert torch.equal(x2[:, 0], x[:, 0])
    assert (s2[:, 0] == 1).all()


@pytest.mark.parametrize("matcher", MATCHERS)
def test_r_zero_is_identity(matcher):
    x = _randn(2, 9, 4)
    size = torch.rand(2, 9, 1, generator=_gen(), dtype=torch.float64) + 1
    plan = matcher(x, 0)
    assert plan.r == 0
    x2, s2 = plan.merge(x, size)
    assert torch.equal(x2, x) and torch.equal(s2, size)


def test_bipartite_merges_identical_pair_first():
    b, n, c = 2, 10, 64
    x = _randn(b, n, c)
    x[:, 4] = 3.0 * x[:, 7]  # even (A) token parallel to odd (B) token: cosine 1
    plan = bipartite_soft_matching(x, 1)
    assert plan.src_idx.tolist() == [[4], [4]] and plan.dst_idx.tolist() == [[7], [7]]


def test_bipartite_r_clipped_to_half_of_non_cls_tokens():
    n = 10  # A = {0, 2, 4, 6, 8}: 4 mergeable (CLS protected)
    plan = bipartite_soft_matching(_randn(2, n, 4), 100)
    assert plan.r == 4
    _assert_plan_valid(plan, n)


def test_merge_is_size_weighted_average_and_reusable_on_other_tensors():
    x = torch.tensor([[[0.0], [1.0], [2.0], [10.0], [4.0]]])
    size = torch.tensor([[[1.0], [1.0], [3.0], [1.0], [2.0]]])
    plan = MergePlan.from_pairs(torch.tensor([[2]]), torch.tensor([[3]]), 5)
    x2, s2 = plan.merge(x, size)
    assert s2.flatten().tolist() == [1.0, 1.0, 4.0, 2.0]
    assert x2.flatten().tolist() == [0.0, 1.0, (3 * 2.0 + 10.0) / 4, 4.0]
    # the same plan applies to any tensor over the same tokens (e.g. the metric)
    m2, ones2 = plan.merge(torch.arange(10.0).view(1, 5, 2), torch.ones(1, 5, 1))
    assert m2.tolist() == [[[0.0, 1.0], [2.0, 3.0], [5.0, 6.0], [8.0, 9.0]]]
    assert ones2.flatten().tolist() == [1.0, 1.0, 2.0, 1.0]


def test_match_similarity_is_the_rth_best_pair_and_ignores_cls():
    metric = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(0))
    metric[0, 2] = metric[0, 1] * 3  # A token 2 duplicates B token 1: cosine 1
    metric[1, 0] = metric[1, 1]  # CLS duplicates a patch: must not count
    best = match_similarity(metric, 1)
    assert best[0] == pytest.approx(1.0, abs=1e-5) and best[1] < 0.999
    assert (match_similarity(metric, 3) <= best).all()
    assert torch.equal(match_similarity(metric, 99), match_similarity(metric, 4))  # 4 A patches


def test_complete_graph_merges_identical_tokens_without_chaining():
    """A mutual nearest pair (a <-> b) makes naive top-r matching pick both as sources; we must not."""
    b, n, c = 3, 12, 64
    x = _randn(b, n, c)
    x[:, 5] = x[:, 9] * 2.0  # cosine 1: each is the other's best match and both top the ranking
    r = 2
    # the naive approach: take the top-r tokens by best-match score and merge each into its best match
    sim = F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).transpose(1, 2)
    sim = sim.masked_fill(torch.eye(n, dtype=torch.bool), -torch.inf)
    sim[:, 0] = -torch.inf
    sim[:, :, 0] = -torch.inf
    score, best = sim.max(-1)
    naive_src = score.topk(r, dim=1).indices
    naive_dst = best.gather(1, naive_src)
    assert (naive_src[:, :, None] == naive_dst[:, None, :]).any(), "test case must trap the naive approach"

    plan = complete_graph_soft_matching(x, r)
    _assert_plan_valid(plan, n)
    assert plan.r == r
    pairs = {frozenset(p) for p in torch.stack([plan.src_idx, plan.dst_idx], -1)[:, 0].tolist()}
    assert pairs == {frozenset({5, 9})}
    x2, s2 = plan.merge(x, torch.ones(b, n, 1, dtype=torch.float64))
    merged_pos = (plan.keep_idx == plan.dst_idx[:, :1]).nonzero()[:, 1]
    assert (s2[torch.arange(b), merged_pos] == 2).all()


def test_complete_graph_finds_cross_parity_duplicates_bipartite_cannot():
    """Two duplicates at even indices are never paired by the A/B split but are by the complete graph."""
    x = _randn(1, 9, 64)
    x[:, 6] = x[:, 2]
    cg = complete_graph_soft_matching(x, 1)
    assert {cg.src_idx.item(), cg.dst_idx.item()} == {2, 6}
    bp = bipartite_soft_matching(x, 1)
    assert {bp.src_idx.item(), bp.dst_idx.item()} != {2, 6}


def test_complete_graph_same_count_for_every_row_when_one_row_is_infeasible():
    """Row 0: two orthogonal duplicate pairs, so greedy merges only 2; row 1 (4 equal patches) allows 3."""
    c = 8
    e = torch.eye(c, dtype=torch.float64)
    row0 = torch.stack([e[7], e[0], e[0], e[1], e[1]])
    row1 = torch.stack([e[7], e[2], e[2], e[2], e[2]])
    plan = complete_graph_soft_matching(torch.stack([row0, row1]), 3)
    _assert_plan_valid(plan, 5)
    assert plan.r == 2
    x2, s2 = plan.merge(torch.stack([row0, row1]), torch.ones(2, 5, 1, dtype=torch.float64))
    assert x2.shape == (2, 3, c) and (s2.sum(dim=(1, 2)) == 5).all()
    alone = complete_graph_soft_matching(row1[None], 3)
    assert alone.r == 3  # the maximum N - 2: everything into one patch


@pytest.mark.parametrize("seed", range(5))
def test_complete_graph_invariants_hold_on_random_and_clustered_batches(seed):
    b, n, c = 4, 40, 6
    centers = _randn(b, 5, c, seed=seed)
    assign = torch.randint(0, 5, (b, n), generator=_gen(seed))
    x = centers.gather(1, assign[..., None].expand(-1, -1, c)) + 0.05 * _randn(b, n, c, seed=seed + 100)
    for r in (1, 10, 19, 38):
        plan = complete_graph_soft_matching(x, r)
        _assert_plan_valid(plan, n)
        # the greedy only stops short when every patch is a source or a destination; each destination has
        # a source, so at least half of the n - 1 patches become sources: up to n // 2 is always feasible
        assert plan.r == r if r <= n // 2 else n // 2 <= plan.r <= r


# ---------------------------------------------------------------- energy budget


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(_randn(rows, cols, seed=seed)).Q


def test_energy_budget_rank_one_needs_one_token():
    n, c = 17, 32
    x = _randn(2, n, c)
    x[:, 1:] = _randn(2, n - 1, 1, seed=1) * _randn(2, 1, c, seed=2)
    assert energy_token_budget(x, 0.9).tolist() == [1, 1]
    assert energy_token_budget(x, 0.99).tolist() == [1, 1]


def test_energy_budget_full_rank_needs_more_and_is_monotone_in_tau():
    x = _randn(3, 33, 64)
    taus = [0.5, 0.7, 0.9, 0.95, 0.99, 1.0]
    ks = torch.stack([energy_token_budget(x, t) for t in taus])  # [T, B]
    assert (ks[2] > 1).all()
    assert (ks.diff(dim=0) >= 0).all()
    assert (ks[-1] == 32).all()  # tau = 1 needs the full rank min(N-1, C)


def test_energy_budget_differs_per_image_in_one_batch():
    n, c = 21, 16
    x = torch.zeros(3, n, c, dtype=torch.float64)
    x[0, 1:] = _orthonormal(n - 1, 1, 0) @ _orthonormal(c, 1, 1).T  # rank 1
    x[1, 1:] = _orthonormal(n - 1, 3, 2) @ _orthonormal(c, 3, 3).T  # rank 3, equal energies (1/3 each)
    x[2, 1:] = _randn(n - 1, c, seed=4)
    k = energy_token_budget(x, 0.9)
    assert k[0] == 1 and k[1] == 3 and k[2] > 3
    assert energy_token_budget(x, 0.6)[1] == 2


def test_energy_budget_ignores_cls_and_respects_bounds():
    n = 9
    x = _randn(2, n, 4)
    k = energy_token_budget(x, 0.9)
    x_big_cls = x.clone()
    x_big_cls[:, 0] = 1e6
    assert torch.equal(energy_token_budget(x_big_cls, 0.9), k)
    assert k.dtype == torch.long
    assert energy_token_budget(torch.zeros(2, n, 4), 0.9).tolist() == [1, 1]  # no energy: the minimum
    assert energy_token_budget(x, 0.01).tolist() == [1, 1]
    wide = _randn(2, n, 32, seed=3)  # rank n - 1: tau = 1 needs every patch, and never more
    assert energy_token_budget(wide, 1.0).tolist() == [n - 1, n - 1]
    with pytest.raises(ValueError):
        energy_token_budget(x, 0.0)


# ---------------------------------------------------------------- pruning


def _indexed_tokens(b: int, n: int) -> torch.Tensor:
    """Token j of image i has features (i, j), so outputs reveal which tokens survived."""
    i = torch.arange(b, dtype=torch.float64)[:, None].expand(b, n)
    j = torch.arange(n, dtype=torch.float64)[None].expand(b, n)
    return torch.stack([i, j], -1)


def test_prune_keeps_highest_scoring_tokens_in_original_order_then_the_fused_one():
    x = _indexed_tokens(2, 7)
    size = torch.arange(14, dtype=torch.float64).view(2, 7, 1) + 1
    scores = torch.tensor([[-9.0, 0.1, 0.9, 0.3, 0.8, 0.2, 0.7], [99.0, 5.0, 1.0, 4.0, 2.0, 3.0, 0.0]])
    x2, s2 = prune_and_fuse(x, size, 3, scores)
    assert x2[:, :4, 1].tolist() == [[0, 2, 4, 6], [0, 1, 3, 5]]  # CLS first; its own score is ignored
    assert x2[..., 0].tolist() == [[0] * 5, [1] * 5]
    assert torch.equal(s2[:, :4], size.gather(1, x2[:, :4, 1:].long()))
    # the fused token: dropped tokens 1, 3, 5 (sizes 2, 4, 6) in row 0 and 2, 4, 6 (sizes 10, 12, 14) in row 1
    assert s2[:, 4, 0].tolist() == [12, 36]
    expected = [(1 * 2 + 3 * 4 + 5 * 6) / 12, (2 * 10 + 4 * 12 + 6 * 14) / 36]  # size-weighted positions
    assert x2[:, 4, 1].tolist() == pytest.approx(expected)


def test_prune_with_full_budget_is_identity():
    x = _randn(2, 6, 3)
    size = torch.ones(2, 6, 1, dtype=torch.float64)
    x2, s2 = prune_and_fuse(x, size, 5, _randn(2, 6, seed=1))
    assert torch.equal(x2, x) and torch.equal(s2, size)


def test_prune_and_fuse_appends_size_weighted_average_of_dropped_and_conserves_size():
    x = _indexed_tokens(1, 6)
    size = torch.tensor([[[1.0], [1.0], [2.0], [1.0], [3.0], [1.0]]], dtype=torch.float64)
    scores = torch.tensor([[0.0, 0.9, 0.1, 0.8, 0.2, 0.7]])
    x2, s2 = prune_and_fuse(x, size, 3, scores)
    assert x2.shape == (1, 5, 2)
    assert x2[0, :4, 1].tolist() == [0, 1, 3, 5]
    assert s2.flatten().tolist() == [1, 1, 1, 1, 5]  # dropped tokens 2 (size 2) and 4 (size 3)
    assert x2[0, 4, 1].item() == pytest.approx((2 * 2 + 3 * 4) / 5)


def test_prune_and_fuse_conserves_size_and_weighted_sum_on_random_batch():
    b, n, c = 4, 30, 8
    x = _randn(b, n, c)
    size = torch.rand(b, n, 1, generator=_gen(), dtype=torch.float64) * 3 + 1
    x2, s2 = prune_and_fuse(x, size, 10, _randn(b, n, seed=2))
    assert x2.shape == (b, 12, c)
    torch.testing.assert_close(s2.sum(dim=1), size.sum(dim=1))
    torch.testing.assert_close((x2 * s2).sum(dim=1), (x * size).sum(dim=1))
    assert torch.equal(x2[:, 0], x[:, 0])


# ---------------------------------------------------------------- proportional attention


def test_proportional_bias_is_zero_for_unit_sizes_and_log_size_otherwise():
    bias = proportional_attention_bias(torch.ones(2, 5, 1))
    assert bias.shape == (2, 1, 1, 5) and (bias == 0).all()
    size = torch.tensor([[[1.0], [2.0], [4.0]]])
    torch.testing.assert_close(proportional_attention_bias(size), torch.log(size).view(1, 1, 1, 3))
    assert proportional_attention_bias(size, torch.float16).dtype == torch.float16


def test_token_of_size_two_attends_like_two_identical_tokens():
    """The key property: SDPA with log(size) bias == plain attention over tokens duplicated size times."""
    b, h, n, d = 2, 3, 6, 8
    size = torch.tensor([[1, 2, 1, 3, 1, 4], [5, 1, 1, 2, 1, 1]])
    q, k, v = (_randn(b, h, n, d, seed=s) for s in range(3))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=proportional_attention_bias(size[..., None].double())
    )
    for i in range(b):  # build the duplicated reference (loop is test-only)
        k_dup = k[i].repeat_interleave(size[i], dim=1)
        v_dup = v[i].repeat_interleave(size[i], dim=1)
        ref = F.scaled_dot_product_attention(q[i : i + 1], k_dup[None], v_dup[None])
        torch.testing.assert_close(out[i : i + 1], ref)
    plain = F.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(out, plain)


def test_merging_exact_duplicates_with_proportional_attention_preserves_attention_output():
    """End to end: merge duplicated tokens, then biased attention over the merged set equals the original."""
    b, n, c = 2, 12, 16
    x = _randn(b, n, c)
    x[:, 3] = x[:, 8]  # duplicates the complete graph will merge (cosine 1 beats random pairs)
    x[:, 5] = x[:, 10]
    wq, wk, wv = (_randn(c, c, seed=s) / c**0.5 for s in (1, 2, 3))
    plan = complete_graph_soft_matching(x, 2)
    xm, sm = plan.merge(x, torch.ones(b, n, 1, dtype=torch.float64))

    def attend(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = F.scaled_dot_product_attention((t @ wq)[:, None], (t @ wk)[:, None], (t @ wv)[:, None], mask)
        return out[:, 0]

    full = attend(x, None)
    merged = attend(xm, proportional_attention_bias(sm))
    torch.testing.assert_close(merged, full.gather(1, plan.keep_idx[..., None].expand(-1, -1, c)))
