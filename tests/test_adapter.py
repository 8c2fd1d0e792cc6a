"""AdaptiveViT as a checked adapter of open_clip: exact on every tower family it allows, loud on the rest.

Every case builds a shrunken open_clip CLIP (2 blocks of width 32, 32 px images, random weights), so each
case takes milliseconds; the families differ only in the vision_cfg options they exercise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from icar_lab.training.heads import exit_tokens
from pipeline.config import RouteSpec
from pipeline.encode.adaptive import AdaptiveViT
from pipeline.encode.heads import ExitHeads, HeadsMismatchError, token_path_key
from pipeline.encode.model import normalize_uint8
from pipeline.encode.regroup import TokenGroup

TOLERANCE = 1e-5  # absolute, on L2-normalised float32 embeddings (observed: ~2e-7)
TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
VISION_CFG = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2.0}

# family -> (vision_cfg overrides, CLIP kwargs)
SUPPORTED = {
    "vit-gelu": ({}, {}),
    "vit-quickgelu": ({}, {"quick_gelu": True}),
    "vit-layerscale": ({"ls_init_value": 0.5}, {}),  # large enough that a skipped ls_1/ls_2 would show
    "vit-no-ln-pre": ({"no_ln_pre": True}, {}),
    "clipa": ({"no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True}, {}),
    "vit-avg-ln-then-pool": ({"pool_type": "avg"}, {}),  # ln_post on every token, then the mean
    "vit-tok-pool-then-ln": ({"final_ln_after_pool": True}, {}),
    "vit-sincos": ({"pos_embed_type": "sin_cos_2d"}, {}),
    "vit-non-square": ({"image_size": (32, 48)}, {}),
    "vit-output-tokens": ({"output_tokens": True}, {}),
    "vit-patch-dropout-eval": ({"patch_dropout": 0.5}, {}),
    "vit-act-norm-kwargs": ({"act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6}}, {}),
}

# family -> (vision_cfg overrides, words the refusal must contain besides the model name)
REFUSED = {
    "timm": ({"timm_model_name": "test_vit", "timm_proj": "linear"}, ["timm", "TimmModel"]),
    "resnet": ({"layers": (1, 1, 1, 1), "width": 8}, ["ResNet", "ModifiedResNet"]),
    "coca": ({"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2}, ["attn_pool"]),
    "pool-none": ({"pool_type": "none"}, ["pool_type='none'"]),
    # custom blocks: the message lists exactly the options detected from the modules they add
    "qk-norm": ({"qk_norm": True}, ["(CustomResidualAttentionBlock: qk_norm)"]),
    "scaled-cosine": ({"scaled_cosine_attn": True}, ["(CustomResidualAttentionBlock: scaled_cosine_attn)"]),
    "scale-heads": ({"scale_heads": True}, ["(CustomResidualAttentionBlock: scale_heads)"]),
    "scale-attn-inner": ({"scale_attn_inner": True}, ["(CustomResidualAttentionBlock: scale_attn_inner)"]),
    "scale-attn": ({"scale_attn": True}, ["(CustomResidualAttentionBlock: scale_attn)"]),
    "scale-fc": ({"scale_fc": True}, ["(CustomResidualAttentionBlock: scale_fc)"]),
    "qk-norm+scale-fc": (
        {"qk_norm": True, "scale_fc": True},
        ["(CustomResidualAttentionBlock: qk_norm, scale_fc)"],
    ),
    "custom-block": ({"block_type": "custom"}, ["(CustomResidualAttentionBlock: block_type='custom')"]),
}


def _model(vision: dict, **kwargs) -> CLIP:
    """Random weights; LayerNorms get random affines too, since a unit-weight, zero-bias LayerNorm is
    nearly idempotent and would hide one applied twice (or in the wrong place)."""
    torch.manual_seed(0)
    model = CLIP(16, {**VISION_CFG, **vision}, TEXT_CFG, **kwargs).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
    return model


def _images(visual: torch.nn.Module, n: int = 3) -> torch.Tensor:
    height, width = visual.image_size
    return torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", sorted(SUPPORTED))
def test_full_route_reproduces_encode_image(family):
    vision, kwargs = SUPPORTED[family]
    model = _model(vision, **kwargs)
    x = _images(model.visual)
    with torch.no_grad():
        if model.visual.output_tokens:  # encode_image cannot normalise the (pooled, tokens) pair it returns
            reference = F.normalize(model.visual(x)[0], dim=-1)
        else:
            reference = model.encode_image(x, normalize=True)
    out = AdaptiveViT(model.visual, model_name=family)(x, RouteSpec(name="full"))
    assert (out.embeddings - reference).abs().max() < TOLERANCE
    grid = model.visual.grid_size
    assert out.tokens.tolist() == [grid[0] * grid[1] + 1] * len(x)


@pytest.mark.parametrize("family", sorted(SUPPORTED))
def test_uint8_pixels_through_the_folded_stem_reproduce_encode_image_of_the_normalised_batch(family):
    vision, kwargs = SUPPORTED[family]
    model = _model(vision, **kwargs)
    height, width = model.visual.image_size
    pixels = torch.randint(
        0, 256, (3, height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    mean, std = (0.2, 0.5, 0.7), (0.3, 0.1, 0.25)  # far from the defaults: a dropped or swapped one shows
    with torch.no_grad():
        pooled = model.visual(normalize_uint8(pixels, mean, std))
        reference = F.normalize(pooled[0] if model.visual.output_tokens else pooled, dim=-1)
    vit = AdaptiveViT(model.visual, model_name=family, mean=mean, std=std)
    assert (vit(pixels, RouteSpec(name="full")).embeddings - reference).abs().max() < TOLERANCE
    with pytest.raises(ValueError, match="normalisation"):
        AdaptiveViT(model.visual, model_name=family)(pixels, RouteSpec(name="full"))
    with pytest.raises(ValueError, match=f"pixels {height + 4}x{width} are not whole 8x8 patches"):
        vit(torch.zeros(1, height + 4, width, 3, dtype=torch.uint8), RouteSpec(name="full"))


def test_pooling_order_matters_so_the_equivalence_test_can_fail():
    """On an avg tower, LayerNorm-then-mean and mean-then-LayerNorm differ far beyond the tolerance."""
    model = _model(SUPPORTED["vit-avg-ln-then-pool"][0])
    x = _images(model.visual)
    with torch.no_grad():
        tokens = model.visual.transformer(model.visual._embeds(x))[:, 1:]
        ln_first = F.normalize(model.visual.ln_post(tokens).mean(dim=1) @ model.visual.proj, dim=-1)
        pool_first = F.normalize(model.visual.ln_post(tokens.mean(dim=1)) @ model.visual.proj, dim=-1)
    assert (ln_first - model.encode_image(x, normalize=True)).abs().max() < TOLERANCE
    assert (ln_first - pool_first).abs().max() > 100 * TOLERANCE


@pytest.mark.parametrize("family", ["vit-gelu", "clipa", "vit-avg-ln-then-pool"])
def test_exit_tokens_through_project_equal_the_forward_on_a_merging_route(family):
    """Heads are trained on exit_tokens + project: at an exit head and at full depth (where the tower's
    LayerNorm sits before or after pooling) that must be exactly the embedding the forward returns."""
    model = _model(SUPPORTED[family][0])
    vit = AdaptiveViT(model.visual, ExitHeads(model.visual, [1]), model_name=family)
    x = _images(model.visual)
    with torch.no_grad():
        tokens = exit_tokens(vit, x, RouteSpec(name="t", merge="tome", merge_r=2), [1, 2])
    for j, depth in enumerate([1, 2]):
        route = RouteSpec(name="t", merge="tome", merge_r=2, exit_depth=depth)
        with torch.no_grad():
            via_tokens = F.normalize(vit.project(tokens[:, j], depth, route), dim=-1)
        assert (via_tokens - vit(x, route).embeddings).abs().max() < TOLERANCE


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_unsupported_tower_is_refused_naming_model_and_feature(family):
    vision, words = REFUSED[family]
    visual = _model(vision).visual
    with pytest.raises(NotImplementedError) as info:
        AdaptiveViT(visual, model_name=f"tiny-{family}")
    message = str(info.value)
    assert f"'tiny-{family}'" in message
    for word in words:
        assert word in message, message


def test_default_model_name_is_the_tower_class():
    with pytest.raises(NotImplementedError, match="model 'TimmModel' uses a timm vision tower"):
        AdaptiveViT(_model(REFUSED["timm"][0]).visual)


def test_patch_dropout_in_training_mode_is_refused_at_forward():
    model = _model({"patch_dropout": 0.5})
    vit = AdaptiveViT(model.visual, model_name="tiny-dropout")
    model.visual.train()
    with pytest.raises(NotImplementedError, match="'tiny-dropout' uses patch dropout in training mode"):
        vit(_images(model.visual), RouteSpec(name="full"))


TUNED = RouteSpec(name="tuned", merge="tome", merge_keep=0.75, tuned=True)


@pytest.mark.parametrize("family", ["vit-gelu", "clipa", "vit-avg-ln-then-pool"])
def test_a_tuned_route_runs_its_tail_and_an_untouched_tail_changes_nothing(family):
    """A fresh tail is a copy of the tower's end, so the tuned route equals the plain merging route;
    once the tail's weights move, only the tuned route moves with them."""
    model = _model(SUPPORTED[family][0])
    heads = ExitHeads(model.visual, [])
    tail = heads.add_tail(model.visual, token_path_key(TUNED), start=1)
    vit = AdaptiveViT(model.visual, heads, model_name=family)
    x = _images(model.visual)
    untuned = TUNED.model_copy(update={"tuned": False})
    before = vit(x, untuned).embeddings
    assert (vit(x, TUNED).embeddings - before).abs().max() < TOLERANCE
    with torch.no_grad():
        tail.blocks[0].mlp.c_fc.weight.mul_(1.5)  # the tail's block runs
        moved = vit(x, TUNED).embeddings
        assert (moved - before).abs().max() > 0.01
        tail.proj.mul_(-1)  # and the tail's projection
        assert (vit(x, TUNED).embeddings + moved).abs().max() < TOLERANCE
    assert torch.equal(vit(x, untuned).embeddings, before)
    with torch.no_grad():  # the tail trains on the tokens entering its first block, run from there on
        (entering,) = vit.run_blocks(vit.stem(x), 0, 1, untuned)
        groups = vit.run_blocks([TokenGroup.whole(entering.x, entering.size)], 1, 2, TUNED)
        resumed = F.normalize(vit.project(vit.pool(groups, 2, TUNED), 2, TUNED), dim=-1)
    assert (resumed - vit(x, TUNED).embeddings).abs().max() < TOLERANCE


def test_tails_survive_a_save_and_load_at_half_precision_and_stay_bound_to_their_model(tmp_path):
    model = _model({})
    heads = ExitHeads(model.visual, [1])
    tail = heads.add_tail(model.visual, token_path_key(TUNED), start=1)
    with torch.no_grad():
        tail.proj.add_(0.01)
    path = tmp_path / "heads.safetensors"
    heads.save(path, "m")
    loaded = ExitHeads.load(path, model.visual)
    assert loaded.tail_paths == heads.tail_paths and loaded.tail(TUNED).start == 1
    assert loaded.tail(TUNED).proj.dtype == torch.float32
    assert (loaded.tail(TUNED).proj - tail.proj).abs().max() < 1e-3  # float16 on disk
    assert loaded.tail(TUNED.model_copy(update={"merge_keep": 0.8})) is None
    other = _model({})
    with torch.no_grad():
        other.visual.conv1.weight.add_(1.0)
    with pytest.raises(HeadsMismatchError):
        ExitHeads.load(path, other.visual)


def test_a_tuned_route_without_its_tail_is_refused_at_start_up():
    model = _model({})
    for heads in (None, ExitHeads(model.visual, [])):
        with pytest.raises(ValueError, match="tuned, but the heads have no tail.*train_tails.py"):
            AdaptiveViT(model.visual, heads).route_depth(TUNED)
    for bad in (
        {"exit_depth": 1},
        {"merge": "none", "merge_keep": None},
        {"late_keep": 0.6, "late_after": 1, "late_similarity": 0.5},
    ):
        with pytest.raises(ValueError, match="tuned tails serve full-depth routes"):
            RouteSpec(**{**TUNED.model_dump(), **bad})
