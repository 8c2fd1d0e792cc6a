"""The adaptive forward: exact at full depth, honest about compute, and independent of batch grouping."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from icar_lab.training.heads import exit_tokens
from pipeline.config import ModelConfig, RouteSpec
from pipeline.encode.adaptive import AdaptiveViT
from pipeline.encode.flops import block_gflops, full_depth_gflops, head_gflops, stem_gflops
from pipeline.encode.heads import ExitHeads, HeadsMismatchError
from pipeline.encode.model import load_model, register_embedded_models
from pipeline.encode.routed import RoutedEncoder

TOLERANCE = 1e-5  # absolute, on L2-normalised float32 embeddings


@pytest.fixture(scope="module")
def embedded():
    return load_model(ModelConfig())


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_full_route_reproduces_open_clip_vit_b32_with_random_weights():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    x = _images(3, 224)
    with torch.no_grad():
        reference = model.encode_image(x, normalize=True)
    out = AdaptiveViT(model.visual)(x, RouteSpec(name="full"))
    assert (out.embeddings - reference).abs().max() < TOLERANCE
    assert out.tokens.tolist() == [50, 50, 50]


def test_full_route_reproduces_the_embedded_model(embedded):
    x = _images(8, embedded.image_size)
    with torch.no_grad():
        reference = embedded.model.encode_image(x, normalize=True)
    out = AdaptiveViT(embedded.model.visual)(x, RouteSpec(name="full"))
    assert (out.embeddings - reference).abs().max() < TOLERANCE
    register_embedded_models()
    expected = full_depth_gflops(open_clip.get_model_config("icar-tiny-vit"))
    assert out.gflops.tolist() == pytest.approx([expected] * 8, rel=1e-6)


def test_early_exit_is_open_clips_first_blocks_read_by_its_head_and_spends_only_those(embedded):
    visual = embedded.model.visual
    heads = ExitHeads(visual, [4, 6])
    with torch.no_grad():
        heads.projs["4"].add_(0.01)  # a head unlike the tower's own, so reading the wrong one shows
    x = _images(2, embedded.image_size)
    out = AdaptiveViT(visual, heads)(x, RouteSpec(name="d4", exit_depth=4))
    with torch.no_grad():
        tokens = visual._embeds(x)
        for block in visual.transformer.resblocks[:4]:
            tokens = block(tokens)
        reference = F.normalize(heads.norms["4"](tokens[:, 0]) @ heads.projs["4"], dim=-1)
    assert (out.embeddings - reference).abs().max() < TOLERANCE
    expected = stem_gflops(192, 768, 64) + 4 * block_gflops(192, 4.0, 65) + head_gflops(192, 128)
    assert out.exit_depth == 4 and out.gflops.tolist() == pytest.approx([expected] * 2, rel=1e-6)


def test_tome_merges_r_tokens_per_block(embedded):
    vit = AdaptiveViT(embedded.model.visual)
    out = vit(_images(2, embedded.image_size), RouteSpec(name="t", merge="tome", merge_r=3))
    assert out.tokens.tolist() == [65 - 12 * 3] * 2
    full = vit(_images(2, embedded.image_size), RouteSpec(name="full"))
    assert (out.gflops < 0.8 * full.gflops).all()


def test_crossget_route_that_merges_nothing_equals_full(embedded):
    vit = AdaptiveViT(embedded.model.visual)
    x = _images(3, embedded.image_size)
    noop = RouteSpec(name="c0", merge="crossget", merge_r=4, merge_floor=65)  # every block holds <= floor
    assert noop.merge_count(65) == 0
    out, full = vit(x, noop), vit(x, RouteSpec(name="full"))
    assert (out.embeddings - full.embeddings).abs().max() < TOLERANCE
    assert out.tokens.tolist() == full.tokens.tolist() == [65] * 3
    assert out.gflops.tolist() == full.gflops.tolist()


def test_crossget_merges_r_tokens_per_block_and_stays_close_to_full(embedded):
    vit = AdaptiveViT(embedded.model.visual)
    x = _images(8, embedded.image_size)
    route = RouteSpec(name="c3", merge="crossget", merge_r=3)
    out, full = vit(x, route), vit(x, RouteSpec(name="full"))
    attended = [65 - 3 * i for i in range(12)]
    assert [route.merge_count(n) for n in attended] == [3] * 12
    assert out.tokens.tolist() == [65 - 12 * 3] * 8
    expected = (
        stem_gflops(192, 768, 64)
        + sum(block_gflops(192, 4.0, n, n - 3) + 2.0 * n * n * 64 / 1e9 for n in attended)  # + matching
        + head_gflops(192, 128)
    )
    assert out.gflops.tolist() == pytest.approx([expected] * 8, rel=1e-6)
    # Removing 55% of the tokens on noise images (seeded): measured min cosine 0.963, mean 0.989. Merging
    # random pairs instead of similar ones measures 0.938 / 0.968, so these bounds catch a broken matcher.
    cosine = (out.embeddings * full.embeddings).sum(dim=1)
    assert cosine.min() > 0.95 and cosine.mean() > 0.985


def test_front_loaded_schedule_stops_at_its_floor_and_spends_less(embedded):
    vit = AdaptiveViT(embedded.model.visual)
    x = _images(3, embedded.image_size)
    route = RouteSpec(name="s", merge="tome", merge_keep=0.7, merge_floor=16)
    out = vit(x, route)
    assert out.tokens.tolist() == [16] * 3
    # blocks attend over 65, 46, 33, 24, 17 tokens, then 16 for the remaining 7 (merges after attention)
    attended, kept = [65, 46, 33, 24, 17] + [16] * 7, [46, 33, 24, 17, 16] + [16] * 7
    similarity = sum(2.0 * n * n * 64 / 1e9 for n in attended[:5])  # one matching per merging block
    expected = (
        stem_gflops(192, 768, 64)
        + sum(block_gflops(192, 4.0, a, k) for a, k in zip(attended, kept, strict=True))
        + similarity
        + head_gflops(192, 128)
    )
    assert out.gflops.tolist() == pytest.approx([expected] * 3, rel=1e-6)
    one_by_one = torch.cat([vit(x[i : i + 1], route).embeddings for i in range(3)])
    assert torch.allclose(out.embeddings, one_by_one, atol=1e-5)


def test_pruned_batch_equals_each_image_alone(embedded):
    """Grouping a batch by energy budget must not change any image's embedding."""
    vit = AdaptiveViT(embedded.model.visual)
    flat = torch.zeros(1, 3, embedded.image_size, embedded.image_size)
    x = torch.cat([flat, _images(3, embedded.image_size), flat + 0.5])
    route = RouteSpec(name="e", energy_tau=0.9, prune_after=2)
    together = vit(x, route)
    alone = [vit(x[i : i + 1], route) for i in range(len(x))]
    for i, single in enumerate(alone):
        assert torch.allclose(together.embeddings[i], single.embeddings[0], atol=1e-5)
        assert together.tokens[i] == single.tokens[0]
    assert together.tokens[0] < together.tokens[1]  # a flat image keeps fewer tokens than noise


def test_late_schedule_merges_gently_first_then_harder(embedded):
    vit = AdaptiveViT(embedded.model.visual)
    x = _images(2, embedded.image_size)
    gentle = RouteSpec(name="g", merge="tome", merge_keep=0.8, merge_floor=8)
    late = RouteSpec(**{**gentle.model_dump(), "name": "l", "late_keep": 0.65, "late_after": 3})
    # keep 0.8 for blocks 0-2 (65 -> 52 -> 42 -> 34), then 0.65 (34 -> 23 -> 15 -> 10 -> 8)
    assert vit(x, late).tokens.tolist() == [8, 8]
    full = vit(x, RouteSpec(name="full"))
    with torch.no_grad():
        (group,) = vit.run_blocks(vit.stem(x), 0, 12, gentle)
    assert group.x.shape[1] == 8  # the gentle schedule reaches its floor too, but later: it spends more
    assert vit(x, late).gflops[0] < vit(x, gentle).gflops[0] < full.gflops[0]


def test_split_route_sends_each_image_down_the_schedule_its_tokens_allow(embedded):
    """Alike tokens (flat images) switch to the late schedule, busy ones (noise) keep merge_keep; grouping
    the batch must give each image exactly what it gets alone on its schedule."""
    vit = AdaptiveViT(embedded.model.visual)
    flat = torch.full((1, 3, embedded.image_size, embedded.image_size), 0.5)  # match similarity 0.98
    x = torch.cat([flat, _images(3, embedded.image_size), flat])  # noise: 0.49-0.52
    fields = {"merge": "tome", "merge_keep": 0.8, "merge_floor": 8, "late_keep": 0.65, "late_after": 3}
    split = RouteSpec(name="s", late_similarity=0.95, **fields)
    out = vit(x, split)
    switched = RouteSpec(name="late", **fields)
    stayed = RouteSpec(name="gentle", **{k: v for k, v in fields.items() if not k.startswith("late")})
    expected = [switched, stayed, stayed, stayed, switched]
    for i, route in enumerate(expected):
        alone = vit(x[i : i + 1], route)
        assert torch.allclose(out.embeddings[i], alone.embeddings[0], atol=1e-5), (i, route.name)
        assert out.gflops[i] > alone.gflops[0]  # the decision's key projection and matching are charged
    assert vit(x, RouteSpec(name="all", late_similarity=-1.0, **fields)).embeddings.allclose(
        vit(x, switched).embeddings, atol=1e-5
    )


def test_split_route_trains_heads_on_the_tokens_each_image_reads(embedded):
    visual = embedded.model.visual
    vit = AdaptiveViT(visual, ExitHeads(visual, [6]))
    flat = torch.full((1, 3, embedded.image_size, embedded.image_size), 0.5)
    x = torch.cat([flat, _images(2, embedded.image_size)])
    split = RouteSpec(
        name="s",
        merge="tome",
        merge_keep=0.8,
        merge_floor=8,
        late_keep=0.65,
        late_after=3,
        late_similarity=0.95,
    )
    tokens = exit_tokens(vit, x, split, [6, 12])  # one pass: the split happens once, at block 3
    for j, depth in enumerate([6, 12]):
        alone = vit.pool(vit.run_blocks(vit.stem(x), 0, depth, split), depth, split)
        assert torch.allclose(tokens[:, j], alone, atol=1e-6)


def test_routed_encoder_matches_one_route_at_a_time(embedded):
    visual = embedded.model.visual
    heads = ExitHeads(visual, [6])
    routes = [
        RouteSpec(name="d6", exit_depth=6),
        RouteSpec(name="full"),
        RouteSpec(name="t", merge="tome", merge_r=2),
    ]
    encoder = RoutedEncoder(embedded, routes, heads)
    images = np.random.default_rng(0).integers(
        0, 256, (9, embedded.image_size, embedded.image_size, 3), np.uint8
    )
    route_ids = np.array([0, 1, 2, 2, 1, 0, 1, 2, 0], np.int32)
    mixed = encoder.encode(images, route_ids)
    for r in range(3):
        rows = np.flatnonzero(route_ids == r)
        alone = encoder.encode(images[rows], np.full(len(rows), r, np.int32))
        np.testing.assert_allclose(mixed.vectors[rows], alone.vectors, atol=1e-5)
    assert mixed.exit_depth.tolist() == [(6, 12, 12)[r] for r in route_ids]
    assert mixed.tokens.tolist() == [(65, 65, 65 - 12 * 2)[r] for r in route_ids]
    with pytest.raises(TypeError, match="uint8 pixels"):
        encoder.encode(images.astype(np.float32), route_ids)


def test_route_needing_a_missing_exit_head_is_refused_at_start(embedded):
    heads = ExitHeads(embedded.model.visual, [4, 6])
    with pytest.raises(ValueError, match="no exit head at depth 5"):
        RoutedEncoder(embedded, [RouteSpec(name="d5", exit_depth=5)], heads)


def test_heads_round_trip_and_refuse_another_model(embedded, tmp_path):
    visual = embedded.model.visual
    heads = ExitHeads(visual, [4, 8])
    with torch.no_grad():
        heads.projs["4"].add_(0.01)
    path = tmp_path / "heads.safetensors"
    heads.save(path, "icar-tiny-vit:embedded")
    loaded = ExitHeads.load(path, visual)
    pooled = torch.randn(2, 192)
    assert torch.equal(loaded.project(pooled, 4), heads.project(pooled, 4))
    other = load_model(ModelConfig(), pretrained=False).model.visual
    with pytest.raises(HeadsMismatchError, match="trained for model icar-tiny-vit:embedded"):
        ExitHeads.load(path, other)
