"""Regrouping a batch by token count: every image keeps its own tokens and returns to its own row."""

from __future__ import annotations

import torch

from pipeline.encode import regroup
from pipeline.encode.regroup import BUDGET_QUANTUM, TokenGroup


def _batch(b: int = 5, n: int = 9, c: int = 4) -> TokenGroup:
    return TokenGroup.whole(torch.randn(b, n, c, generator=torch.Generator().manual_seed(0)), gflops=1.5)


def test_a_choice_splits_late_images_first_and_rows_come_back_in_batch_order():
    batch = _batch()
    late = torch.tensor([False, True, False, True, False])
    groups = regroup.by_choice(batch, late, gflops=2.0)
    assert [g.late for g in groups] == [True, False]
    assert [g.rows.tolist() for g in groups] == [[1, 3], [0, 2, 4]]
    assert all(g.gflops == 2.0 for g in groups)
    assert torch.equal(regroup.in_batch_order(groups, [g.x for g in groups]), batch.x)
    assert len(regroup.by_choice(batch, torch.ones(5, dtype=torch.bool), 2.0)) == 1  # no empty group


def test_budgets_round_up_to_the_quantum_and_each_group_holds_one_token_count():
    batch = _batch(n=1 + 20)
    budgets = regroup.token_budgets(batch.x, None, 3)
    assert budgets.tolist() == [BUDGET_QUANTUM] * 5
    assert regroup.token_budgets(batch.x, None, 19).tolist() == [20] * 5  # never above the patches
    batch.cls_attention = torch.rand(5, 21, generator=torch.Generator().manual_seed(1))
    groups = regroup.by_budget(batch, torch.tensor([8, 16, 8, 16, 16]), gflops=3.0)
    assert [g.rows.tolist() for g in groups] == [[0, 2], [1, 3, 4]]
    assert [g.x.shape[1] for g in groups] == [1 + 8 + 1, 1 + 16 + 1]  # CLS, kept, one fused token
    sizes = regroup.in_batch_order(groups, [g.size.sum(dim=1) for g in groups])
    assert sizes.flatten().tolist() == [21.0] * 5  # every patch still counted once
