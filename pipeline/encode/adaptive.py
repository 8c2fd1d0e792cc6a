"""The adaptive forward: an open_clip VisionTransformer's own weights, run only as deep as a route says.

Modifications against open_clip's `VisionTransformer.forward` (the weights are read, never copied):
- the block loop is ours, so it can stop after `exit_depth` blocks and pool through that depth's exit head;
- attention runs through `scaled_dot_product_attention` on the block's own in/out projections (fused),
  with ToMe's proportional-attention bias once tokens stand for more than one patch;
- patch tokens may be merged between each block's attention and MLP (ToMe / CrossGET), r tokens per block
  or a kept fraction down to a floor (`RouteSpec.merge_count`);
- after `prune_after` blocks, tokens may be pruned to a per-image energy budget (or a fixed count), the
  dropped ones fused into one token; the batch is then split into groups of equal budget so every forward
  stays one dense tensor and saved FLOPs become saved seconds.
Full depth with no reduction reproduces `model.encode_image` (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import RouteSpec
from pipeline.encode import tokens as tok
from pipeline.encode.flops import block_gflops, head_gflops, stem_gflops
from pipeline.encode.heads import ExitHeads


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


def _check_supported(visual: nn.Module) -> None:
    if getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError("attentional-pool vision towers are not supported by the adaptive forward")
    if getattr(visual, "pool_type", "tok") not in ("tok", "avg"):
        raise NotImplementedError(f"pool_type {visual.pool_type!r} is not supported by the adaptive forward")


class AdaptiveViT(nn.Module):
    """Routed forward over `visual` (an open_clip VisionTransformer) with optional exit heads."""

    def __init__(self, visual: nn.Module, heads: ExitHeads | None = None, budget_quantum: int = 8):
        super().__init__()
        _check_supported(visual)
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
        self.budget_quantum = budget_quantum  # budgets round up to a multiple: few groups, dense batches

    # -- one block, split so merging can sit between attention and MLP -----------------------------
    def _attention(self, block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, want_cls: bool):
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
        return block.ls_1(out), k.mean(dim=1), cls_attention

    def _run_blocks(self, state: _State, start: int, stop: int, route: RouteSpec, want_cls: bool) -> _State:
        x, size, gflops = state.x, state.size, state.gflops
        weighted = route.merge != "none" or route.prunes
        cls_attention = None
        for i in range(start, stop):
            block = self.blocks[i]
            n_attn = x.shape[1]
            bias = tok.proportional_attention_bias(size, x.dtype) if weighted else None
            attn_out, keys, cls_attention = self._attention(block, x, bias, want_cls and i == stop - 1)
            x = x + attn_out
            r = route.merge_count(n_attn)
            if r > 0:
                match = (
                    tok.bipartite_soft_matching if route.merge == "tome" else tok.complete_graph_soft_matching
                )
                x, size = match(keys, r).merge(x, size)
                gflops += 2.0 * n_attn * n_attn * keys.shape[-1] / 1e9  # similarity matrix
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
            gflops += block_gflops(self.width, self.mlp_ratio, n_attn, x.shape[1])
        return _State(x, size, gflops, cls_attention)

    def _pool(self, state: _State) -> torch.Tensor:
        """The token the head reads: CLS, or the size-weighted mean of patches for avg-pool towers."""
        x, size = state.x, state.size
        if self.visual.pool_type == "avg":
            return (x[:, 1:] * size[:, 1:]).sum(dim=1) / size[:, 1:].sum(dim=1)
        return x[:, 0]

    def project(self, pooled: torch.Tensor, depth: int) -> torch.Tensor:
        """Final LayerNorm + projection at full depth, the exit head's own at an early exit."""
        if depth == self.depth or self.heads is None:
            pooled = self.visual.ln_post(pooled)
            return pooled @ self.visual.proj if self.visual.proj is not None else pooled
        return self.heads.project(pooled, depth)

    def route_depth(self, route: RouteSpec) -> int:
        depth = route.exit_depth or self.depth
        if depth > self.depth:
            raise ValueError(
                f"route {route.name!r}: exit_depth {depth} exceeds the model's {self.depth} blocks"
            )
        if depth < self.depth and (self.heads is None or depth not in self.heads.depths):
            have = sorted(self.heads.depths) if self.heads else []
            raise ValueError(f"route {route.name!r}: no exit head at depth {depth} (heads at {have})")
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
        q = self.budget_quantum
        return ((budget + q - 1) // q * q).clamp(max=n_patches)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, route: RouteSpec) -> RouteOutput:
        """images: normalised float [B, 3, H, W]. One route for the whole batch."""
        depth = self.route_depth(route)
        pooled, tokens, gflops = self.pooled_tokens(images, route, depth)
        embeddings = F.normalize(self.project(pooled, depth), dim=-1)
        return RouteOutput(embeddings, tokens, gflops + head_gflops(self.width, self.embed_dim), depth)

    def exit_tokens(self, images: torch.Tensor, route: RouteSpec, depths: list[int]) -> torch.Tensor:
        """[B, len(depths), C]: the token each exit in `depths` (ascending) reads under `route`.

        One pass through the deepest exit when the route does not prune (pruning groups images by budget
        after `prune_after`, so pruned routes run once per depth). Used to train heads on their own tokens.
        """
        if route.prunes:
            return torch.stack([self.pooled_tokens(images, route, d)[0] for d in depths], dim=1)
        x = self.visual._embeds(images)
        state, done, pooled = _State(x, x.new_ones(x.shape[0], x.shape[1], 1), 0.0), 0, []
        for depth in depths:
            state = self._run_blocks(state, done, depth, route, want_cls=False)
            pooled.append(self._pool(state))
            done = depth
        return torch.stack(pooled, dim=1)

    def pooled_tokens(self, images: torch.Tensor, route: RouteSpec, depth: int):
        """Run `depth` blocks on the route's token path -> (pooled token [B, C], tokens [B], GFLOPs [B]).

        Separate from the head so exit heads can be trained on exactly the tokens they will read.
        """
        x = self.visual._embeds(images)
        b = x.shape[0]
        stem = stem_gflops(self.width, self.patch_dim, self.num_patches)
        start = _State(x, x.new_ones(b, x.shape[1], 1), stem)
        if not (route.prunes and route.prune_after < depth):
            end = self._run_blocks(start, 0, depth, route, want_cls=False)
            tokens = torch.full((b,), end.x.shape[1], dtype=torch.int32)
            return self._pool(end), tokens, torch.full((b,), end.gflops, dtype=torch.float32)
        early = self._run_blocks(start, 0, route.prune_after, route, want_cls=True)
        budgets = self.token_budgets(early, route)
        n, c = early.x.shape[1], early.x.shape[2]
        svd = 4.0 * n * c * min(n, c) / 1e9 if route.energy_tau is not None else 0.0
        pooled = torch.empty(b, c, dtype=x.dtype, device=x.device)
        tokens = torch.empty(b, dtype=torch.int32)
        gflops = torch.empty(b, dtype=torch.float32)
        for keep in budgets.unique().tolist():
            rows = (budgets == keep).nonzero().squeeze(1)
            xg, sg = tok.prune_and_fuse(early.x[rows], early.size[rows], int(keep), early.cls_attention[rows])
            end = self._run_blocks(_State(xg, sg, early.gflops + svd), route.prune_after, depth, route, False)
            pooled[rows] = self._pool(end)
            tokens[rows.cpu()] = end.x.shape[1]
            gflops[rows.cpu()] = end.gflops
        return pooled, tokens, gflops
