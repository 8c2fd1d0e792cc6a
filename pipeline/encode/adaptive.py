"""The adaptive forward: an open_clip VisionTransformer's own weights, run only as deep as a route says.

Modifications against open_clip's `VisionTransformer.forward` (the weights are read, never copied):
- the block loop is ours, so it can stop after `exit_depth` blocks and pool through that depth's exit head;
- attention runs through `scaled_dot_product_attention` on the block's own in/out projections, so it is
  fused and can take ToMe's proportional-attention bias;
- the patch tokens may be merged after each block's attention (ToMe / CrossGET) and pruned to a per-image
  energy budget; batches are re-grouped after pruning so every forward stays rectangular.
Full depth with no reduction reproduces `model.encode_image` (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import RouteSpec
from pipeline.encode import tokens as tok
from pipeline.encode.flops import vit_gflops
from pipeline.encode.heads import ExitHeads


@dataclass
class RouteOutput:
    embeddings: torch.Tensor  # [B, D] L2-normalised
    tokens: torch.Tensor  # [B] tokens alive in the last block run (CLS included)
    gflops: torch.Tensor  # [B] analytic GFLOPs actually spent on each image
    exit_depth: int


def _check_supported(visual: nn.Module) -> None:
    if getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError("attentional-pool vision towers are not supported by the adaptive forward")
    if getattr(visual, "pool_type", "tok") not in ("tok", "avg"):
        raise NotImplementedError(f"pool_type {visual.pool_type!r} is not supported by the adaptive forward")


class AdaptiveViT(nn.Module):
    """Routed forward over `visual` (an open_clip VisionTransformer) with optional exit heads."""

    def __init__(self, visual: nn.Module, heads: ExitHeads | None = None):
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

    # -- one block, split so token reduction can sit between attention and MLP ------------------
    def _attention(self, block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None):
        attn: nn.MultiheadAttention = block.attn
        b, n, d = x.shape
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = F.linear(out.transpose(1, 2).reshape(b, n, d), attn.out_proj.weight, attn.out_proj.bias)
        return block.ls_1(out), k.mean(dim=1)

    def _mlp(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def _pool(self, x: torch.Tensor, size: torch.Tensor, depth: int) -> torch.Tensor:
        visual = self.visual
        if visual.pool_type == "avg":
            patches, weights = x[:, 1:], size[:, 1:]
            pooled = (patches * weights).sum(dim=1) / weights.sum(dim=1)
        else:
            pooled = x[:, 0]
        if depth == self.depth or self.heads is None:
            pooled = visual.ln_post(pooled)
            return pooled @ visual.proj if visual.proj is not None else pooled
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

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, route: RouteSpec) -> RouteOutput:
        """images: normalised float [B, 3, H, W]. One route for the whole batch."""
        depth = self.route_depth(route)
        x = self.visual._embeds(images)
        b = x.shape[0]
        size = torch.ones(b, x.shape[1], 1, dtype=x.dtype)
        tokens_per_block: list[int] = []
        proportional = route.merge != "none"
        for block in self.blocks[:depth]:
            tokens_per_block.append(x.shape[1])
            bias = tok.proportional_attention_bias(size) if proportional else None
            attn_out, keys = self._attention(block, x, bias)
            x = x + attn_out
            if route.merge != "none" and route.merge_r > 0:
                match = (
                    tok.bipartite_soft_matching if route.merge == "tome" else tok.complete_graph_soft_matching
                )
                x, size = match(keys, route.merge_r).merge(x, size)
            x = self._mlp(block, x)
        pooled = self._pool(x, size, depth)
        gflops = vit_gflops(
            self.width, self.patch_dim, self.num_patches, tokens_per_block, self.mlp_ratio, self.embed_dim
        )
        return RouteOutput(
            embeddings=F.normalize(pooled, dim=-1),
            tokens=torch.full((b,), x.shape[1], dtype=torch.int32),
            gflops=torch.full((b,), gflops, dtype=torch.float32),
            exit_depth=depth,
        )
