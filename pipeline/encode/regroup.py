"""A batch as dense groups of images that carry the same token count, and how it regroups.

Pruning to a per-image budget, or a per-image choice of merge schedule, leaves images of one batch with
different token counts. Grouping the images by count keeps every block one dense tensor, so the FLOPs a
route saves are seconds saved. Nothing here knows about a model: callers pass budgets and choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.encode import tokens as tok

BUDGET_QUANTUM = 8  # pruning budgets round up to a multiple: few groups, dense batches


@dataclass
class TokenGroup:
    """Tokens in flight for the images `rows` of a batch, which share one token count."""

    rows: Tensor  # [b] long: where these images sit in the batch
    x: Tensor  # [b, N, C]
    size: Tensor  # [b, N, 1] patches each token stands for
    gflops: float = 0.0  # spent on each image so far
    late: bool = True  # whether these images take a two-phase route's late schedule
    cls_attention: Tensor | None = None  # [b, N] from the last block run, when it was asked for

    @classmethod
    def whole(cls, x: Tensor, size: Tensor | None = None, gflops: float = 0.0) -> TokenGroup:
        """A whole batch as one group; every token one patch unless `size` says otherwise."""
        size = x.new_ones(x.shape[0], x.shape[1], 1) if size is None else size
        return cls(torch.arange(x.shape[0], device=x.device), x, size, gflops)


def token_budgets(x: Tensor, energy_tau: float | None, keep_tokens: int | None) -> Tensor:
    """Patch tokens each image keeps [B]: its energy budget, or `keep_tokens` (all patches if neither),
    rounded up to the quantum so images share few group sizes."""
    n_patches = x.shape[1] - 1
    if energy_tau is not None:
        budget = tok.energy_token_budget(x, energy_tau)
    else:
        budget = torch.full((x.shape[0],), keep_tokens or n_patches, dtype=torch.long, device=x.device)
    q = BUDGET_QUANTUM
    return ((budget + q - 1) // q * q).clamp(max=n_patches)


def by_budget(group: TokenGroup, budgets: Tensor, gflops: float) -> list[TokenGroup]:
    """One group per budget (ascending), each image pruned to its budget with CLS attention as the score;
    `gflops` is what each image has spent once the budgets are known."""
    assert group.cls_attention is not None, "pruning needs the CLS attention of the block before it"
    groups = []
    for keep in budgets.unique().tolist():
        sub = (budgets == keep).nonzero().squeeze(1)
        x, size = tok.prune_and_fuse(group.x[sub], group.size[sub], int(keep), group.cls_attention[sub])
        groups.append(TokenGroup(group.rows[sub], x, size, gflops, group.late))
    return groups


def by_choice(group: TokenGroup, late: Tensor, gflops: float) -> list[TokenGroup]:
    """The images that take the late schedule (`late`: [b] bool), then those that don't; empty ones left
    out. `gflops` is what each image has spent once the choice is made."""
    groups = []
    for choice in (True, False):
        sub = (late == choice).nonzero().squeeze(1)
        if len(sub):
            groups.append(TokenGroup(group.rows[sub], group.x[sub], group.size[sub], gflops, choice))
    return groups


def in_batch_order(groups: list[TokenGroup], values: list[Tensor]) -> Tensor:
    """`values[i]` (one row per image of `groups[i]`) gathered back into batch order."""
    if len(groups) == 1:  # one group holds the whole batch in order
        return values[0]
    out = values[0].new_empty((sum(len(g.rows) for g in groups), *values[0].shape[1:]))
    for group, value in zip(groups, values, strict=True):
        out[group.rows.to(out.device)] = value
    return out
