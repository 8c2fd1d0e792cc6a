"""The adaptive forward: an open_clip VisionTransformer's own weights, run only as deep as a route says.

Modifications against open_clip's `VisionTransformer.forward` (the weights are read, never copied, and no
module of the live model is replaced):
- uint8 pixels go through the stem with the eval normalisation folded into the patch projection (stem.py);
- the block loop is ours, so it can stop after `exit_depth` blocks and pool through that depth's exit head;
- attention runs through `scaled_dot_product_attention` on the block's own in/out projections (fused),
  with ToMe's proportional-attention bias once tokens stand for more than one patch;
- patch tokens may be merged between each block's attention and MLP (ToMe / CrossGET), r tokens per block
  or a kept fraction down to a floor (`RouteSpec.merge_count`), gently in early blocks and harder from
  `late_after` on; with `late_similarity` each image decides at `late_after` whether its tokens are alike
  enough for the harder schedule, and the batch runs on as two dense groups;
- after `prune_after` blocks, tokens may be pruned to a per-image energy budget (or a fixed count), the
  dropped ones fused into one token; the batch is then split into groups of equal budget so every forward
  stays one dense tensor and saved FLOPs become saved seconds;
- avg pooling is weighted by how many patches each token stands for. At full depth the final LayerNorm
  sits where the tower's own `_pool` puts it (before pooling, or after it with `final_ln_after_pool`);
  an exit head always pools first and then applies its own LayerNorm;
- a `tuned` route runs the last blocks, the final LayerNorm and the projection from its token path's tuned
  tail (heads.py) instead of the tower's own.
Full depth with no reduction reproduces `model.encode_image` for every supported tower
(tests/test_adapter.py).

Supported towers: open_clip `VisionTransformer` whose blocks are plain `ResidualAttentionBlock`s over a
packed-projection `nn.MultiheadAttention` (no bias_k/v, no zero-attention, no attention dropout), with any
activation (GELU, `quick_gelu`) and LayerNorm settings, LayerScale (`ls_init_value`), `no_ln_pre`,
learnable or `sin_cos_2d` positions, a square or (H, W) image grid, `pool_type` 'tok' or 'avg' with or
without `final_ln_after_pool` (CLIPA), `output_tokens` (only the pooled embedding is produced) and patch
dropout in eval mode (where it is the identity).
Refused with `NotImplementedError` naming the model and the feature: timm towers (`TimmModel`), ResNets
(`ModifiedResNet`), attentional pooling (`attn_pool`: CoCa), `pool_type='none'`, custom attention blocks
(`CustomResidualAttentionBlock`: qk_norm, scaled_cosine_attn, scale_heads, scale_attn_inner, scale_attn,
scale_fc, or block_type='custom'), any other tower or block class, and, per forward, patch dropout while
the tower is in training mode (the kept tokens would be random).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import (
    CustomResidualAttentionBlock,
    LayerScale,
    PatchDropout,
    ResidualAttentionBlock,
    Transformer,
    VisionTransformer,
)
from torch import nn

from pipeline.config import RouteSpec
from pipeline.encode import tokens as tok
from pipeline.encode.flops import block_gflops, head_gflops, stem_gflops
from pipeline.encode.heads import ExitHeads
from pipeline.encode.stem import patch_embeddings

BUDGET_QUANTUM = 8  # pruning budgets round up to a multiple: few groups, dense batches

_OTHER_TOWERS = {
    TimmModel: "a timm vision tower (open_clip TimmModel)",
    ModifiedResNet: "a ResNet vision tower (open_clip ModifiedResNet with attnpool)",
}


@dataclass
class RouteOutput:
    embeddings: torch.Tensor  # [B, D] L2-normalised
    tokens: torch.Tensor  # [B] tokens alive after the last block run (CLS included)
    gflops: torch.Tensor  # [B] analytic GFLOPs actually spent on each image
    exit_depth: int


@dataclass
class _State:
    """Tokens in flight for a group of images that share one token count."""

    x: torch.Tensor  # [B, N, C]
    size: torch.Tensor  # [B, N, 1] patches each token stands for
    gflops: float
    cls_attention: torch.Tensor | None = None  # [B, N] from the last block, for pruning


_Group = tuple[torch.Tensor, _State, bool]  # rows of the batch, their tokens, whether they take late_keep


def _unsupported(model_name: str, feature: str) -> NotImplementedError:
    return NotImplementedError(
        f"model {model_name!r} uses {feature}, which the adaptive forward does not reproduce "
        "(supported towers: pipeline/encode/adaptive.py)"
    )


def _custom_block_features(block: nn.Module) -> list[str]:
    """The open_clip options a CustomResidualAttentionBlock was built with, read off the modules they add."""
    attn, mlp = block.attn, block.mlp
    present = {
        "qk_norm": not isinstance(getattr(attn, "ln_q", None), nn.Identity | None),
        "scaled_cosine_attn": getattr(attn, "logit_scale", None) is not None,
        "scale_heads": getattr(attn, "head_scale", None) is not None,
        "scale_attn_inner": not isinstance(getattr(attn, "ln_inner", None), nn.Identity | None),
        "scale_attn": not isinstance(getattr(block, "ln_attn", None), nn.Identity | None),
        "scale_fc": not isinstance(getattr(mlp, "ln", None), nn.Identity | None),
    }
    return [name for name, on in present.items() if on] or ["block_type='custom'"]


def _unsupported_block_feature(block: nn.Module) -> str | None:
    """What in one block the adaptive forward would not reproduce, or None."""
    if isinstance(block, CustomResidualAttentionBlock):
        features = ", ".join(_custom_block_features(block))
        return f"custom attention blocks (CustomResidualAttentionBlock: {features})"
    if type(block) is not ResidualAttentionBlock:
        return f"transformer block class {type(block).__name__}"
    if hasattr(block, "ln_1_kv"):
        return "cross-attention blocks (ln_1_kv)"
    attn = block.attn
    if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
        return f"attention module {type(attn).__name__} without a packed in-projection"
    if attn.bias_k is not None or attn.add_zero_attn:
        return "attention with bias_k/bias_v or add_zero_attn"
    if attn.dropout > 0:
        return f"attention dropout {attn.dropout}"
    for name in ("ls_1", "ls_2"):
        if not isinstance(getattr(block, name), LayerScale | nn.Identity):
            return f"{name} of class {type(getattr(block, name)).__name__}"
    return None


def _unsupported_tower_feature(visual: nn.Module) -> str | None:
    """The allow-list of the module docstring: the first feature of `visual` not reproduced, or None."""
    if type(visual) is not VisionTransformer:
        return _OTHER_TOWERS.get(type(visual), f"vision tower class {type(visual).__name__}")
    if visual.attn_pool is not None:
        return "attentional pooling (attn_pool, CoCa-style)"
    if visual.pool_type not in ("tok", "avg"):
        return f"pool_type={visual.pool_type!r}"
    if type(visual.transformer) is not Transformer:
        return f"transformer class {type(visual.transformer).__name__}"
    for block in visual.transformer.resblocks:
        feature = _unsupported_block_feature(block)
        if feature is not None:
            return feature
    return None


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
        self.pixel_stats = (mean, std) if mean is not None and std is not None else None
        feature = _unsupported_tower_feature(visual)
        if feature is not None:
            raise _unsupported(self.model_name, feature)
        self.visual = visual
        self.heads = heads
        self.blocks = list(visual.transformer.resblocks)
        self.depth = len(self.blocks)
        self.width = visual.transformer.width
        self.num_heads = self.blocks[0].attn.num_heads
        grid = visual.grid_size
        self.num_patches = int(grid[0] * grid[1])
        patch = visual.patch_size
        self.patch_dim = 3 * int(patch[0] * patch[1])
        self.mlp_ratio = self.blocks[0].mlp.c_fc.out_features / self.width
        self.embed_dim = int(visual.output_dim)
        # open_clip's _pool: avg towers without final_ln_after_pool normalise every token, then average
        # (for CLS pooling the order is immaterial: LayerNorm acts per token)
        self.norm_before_pool = visual.pool_type == "avg" and not visual.final_ln_after_pool

    # -- one block, split so merging can sit between attention and MLP -----------------------------
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

    def _run_blocks(
        self, state: _State, start: int, stop: int, route: RouteSpec, want_cls: bool, late: bool = True
    ) -> _State:
        """Blocks [start, stop); `late`: these images take the route's late schedule from `late_after`."""
        x, size, gflops = state.x, state.size, state.gflops
        cls_attention = None
        blocks = self._blocks(route)
        for i in range(start, stop):
            block = blocks[i]
            n_attn = x.shape[1]
            r = route.merge_count(n_attn, late and i >= route.late_after)
            # until a merge or prune, every token is one patch and the bias (log 1) is zero: skip it
            merged = n_attn <= self.num_patches
            bias = tok.proportional_attention_bias(size, x.dtype) if merged else None
            attn_out, keys, cls_attention = self._attention(block, x, bias, r > 0, want_cls and i == stop - 1)
            x = x + attn_out
            if r > 0:
                match = (
                    tok.bipartite_soft_matching if route.merge == "tome" else tok.complete_graph_soft_matching
                )
                x, size = match(keys, r).merge(x, size)
                gflops += 2.0 * n_attn * n_attn * keys.shape[-1] / 1e9  # similarity matrix
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
            gflops += block_gflops(self.width, self.mlp_ratio, n_attn, x.shape[1])
        return _State(x, size, gflops, cls_attention)

    def _embed(self, images: torch.Tensor) -> _State:
        """open_clip's own stem (patches, CLS, positions, patch dropout, ln_pre); every token is one patch.
        uint8 pixels [B, H, W, 3] take the folded patch projection (stem.py), then the same steps."""
        visual = self.visual
        if visual.training and isinstance(visual.patch_dropout, PatchDropout):
            raise _unsupported(self.model_name, "patch dropout in training mode (call .eval() on the tower)")
        if images.dtype != torch.uint8:
            x = visual._embeds(images)
        elif self.pixel_stats is None:
            raise ValueError("uint8 pixels need the model's normalisation: AdaptiveViT(..., mean=, std=)")
        else:
            x = patch_embeddings(visual.conv1, images, *self.pixel_stats)
            cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = visual.ln_pre(
                visual.patch_dropout(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))
            )
        stem = stem_gflops(self.width, self.patch_dim, self.num_patches)
        return _State(x, x.new_ones(x.shape[0], x.shape[1], 1), stem)

    def _tail(self, route: RouteSpec) -> nn.Module:
        """What ends `route` at full depth: its tuned tail, or the tower itself (both have ln_post, proj)."""
        return self.heads.tail(route) if route.tuned else self.visual

    def _blocks(self, route: RouteSpec) -> list[nn.Module]:
        """The blocks `route` runs: the tower's, with the tuned tail's copies from the tail's start on
        (looked up once per call of `_run_blocks`, not per block)."""
        if not route.tuned:
            return self.blocks
        tail = self.heads.tail(route)
        return self.blocks[: tail.start] + list(tail.blocks)

    def _tower_head(self, depth: int) -> bool:
        """Whether `depth` is read through the tower's own ln_post + proj (else through its exit head)."""
        return depth == self.depth or self.heads is None

    def _pool(self, state: _State, depth: int, route: RouteSpec) -> torch.Tensor:
        """The token `project(., depth, route)` reads: CLS, or the size-weighted mean of patches for avg
        towers.

        Weighting by size makes the mean over merged tokens equal the mean over the patches they stand for.
        """
        x, size = state.x, state.size
        if self.norm_before_pool and self._tower_head(depth):
            x = self._tail(route).ln_post(x)
        if self.visual.pool_type == "avg":
            return (x[:, 1:] * size[:, 1:]).sum(dim=1) / size[:, 1:].sum(dim=1)
        return x[:, 0]

    def project(self, pooled: torch.Tensor, depth: int, route: RouteSpec) -> torch.Tensor:
        """The final LayerNorm (unless `_pool` applied it) + projection of the tower or of `route`'s tuned
        tail, or the exit head's own."""
        if not self._tower_head(depth):
            return self.heads.project(pooled, depth)
        end = self._tail(route)
        if not self.norm_before_pool:
            pooled = end.ln_post(pooled)
        return pooled @ end.proj if end.proj is not None else pooled

    def route_depth(self, route: RouteSpec) -> int:
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

    def token_budgets(self, state: _State, route: RouteSpec) -> torch.Tensor:
        """Patch tokens to keep per image, rounded up to the quantum so images share few group sizes."""
        n_patches = state.x.shape[1] - 1
        if route.energy_tau is not None:
            budget = tok.energy_token_budget(state.x, route.energy_tau)
        else:
            budget = torch.full(
                (state.x.shape[0],), route.keep_tokens or n_patches, dtype=torch.long, device=state.x.device
            )
        q = BUDGET_QUANTUM
        return ((budget + q - 1) // q * q).clamp(max=n_patches)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, route: RouteSpec) -> RouteOutput:
        """images: normalised float [B, 3, H, W], or uint8 pixels [B, H, W, 3] (with `mean` and `std` set).
        One route for the whole batch."""
        depth = self.route_depth(route)
        pooled, tokens, gflops = self.pooled_tokens(images, route, depth)
        embeddings = F.normalize(self.project(pooled, depth, route), dim=-1)
        return RouteOutput(embeddings, tokens, gflops + head_gflops(self.width, self.embed_dim), depth)

    def exit_tokens(self, images: torch.Tensor, route: RouteSpec, depths: list[int]) -> torch.Tensor:
        """[B, len(depths), C]: the token each exit in `depths` (ascending) reads under `route`.

        One pass through the deepest exit when the route neither prunes nor splits (both group images after
        a block, so those routes run once per depth). Used to train heads on their own tokens.
        """
        if route.prunes or route.splits:
            return torch.stack([self.pooled_tokens(images, route, d)[0] for d in depths], dim=1)
        state, done, pooled = self._embed(images), 0, []
        for depth in depths:
            state = self._run_blocks(state, done, depth, route, want_cls=False)
            pooled.append(self._pool(state, depth, route))
            done = depth
        return torch.stack(pooled, dim=1)

    def tokens_entering(self, images: torch.Tensor, route: RouteSpec, block: int):
        """Tokens [B, n, C] and patch counts [B, n, 1] entering `block` on a route that neither prunes nor
        splits (so every image carries the same count). Tuned tails train on these."""
        state = self._run_blocks(self._embed(images), 0, block, route, want_cls=False)
        return state.x, state.size

    def embed_from(self, x: torch.Tensor, size: torch.Tensor, route: RouteSpec, block: int) -> torch.Tensor:
        """L2-normalised embeddings of `tokens_entering(., route, block)`: the rest of the forward."""
        end = self._run_blocks(_State(x, size, 0.0), block, self.depth, route, want_cls=False)
        return F.normalize(self.project(self._pool(end, self.depth, route), self.depth, route), dim=-1)

    def _prune_groups(self, early: _State, route: RouteSpec) -> Iterator[_Group]:
        """Per token budget: (rows, their pruned tokens, late flag) after `prune_after`."""
        budgets = self.token_budgets(early, route)
        n, c = early.x.shape[1], early.x.shape[2]
        svd = 4.0 * n * c * min(n, c) / 1e9 if route.energy_tau is not None else 0.0
        for keep in budgets.unique().tolist():
            rows = (budgets == keep).nonzero().squeeze(1)
            xg, sg = tok.prune_and_fuse(early.x[rows], early.size[rows], int(keep), early.cls_attention[rows])
            yield rows, _State(xg, sg, early.gflops + svd), True

    def _split_groups(self, early: _State, route: RouteSpec) -> Iterator[_Group]:
        """(rows, tokens, late flag) for the images that switch to the late schedule and those that don't.

        An image switches when the late schedule's merges in block `late_after` would pair tokens at least
        `late_similarity` alike, judged on that block's own keys (head-averaged, as ToMe matches them).
        """
        block = self.blocks[route.late_after]  # a tuned route never splits (RouteSpec refuses it)
        b, n, c = early.x.shape
        w, bias = block.attn.in_proj_weight[c : 2 * c], block.attn.in_proj_bias[c : 2 * c]
        keys = F.linear(block.ln_1(early.x), w, bias).view(b, n, self.num_heads, -1).mean(dim=2)
        alike = tok.match_similarity(keys, route.merge_count(n, late=True))
        gflops = early.gflops + (2.0 * n * c * c + 0.5 * n * n * keys.shape[-1]) / 1e9
        switch = alike >= route.late_similarity
        for late in (True, False):
            rows = (switch == late).nonzero().squeeze(1)
            if len(rows):
                yield rows, _State(early.x[rows], early.size[rows], gflops), late

    def pooled_tokens(self, images: torch.Tensor, route: RouteSpec, depth: int):
        """Run `depth` blocks on the route's token path -> (pooled token [B, C], tokens [B], GFLOPs [B]).

        Separate from the head so exit heads can be trained on exactly the tokens they will read.
        A route that prunes or splits runs its first blocks on the whole batch, then one dense forward
        per group of images sharing a token count.
        """
        start = self._embed(images)
        x = start.x
        b = x.shape[0]
        branch_at = route.prune_after if route.prunes else route.late_after if route.splits else depth
        if branch_at >= depth:
            end = self._run_blocks(start, 0, depth, route, want_cls=False)
            tokens = torch.full((b,), end.x.shape[1], dtype=torch.int32)
            return self._pool(end, depth, route), tokens, torch.full((b,), end.gflops, dtype=torch.float32)
        early = self._run_blocks(start, 0, branch_at, route, want_cls=route.prunes)
        groups = self._prune_groups(early, route) if route.prunes else self._split_groups(early, route)
        pooled = torch.empty(b, x.shape[2], dtype=x.dtype, device=x.device)
        tokens = torch.empty(b, dtype=torch.int32)
        gflops = torch.empty(b, dtype=torch.float32)
        for rows, state, late in groups:
            end = self._run_blocks(state, branch_at, depth, route, want_cls=False, late=late)
            pooled[rows] = self._pool(end, depth, route)
            tokens[rows.cpu()] = end.x.shape[1]
            gflops[rows.cpu()] = end.gflops
        return pooled, tokens, gflops
