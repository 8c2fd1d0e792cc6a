"""Analytic FLOPs of an open_clip ViT forward. Convention: one multiply-add = 2 FLOPs."""

from __future__ import annotations

from collections.abc import Sequence


def vit_gflops(
    width: int,
    patch_dim: int,
    num_patches: int,
    tokens_per_block: Sequence[int],
    mlp_ratio: float,
    embed_dim: int,
) -> float:
    """GFLOPs of patch embedding + the blocks actually run (tokens entering each) + the output projection.

    Per block with n tokens of width d: qkv and output projections 4·n·d², MLP 2·r·n·d², attention
    scores and weighted sum 2·n²·d multiply-adds.
    """
    macs = num_patches * patch_dim * width
    for n in tokens_per_block:
        macs += 4 * n * width**2 + 2 * mlp_ratio * n * width**2 + 2 * n * n * width
    macs += width * embed_dim
    return 2.0 * macs / 1e9


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def full_depth_gflops(model_cfg: dict) -> float:
    """GFLOPs of an open_clip model config's vision tower at full depth, no token reduction."""
    vision = model_cfg["vision_cfg"]
    image, patch = _pair(vision["image_size"]), _pair(vision["patch_size"])
    num_patches = (image[0] // patch[0]) * (image[1] // patch[1])
    return vit_gflops(
        width=vision["width"],
        patch_dim=3 * patch[0] * patch[1],
        num_patches=num_patches,
        tokens_per_block=[num_patches + 1] * vision["layers"],
        mlp_ratio=vision.get("mlp_ratio", 4.0),
        embed_dim=model_cfg["embed_dim"],
    )
