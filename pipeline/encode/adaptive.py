"""The adaptive forward: an open_clip VisionTransformer's own modules, run only as deep as a route says.

`forward` = `project(pool(run_blocks(stem(images), 0, depth, route)))`: each piece calls the tower's own
modules (read through public attributes, never copied or replaced), and the lab runs the same pieces to
train exit heads and tuned tails on exactly the tokens they will read. Modifications against open_clip's
`VisionTransformer.forward`:
- uint8 pixels go through the stem with the eval normalisation folded into the patch projection (stem.py);
- the block loop is ours, so it can stop after `exit_depth` blocks and pool through that depth's exit head;
- attention runs through `scaled_dot_product_attention` on the block's own in/out projections (fused),
  with ToMe's proportional-attention bias once tokens stand for more than one patch;
- patch tokens may be merged between each block's attention and MLP (ToMe / CrossGET) on the route's
  schedule (`RouteSpec.merge_count`); a two-phase route with `late_similarity` lets each image choose its
  schedule at `late_after`;
- after `prune_after` blocks, tokens may be pruned to a per-image budget, the dropped ones fused into one
  token; images that end up with different token counts run on as dense groups (regroup.py);
- avg pooling is weighted by how many patches each token stands for. At full depth the final LayerNorm
  sits where the tower's own pooling puts it (before pooling, or after it with `final_ln_after_pool`);
  an exit head always pools first and then applies its own LayerNorm;
- a `tuned` route runs the last blocks, the final LayerNorm and the projection from its token path's tuned
  tail (heads.py) instead of the tower's own.
Full depth with no reduction reproduces `model.encode_image` for every tower towers.py supports
(tests/test_adapter.py); any other tower is refused by name (towers.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import PatchDropout
from torch import nn

from pipeline.config import MergeRoute, PruneRoute, RouteSpec, TwoPhaseRoute
from pipeline.encode import flops, regroup
from pipeline.encode import tokens as tok
from pipeline.encode.heads import ExitHeads
from pipeline.encode.regroup import TokenGroup
from pipeline.encode.stem import patch_embeddings
from pipeline.encode.towers import refuse_unsupported, unsupported

_MATCHERS = {"tome": tok.bipartite_soft_matching, "crossget": tok.complete_graph_soft_matching}


@dataclass
class RouteOutput:
    embeddings: torch.Tensor  # [B, D] L2-normalised
    tokens: torch.Tensor  # [B] tokens alive after the last block run (CLS included)
    gflops: torch.Tensor  # [B] analytic GFLOPs actually spent on each image
    exit_depth: int


class AdaptiveViT(nn.Module):
    """Routed forward over `visual` (an open_clip VisionTransformer) with optional exit heads.

    `model_name` only labels the refusal when `visual` is a tower the adaptive forward does not reproduce.
    `mean` and `std` (the model's eval normalisation) let the forward take uint8 pixels (stem.py).
    """

    def __init__(
        self,
        visual: nn.Module,
        heads: ExitHeads | None = None,
        *,
        model_name: str | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        super().__init__()
        self.model_name = model_name or type(visual).__name__
        refuse_unsupported(visual, self.model_name)
        self.pixel_stats = (mean, std) if mean is not None and std is not None else None
        self.visual = visual
        self.heads = heads
        self.blocks = list(visual.transformer.resblocks)
        self.depth = len(self.blocks)
        self.width = visual.transformer.width
        self.num_heads = self.blocks[0].attn.num_heads
        self.num_patches = int(visual.grid_size[0] * visual.grid_size[1])
        self.patch_dim = 3 * int(visual.patch_size[0] * visual.patch_size[1])
        self.mlp_ratio = self.blocks[0].mlp.c_fc.out_features / self.width
        self.embed_dim = int(visual.output_dim)
        # open_clip's pooling: avg towers without final_ln_after_pool normalise every token, then average
        # (for CLS pooling the order is immaterial: LayerNorm acts per token)
        self.norm_before_pool = visual.pool_type == "avg" and not visual.final_ln_after_pool

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, route: RouteSpec) -> RouteOutput:
        """images: normalised float [B, 3, H, W], or uint8 pixels [B, H, W, 3] (with `mean` and `std` set).
        One route for the whole batch."""
        depth = self.route_depth(route)
        groups = self.run_blocks(self.stem(images), 0, depth, route)
        embeddings = F.normalize(self.project(self.pool(groups, depth, route), depth, route), dim=-1)
        tokens = [torch.full((len(g.rows),), g.x.shape[1], dtype=torch.int32) for g in groups]
        gflops = [torch.full((len(g.rows),), g.gflops, dtype=torch.float32) for g in groups]
        spent = regroup.in_batch_order(groups, gflops) + flops.head_gflops(self.width, self.embed_dim)
        return RouteOutput(embeddings, regroup.in_batch_order(groups, tokens), spent, depth)

    def stem(self, images: torch.Tensor) -> list[TokenGroup]:
        """The tower's stem (conv1, class and positional embeddings, patch dropout, ln_pre) as the one group
        `run_blocks` starts from; uint8 pixels [B, H, W, 3] take the folded patch projection (stem.py)."""
        visual = self.visual
        if visual.training and isinstance(visual.patch_dropout, PatchDropout):
            raise unsupported(self.model_name, "patch dropout in training mode (call .eval() on the tower)")
        if images.dtype != torch.uint8:
            x = visual.conv1(images).flatten(2).transpose(1, 2)
        elif self.pixel_stats is None:
            raise ValueError("uint8 pixels need the model's normalisation: AdaptiveViT(..., mean=, std=)")
        else:
            x = patch_embeddings(visual.conv1, images, *self.pixel_stats)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(visual.patch_dropout(x))
        return [TokenGroup.whole(x, gflops=flops.stem_gflops(self.width, self.patch_dim, self.num_patches))]

    def run_blocks(
        self, groups: list[TokenGroup], start: int, stop: int, route: RouteSpec
    ) -> list[TokenGroup]:
        """Blocks [start, stop) of `route`'s token path. A route that prunes (at `prune_after`) or lets
        images choose their schedule (at `late_after`) regroups the batch before that block, so a forward
        may stop at any block and go on from there with the same result."""
        blocks = self._blocks(route)
        for i in range(start, stop):
            if isinstance(route, PruneRoute) and i == route.prune_after:
                groups = [part for g in groups for part in self._prune(g, route)]
            if isinstance(route, TwoPhaseRoute) and route.splits and i == route.late_after:
                groups = [part for g in groups for part in self._split(g, route, blocks[i])]
            want_cls = isinstance(route, PruneRoute) and i == route.prune_after - 1
            groups = [self._block(blocks[i], g, route, i, want_cls) for g in groups]
        return groups

    def _block(self, block: nn.Module, g: TokenGroup, route: RouteSpec, i: int, want_cls: bool) -> TokenGroup:
        """One block of the tower (or of a tuned tail), tokens merged between its attention and MLP."""
        x, size, n = g.x, g.size, g.x.shape[1]
        late = g.late and isinstance(route, TwoPhaseRoute) and i >= route.late_after
        r = route.merge_count(n, late)  # 0 unless the route merges
        # until a merge or prune, every token is one patch and the bias (log 1) is zero: skip it
        bias = tok.proportional_attention_bias(size, x.dtype) if n <= self.num_patches else None
        attn_out, keys, cls_attention = self._attention(block, x, bias, r > 0, want_cls)
        x, gflops = x + attn_out, g.gflops
        if isinstance(route, MergeRoute) and r > 0:
            x, size = _MATCHERS[route.merge](keys, r).merge(x, size)
            gflops += flops.similarity_gflops(n, keys.shape[-1])
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        gflops += flops.block_gflops(self.width, self.mlp_ratio, n, x.shape[1])
        return TokenGroup(g.rows, x, size, gflops, g.late, cls_attention)

    def _attention(
        self, block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, want_keys: bool, want_cls: bool
    ):
        """(attention output, head-averaged keys if `want_keys` (what merging matches on), CLS attention if
        `want_cls`)."""
        attn: nn.MultiheadAttention = block.attn
        b, n, d = x.shape
        head_dim = d // self.num_heads
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = F.linear(out.transpose(1, 2).reshape(b, n, d), attn.out_proj.weight, attn.out_proj.bias)
        cls_attention = None
        if want_cls:  # EViT's token importance: how much the CLS query attends to each token
            logits = (q[:, :, :1] @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(head_dim)
            if bias is not None:
                logits = logits + bias[:, :, 0]
            cls_attention = logits.softmax(dim=-1).mean(dim=1)
        return block.ls_1(out), k.mean(dim=1) if want_keys else None, cls_attention

    def _prune(self, g: TokenGroup, route: PruneRoute) -> list[TokenGroup]:
        """`g` split by token budget, each image pruned to its own."""
        budgets = regroup.token_budgets(g.x, route.energy_tau, route.keep_tokens)
        svd = flops.svd_gflops(g.x.shape[1], g.x.shape[2]) if route.energy_tau is not None else 0.0
        return regroup.by_budget(g, budgets, g.gflops + svd)

    def _split(self, g: TokenGroup, route: TwoPhaseRoute, block: nn.Module) -> list[TokenGroup]:
        """`g` split into the images that take the late schedule and those that don't. An image takes it
        when the late merges in `block` would pair tokens at least `late_similarity` alike, judged on that
        block's own keys (head-averaged, as ToMe matches them)."""
        b, n, c = g.x.shape
        w, bias = block.attn.in_proj_weight[c : 2 * c], block.attn.in_proj_bias[c : 2 * c]
        keys = F.linear(block.ln_1(g.x), w, bias).view(b, n, self.num_heads, -1).mean(dim=2)
        alike = tok.match_similarity(keys, route.merge_count(n, late=True))
        gflops = g.gflops + flops.split_gflops(n, c, keys.shape[-1])
        return regroup.by_choice(g, alike >= route.late_similarity, gflops)

    def _tail(self, route: RouteSpec) -> nn.Module:
        """What ends `route` at full depth: its tuned tail, or the tower itself (both have ln_post, proj)."""
        return self.heads.tail(route) if route.tuned else self.visual

    def _blocks(self, route: RouteSpec) -> list[nn.Module]:
        """The blocks `route` runs: the tower's, with the tuned tail's copies from the tail's start on."""
        if not route.tuned:
            return self.blocks
        tail = self.heads.tail(route)
        return self.blocks[: tail.start] + list(tail.blocks)

    def _tower_head(self, depth: int) -> bool:
        """Whether `depth` is read through the tower's own ln_post + proj (else through its exit head)."""
        return depth == self.depth or self.heads is None

    def pool(self, groups: list[TokenGroup], depth: int, route: RouteSpec) -> torch.Tensor:
        """The token [B, C] that `project(., depth, route)` reads, in batch order: CLS, or the size-weighted
        mean of patches for avg towers (equal to the mean over the patches merged tokens stand for)."""
        pooled = []
        for g in groups:
            x, size = g.x, g.size
            if self.norm_before_pool and self._tower_head(depth):
                x = self._tail(route).ln_post(x)
            if self.visual.pool_type == "avg":
                pooled.append((x[:, 1:] * size[:, 1:]).sum(dim=1) / size[:, 1:].sum(dim=1))
            else:
                pooled.append(x[:, 0])
        return regroup.in_batch_order(groups, pooled)

    def project(self, pooled: torch.Tensor, depth: int, route: RouteSpec) -> torch.Tensor:
        """The final LayerNorm (unless `pool` applied it) + projection of the tower or of `route`'s tuned
        tail, or the exit head's own."""
        if not self._tower_head(depth):
            return self.heads.project(pooled, depth)
        end = self._tail(route)
        if not self.norm_before_pool:
            pooled = end.ln_post(pooled)
        return pooled @ end.proj if end.proj is not None else pooled

    def route_depth(self, route: RouteSpec) -> int:
        """The blocks `route` runs; refuses (ValueError) a route these heads cannot serve."""
        depth = route.exit_depth or self.depth
        if depth > self.depth:
            raise ValueError(
                f"route {route.name!r}: exit_depth {depth} exceeds the model's {self.depth} blocks"
            )
        if depth < self.depth and (self.heads is None or depth not in self.heads.depths):
            have = sorted(self.heads.depths) if self.heads else []
            raise ValueError(f"route {route.name!r}: no exit head at depth {depth} (heads at {have})")
        if route.tuned and (self.heads is None or self.heads.tail(route) is None):
            have = self.heads.tail_paths if self.heads else "none: no heads file"
            raise ValueError(
                f"route {route.name!r} is tuned, but the heads have no tail for its token path (tails "
                f"for: {have}); train one with jobs/train_tails.py"
            )
        return depth
