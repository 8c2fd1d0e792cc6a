"""Analytic FLOPs of an open_clip ViT forward. Convention: one multiply-add = 2 FLOPs."""

from __future__ import annotations

from collections.abc import Sequence


def block_gflops(width: int, mlp_ratio: float, n_attn: int, n_mlp: int | None = None) -> float:
    """One block: qkv + output projections and attention on `n_attn` tokens, the MLP on `n_mlp` tokens
    (fewer when tokens are merged between attention and MLP)."""
    n_mlp = n_attn if n_mlp is None else n_mlp
    macs = 4 * n_attn * width**2 + 2 * n_attn * n_attn * width + 2 * mlp_ratio * n_mlp * width**2
    return 2.0 * macs / 1e9


def stem_gflops(width: int, patch_dim: int, num_patches: int) -> float:
    return 2.0 * num_patches * patch_dim * width / 1e9


def head_gflops(width: int, embed_dim: int) -> float:
    return 2.0 * width * embed_dim / 1e9


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def full_depth_gflops(model_cfg: dict) -> float:
    """GFLOPs of an open_clip model config's vision tower at full depth, no token reduction."""
    vision = model_cfg["vision_cfg"]
    image, patch = _pair(vision["image_size"]), _pair(vision["patch_size"])
    num_patches = (image[0] // patch[0]) * (image[1] // patch[1])
    width, mlp = vision["width"], vision.get("mlp_ratio", 4.0)
    blocks = vision["layers"] * block_gflops(width, mlp, num_patches + 1)
    stem = stem_gflops(width, 3 * patch[0] * patch[1], num_patches)
    return stem + blocks + head_gflops(width, model_cfg["embed_dim"])


def similarity_gflops(tokens: int, dim: int) -> float:
    """The token-similarity matrix a merge matches on (`tokens` keys of width `dim`)."""
    return 2.0 * tokens * tokens * dim / 1e9


def svd_gflops(tokens: int, width: int) -> float:
    """The singular values an energy budget reads (a dense SVD of the token matrix)."""
    return 4.0 * tokens * width * min(tokens, width) / 1e9


def split_gflops(tokens: int, width: int, dim: int) -> float:
    """A per-image schedule choice: one block's key projection and a bipartite match of the keys."""
    return (2.0 * tokens * width * width + 0.5 * tokens * tokens * dim) / 1e9
