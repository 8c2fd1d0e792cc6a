"""The towers the adaptive forward reproduces: an allow-list, checked before any forward runs.

Supported: open_clip `VisionTransformer` whose blocks are plain `ResidualAttentionBlock`s over a
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

from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import (
    CustomResidualAttentionBlock,
    LayerScale,
    ResidualAttentionBlock,
    Transformer,
    VisionTransformer,
)
from torch import nn

_OTHER_TOWERS = {
    TimmModel: "a timm vision tower (open_clip TimmModel)",
    ModifiedResNet: "a ResNet vision tower (open_clip ModifiedResNet with attnpool)",
}


def unsupported(model_name: str, feature: str) -> NotImplementedError:
    """The refusal of a tower (or of one forward) that uses `feature`, naming the model."""
    return NotImplementedError(
        f"model {model_name!r} uses {feature}, which the adaptive forward does not reproduce "
        "(supported towers: pipeline/encode/towers.py)"
    )


def refuse_unsupported(visual: nn.Module, model_name: str) -> None:
    """Raise `unsupported` for the first feature of `visual` the adaptive forward does not reproduce."""
    feature = _unsupported_tower_feature(visual)
    if feature is not None:
        raise unsupported(model_name, feature)


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
    # a packed in-projection: nn.MultiheadAttention keeps separate q/k/v weights (and no in_proj_weight)
    # when the key or value width differs from the query's
    if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
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
