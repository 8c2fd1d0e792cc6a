"""The quality harness: metrics with known answers, the held-out set, the trained model vs random init,
a written table scored against its corpus, and the corpus writer."""

from __future__ import annotations

import json

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scripts import load_script

from icar_lab.embed import embed_texts
from icar_lab.heldout import load_heldout
from icar_lab.quality import (
    LEVELS,
    evaluate_embeddings,
    evaluate_encoder,
    evaluate_table,
    reports_markdown,
)
from icar_lab.sample import CaptionedSample
from icar_lab.scenes.render import make_example
from icar_lab.scenes.shards import SHARD_SCHEMA
from icar_lab.scenes.splits import CALIB, TEST
from pipeline.config import ModelConfig, RouteSpec, load_config
from pipeline.decode import decode_image
from pipeline.encode.model import load_model
from pipeline.encode.routed import RoutedEncoder
from pipeline.write.schema import images_schema

HELDOUT_IMAGES = 300


def make_corpus(argv: list[str]) -> int:
    return load_script("jobs/make_corpus.py").main(argv)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on this 2-core box (shared with training) more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fake_heldout(keys: list[str], levels: list[str]) -> CaptionedSample:
    """Ground truth without pixels: the metric functions only read keys and levels."""
    n = len(keys)
    return CaptionedSample(
        images=np.zeros((n, 1, 1, 3), np.uint8),
        captions=[f"caption {k}" for k in keys],
        keys=list(keys),
        bytes_per_pixel=np.zeros(n, np.float32),
        key_source="scene_key",
        complexity_level=np.asarray(levels),
    )


def random_unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def cycle_levels(n: int) -> list[str]:
    return [LEVELS[i % 3] for i in range(n)]


# -- metrics on constructed embeddings ----------------------------------------------------------------
def test_identical_image_and_text_embeddings_give_perfect_recall():
    n = 200
    emb = random_unit(n, 32, 0)
    report = evaluate_embeddings(emb, emb.clone(), fake_heldout([f"k{i}" for i in range(n)], cycle_levels(n)))
    assert report.t2i == {1: 1.0, 5: 1.0, 10: 1.0}
    assert report.i2t == {1: 1.0, 5: 1.0, 10: 1.0}
    assert all(s.t2i[1] == 1.0 and s.i2t[1] == 1.0 for s in report.by_level.values())


def test_any_image_with_the_query_scene_key_is_a_hit():
    # text i sits exactly on image i^1, which shows the same scene (same key) but is a different row
    n = 100
    images = random_unit(n, 32, 1)
    texts = images[torch.arange(n) ^ 1]
    keys = [f"k{i // 2}" for i in range(n)]
    report = evaluate_embeddings(images, texts, fake_heldout(keys, cycle_levels(n)))
    assert report.t2i[1] == 1.0 and report.i2t[1] == 1.0
    # the same embeddings with every row its own scene: that neighbour is now a miss
    unique = evaluate_embeddings(images, texts, fake_heldout([f"u{i}" for i in range(n)], cycle_levels(n)))
    assert unique.t2i[1] == 0.0


def test_shuffled_gallery_is_at_chance_level():
    n = 1000
    images = random_unit(n, 64, 2)
    texts = images[torch.randperm(n, generator=torch.Generator().manual_seed(3))]
    report = evaluate_embeddings(images, texts, fake_heldout([f"k{i}" for i in range(n)], cycle_levels(n)))
    # chance with one correct image among n is k/n: 0.001 / 0.01 at k = 1 / 10
    assert report.t2i[1] <= 0.005 and report.t2i[10] <= 0.03
    assert report.i2t[10] <= 0.03


def test_level_breakdown_partitions_the_queries():
    n = 301
    rng = np.random.default_rng(0)
    levels = rng.choice(LEVELS, size=n, p=[0.2, 0.5, 0.3]).tolist()
    keys = [f"k{i}" for i in rng.integers(0, 120, size=n)]
    images = random_unit(n, 16, 4)
    texts = torch.nn.functional.normalize(images + 0.6 * random_unit(n, 16, 5), dim=1)
    report = evaluate_embeddings(images, texts, fake_heldout(keys, levels))
    assert list(report.by_level) == list(LEVELS)
    assert [s.count for s in report.by_level.values()] == [levels.count(lv) for lv in LEVELS]
    assert sum(s.count for s in report.by_level.values()) == report.overall.count == n
    # every level queries the full gallery, so the overall recall is the count-weighted mean of the levels
    for direction in ("t2i", "i2t"):
        for k in (1, 5, 10):
            weighted = sum(getattr(s, direction)[k] * s.count for s in report.by_level.values()) / n
            assert getattr(report.overall, direction)[k] == pytest.approx(weighted, abs=1e-6)
    assert 0.0 < report.t2i[1] < 1.0


def test_reference_identical_embeddings_give_cosine_one_and_full_overlap():
    n = 120
    emb = random_unit(n, 32, 6)
    heldout = fake_heldout([f"k{i}" for i in range(n)], cycle_levels(n))
    same = evaluate_embeddings(emb, emb, heldout, reference=emb.numpy().copy())
    assert same.overall.ref_cosine == pytest.approx(1.0, abs=1e-5)
    assert same.overall.neighbour_overlap == pytest.approx(1.0)
    for s in same.by_level.values():
        assert s.ref_cosine == pytest.approx(1.0, abs=1e-5) and s.neighbour_overlap == pytest.approx(1.0)
    moved = evaluate_embeddings(emb, emb, heldout, reference=emb + 0.5 * random_unit(n, 32, 7))
    assert moved.overall.ref_cosine < 0.99 and moved.overall.neighbour_overlap < 1.0
    no_ref = evaluate_embeddings(emb, emb, heldout)
    assert no_ref.overall.ref_cosine is None and no_ref.overall.neighbour_overlap is None


def test_report_serialises_to_json_and_markdown():
    n = 60
    emb = random_unit(n, 16, 8)
    report = evaluate_embeddings(
        emb, emb, fake_heldout([f"k{i}" for i in range(n)], ["low"] * n), reference=emb, name="x"
    )
    report.gflops_per_image = 0.75
    data = json.loads(json.dumps(report.to_dict()))
    assert data["t2i_R@10"] == 1.0 and data["by_level"]["low"]["count"] == n
    assert data["by_level"]["high"] == {
        "count": 0,
        **{f"{d}_R@{k}": None for d in ("t2i", "i2t") for k in (1, 5, 10)},
        "ref_cosine": None,
        "neighbour_overlap": None,
    }
    markdown = report.to_markdown()
    assert "| all | 60 |" in markdown and "| high | 0 |" in markdown and "0.750 GFLOPs/image" in markdown
    assert reports_markdown([report]).count("\n") == 2


def test_mismatched_lengths_are_refused():
    emb = random_unit(20, 8, 9)
    with pytest.raises(ValueError, match="20 image / 19 text"):
        evaluate_embeddings(emb, emb[:19], fake_heldout([f"k{i}" for i in range(20)], cycle_levels(20)))


# -- held-out set -------------------------------------------------------------------------------------
def test_heldout_is_the_pipeline_pixels_and_the_cache_round_trips(tmp_path):
    rendered = load_heldout(TEST, count=12, image_size=64, cache_dir=tmp_path)
    assert rendered.images.shape == (12, 64, 64, 3) and rendered.images.dtype == np.uint8
    scene, data, _ = make_example(0, TEST, 5)
    np.testing.assert_array_equal(rendered.images[5], decode_image(data, 64)[0])
    assert rendered.captions[5] == scene.caption and rendered.keys[5] == scene.scene_key
    assert rendered.complexity_level[5] == scene.complexity_level
    assert rendered.object_count[5] == scene.object_count and rendered.background[5] == scene.background
    assert len(list(tmp_path.glob("*.npz"))) == 1
    cached = load_heldout(TEST, count=12, image_size=64, cache_dir=tmp_path)
    np.testing.assert_array_equal(cached.images, rendered.images)
    assert cached.captions == rendered.captions and cached.keys == rendered.keys
    assert cached.split == rendered.split == TEST
    np.testing.assert_array_equal(cached.complexity_level, rendered.complexity_level)
    other_split = load_heldout(CALIB, count=12, image_size=64, cache_dir=tmp_path)
    assert other_split.captions != rendered.captions and len(list(tmp_path.glob("*.npz"))) == 2


# -- real models ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def heldout() -> CaptionedSample:
    return load_heldout(TEST, count=HELDOUT_IMAGES, image_size=128)


@pytest.fixture(scope="module")
def trained():
    return load_model(ModelConfig())


def test_trained_model_retrieves_well_and_random_init_does_not(heldout, trained):
    report = evaluate_encoder(RoutedEncoder(trained, [RouteSpec(name="full")]), heldout, name="trained")
    torch.manual_seed(0)
    random_model = load_model(ModelConfig(), pretrained=False)
    baseline = evaluate_encoder(RoutedEncoder(random_model, [RouteSpec(name="full")]), heldout, name="random")
    print("\n" + reports_markdown([report, baseline]))
    assert report.t2i[10] >= 0.9 and report.i2t[10] >= 0.9  # measured 0.956 / 0.925 on 2000 scenes
    assert baseline.t2i[10] < 0.3 and baseline.i2t[10] < 0.3
    assert report.gflops_per_image == pytest.approx(baseline.gflops_per_image) and report.gflops_per_image > 0
    assert report.extra["routes"] == {"full": HELDOUT_IMAGES}


def test_route_ids_split_the_batch_and_reference_is_compared(trained):
    small = load_heldout(TEST, count=40, image_size=128)
    encoder = RoutedEncoder(trained, [RouteSpec(name="a"), RouteSpec(name="b")])
    full = encoder.encode(small.images, np.zeros(40, np.int64)).vectors
    routed = evaluate_encoder(encoder, small, route_ids=np.arange(40) % 2, reference=full, batch_size=16)
    assert routed.extra["routes"] == {"a": 20, "b": 20}
    assert routed.overall.ref_cosine == pytest.approx(1.0, abs=1e-5)
    assert routed.overall.neighbour_overlap == pytest.approx(1.0)


# -- written tables and the corpus writer --------------------------------------------------------------
def test_make_corpus_writes_readable_shards(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert (
        make_corpus(
            ["--out", str(out), "--seed", "3", "--split", "demo", "--images", "10", "--shard-size", "4"]
        )
        == 0
    )
    paths = sorted(out.glob("*.parquet"))
    assert [p.name for p in paths] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    tables = [pq.read_table(p) for p in paths]
    assert [t.num_rows for t in tables] == [4, 4, 2]
    assert all(t.schema.names == SHARD_SCHEMA.names for t in tables)
    levels = sum((t.column("complexity_level").to_pylist() for t in tables), [])
    assert set(levels) <= set(LEVELS)
    printed = capsys.readouterr().out
    assert "wrote 10 scenes" in printed and "complexity_level:" in printed and "background:" in printed


def test_evaluate_table_joins_ids_to_the_corpus_ground_truth(tmp_path, trained):
    corpus = tmp_path / "corpus"
    make_corpus(["--out", str(corpus), "--images", "30", "--shard-size", "12"])
    rows = []
    for path in sorted(corpus.glob("*.parquet")):
        for row in pq.read_table(path, columns=["key", "url", "caption"]).to_pylist():
            rows.append({"id": f"{path.name}/{row['key']}", "shard": str(path), **row})
    # vectors = the caption's own text embedding, so text->image must be perfect if the join is right
    vectors = embed_texts(trained, [r["caption"] for r in rows]).numpy()
    stray = {"id": "elsewhere.parquet/x", "shard": "elsewhere.parquet", "key": "x", "url": "", "caption": "?"}
    records = [
        {
            **r,
            "vector": v.tolist(),
            "complexity": 0.5,
            "route": "full",
            "exit_depth": 12,
            "tokens": 65,
            "gflops": 0.75,
            "model_id": "icar-tiny-vit:embedded",
        }  # fmt: skip
        for r, v in zip([*rows, stray], [*vectors, vectors[0]], strict=True)
    ]
    uri = str(tmp_path / "lance")
    lancedb.connect(uri).create_table(
        "images", pa.Table.from_pylist(records, schema=images_schema(128, "float32"))
    )
    cfg = load_config(None, [f"input.paths={[str(corpus)]!r}", f"output.uri={uri}"])
    report = evaluate_table(cfg, loaded=trained)
    assert report.overall.count == 30 and sum(s.count for s in report.by_level.values()) == 30
    assert report.t2i == {1: 1.0, 5: 1.0, 10: 1.0}
    assert report.gflops_per_image == pytest.approx(0.75)
    # explicit shard files give the same join
    again = evaluate_table(cfg, shard_paths=sorted(corpus.glob("*.parquet")), loaded=trained)
    assert again.overall.count == 30
    wrong = cfg.model_copy(update={"model": ModelConfig(pretrained="other.safetensors")})
    with pytest.raises(ValueError, match="holds vectors of"):
        evaluate_table(wrong, loaded=trained)
