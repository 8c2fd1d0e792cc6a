"""`icar calibrate` end to end at toy size: on scene shards (scene_key as the match key) and on a
non-scene captioned shard with other column names (caption text as the match key). The written YAML loads
as an index config, names catalogue routes, and the chosen router meets the floor on the data when
re-run the way the job runs it; nothing is written inside the package."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from icar_lab.calibrate import fit_test_split
from icar_lab.catalogue import FULL, calibration_routes, spec_key
from icar_lab.outputs import PACKAGE_DIR
from icar_lab.sample import read_captioned
from icar_lab.scenes.shards import write_corpus
from icar_lab.scenes.splits import CALIB, TEST
from icar_lab.speed import route_images
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.encode.routed import RoutedEncoder
from pipeline.score import load_scorer

TOY = ["--images", "24", "--timing-images", "8", "--rounds", "1", "--batch-size", "24", "--threads", "2"]
COLOURS = {"red": (220, 30, 30), "green": (40, 170, 50), "blue": (30, 60, 220)}
SHAPES = ("circle", "square")
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10)}


def package_models() -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (PACKAGE_DIR / "models").iterdir()}


def drawing(colour: str, shape: str, background: str, shift: int) -> bytes:
    """A 96x80 PNG: one shape on a flat background, moved by `shift` pixels (same caption, new image)."""
    image = Image.new("RGB", (96, 80), BACKGROUNDS[background])
    box = (20 + shift, 15 + shift // 2, 60 + shift, 55 + shift // 2)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def drawings(tmp_path_factory) -> Path:
    """One shard with img2dataset-like aliases (SAMPLE_ID, TEXT, image): 24 drawings under 12 captions,
    plus one row that does not decode and one without a caption."""
    rows = []
    for colour in COLOURS:
        for shape in SHAPES:
            for background in BACKGROUNDS:
                for shift in (0, 16):
                    caption = f"a {colour} {shape} on a {background} background"
                    rows.append({"TEXT": caption, "image": drawing(colour, shape, background, shift)})
    rows.insert(5, {"TEXT": "a broken file", "image": b"not an image"})
    rows.insert(9, {"TEXT": None, "image": drawing("red", "circle", "white", 8)})
    table = pa.table(
        {
            "SAMPLE_ID": [f"d{i:03d}" for i in range(len(rows))],
            "TEXT": [r["TEXT"] for r in rows],
            "image": pa.array([r["image"] for r in rows], pa.binary()),
        }
    )
    out = tmp_path_factory.mktemp("drawings")
    pq.write_table(table, out / "drawings.parquet", row_group_size=10)
    return out


def run(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    code = main(["calibrate", *argv])
    assert torch.get_num_threads() == threads  # the handler restores the caller's thread count
    return code


def rerun_as_the_job(config_path: Path, shards: Path, judged_on: str) -> float:
    """Mean cosine to full depth of the written router on the rows calibration judged it on (all 24, or
    the held-back half for a routing plan), routed as the job routes."""
    cfg = load_config(config_path)
    encoder = RoutedEncoder.from_config(cfg.model, cfg.router.routes)
    sample = read_captioned([str(shards)], encoder.loaded.image_size, 24)
    ids = route_images(cfg.router, sample.images, sample.bytes_per_pixel)
    routed = encoder.encode(sample.images, ids).vectors
    full = RoutedEncoder(encoder.loaded, [FULL]).encode(sample.images, np.zeros(len(ids), np.int32)).vectors
    rows = fit_test_split(len(ids))[1] if judged_on == "test_rows" else np.arange(len(ids))
    return float((routed[rows] * full[rows]).sum(-1).mean())


@pytest.fixture(scope="module")
def scenes(scene_shards, tmp_path_factory):
    """Calibrated on the shared scene shards with the embedded model, its shipped heads and exit 8."""
    out = tmp_path_factory.mktemp("calibrated") / "nested" / "routes.yaml"
    report = out.parent / "elsewhere" / "report.json"
    before = package_models()
    argv = ["--input", str(scene_shards), "--out", str(out), "--report", str(report), "--exits", "8"]
    code = run([*argv, *TOY])
    assert package_models() == before
    return code, out, json.loads(report.read_text())


def test_scene_calibration_writes_a_config_the_index_job_loads(scenes):
    code, out, report = scenes
    scorer = ["routes.scorer.json"] if "scorer" in report["outputs"] else []
    names = sorted(p.name for p in out.parent.iterdir())
    assert code == 0 and names == sorted(["elsewhere", "routes.yaml", *scorer])
    cfg = load_config(out, ["input.paths=['shards/']"])
    assert cfg.model.name == "icar-tiny-vit" and cfg.model.pretrained is None and cfg.model.heads is None
    heads = RoutedEncoder.from_config(cfg.model, []).vit.heads  # the shipped heads, with their tuned tails
    catalogue = {spec_key(r) for r in calibration_routes([8], heads)}
    assert {spec_key(r) for r in cfg.router.routes} <= catalogue
    # 30 token paths at exit 8 and full depth, and the 4 tuned ones
    assert len(report["routes"]) == len(catalogue) == 2 * 30 + 4
    assert report["outputs"]["routes"] == str(out)
    assert report["sample"] == {
        "images": 24,
        "match_key": "scene_key",
        "distinct_keys": 24,
        "skipped": {},
        "fit_rows": 12,
        "test_rows": 12,
        "galleries": 1,
        "gallery_size": None,
    }
    if cfg.router.scorer != "handcrafted":  # a learned scorer that routes ships beside the YAML
        assert Path(cfg.router.scorer).is_absolute() and cfg.router.scorer == report["outputs"]["scorer"]
        load_scorer(cfg.router.scorer)


def test_scene_calibration_meets_the_floor_on_the_data(scenes, scene_shards):
    _, out, report = scenes
    plan = report["final_plan"]
    floor = {"min_cosine": 0.985, "min_recall_ratio": 0.99, "confidence": 0.95}
    assert report["target"] == {"QualityFloor": floor}
    assert plan["meets_target"] and plan["mean_cosine"] >= 0.985
    assert plan["t2i_R@10_in_gallery_ratio_lower"] >= 0.99
    assert sum(plan["share"]) == pytest.approx(1.0) and len(plan["thresholds"]) == len(plan["routes"]) - 1
    assert set(report["comparison"]) == {"handcrafted", "learned"}
    assert report["winner"] in report["comparison"]
    assert plan["judged_on"] == ("test_rows" if len(plan["routes"]) > 1 else "all_rows")
    assert rerun_as_the_job(out, scene_shards, plan["judged_on"]) == pytest.approx(
        plan["mean_cosine"], abs=1e-4
    )


def test_a_captioned_shard_of_drawings_with_another_checkpoint_path(drawings, tmp_path, monkeypatch):
    shutil.copy(PACKAGE_DIR / "models" / "icar-tiny-vit.safetensors", tmp_path / "ckpt.safetensors")
    monkeypatch.chdir(tmp_path)  # relative paths below: the YAML must hold them absolute
    argv = ["--input", str(drawings), "--out", "cal/routes.yaml", "--pretrained", "ckpt.safetensors"]
    floor = ["--min-cosine", "0.97", "--min-recall-ratio", "0.9"]
    before = package_models()
    assert run([*argv, *floor, *TOY]) == 0
    assert package_models() == before
    out = tmp_path / "cal" / "routes.yaml"
    report = json.loads((tmp_path / "cal" / "routes.report.json").read_text())
    cfg = load_config(out)
    assert cfg.model.pretrained == str(tmp_path / "ckpt.safetensors") and cfg.model.heads is None
    # no heads for this checkpoint: full depth only, every token path
    assert {spec_key(r) for r in cfg.router.routes} <= {spec_key(r) for r in calibration_routes([])}
    assert report["sample"]["match_key"] == "caption" and report["sample"]["distinct_keys"] == 12
    assert report["sample"]["skipped"] == {"does not decode": 1, "no caption": 1}
    assert report["target"] == {
        "QualityFloor": {"min_cosine": 0.97, "min_recall_ratio": 0.9, "confidence": 0.95}
    }
    plan = report["final_plan"]
    assert plan["meets_target"] and plan["mean_cosine"] >= 0.97 and plan["t2i_R@10_in_gallery_ratio"] >= 0.9
    assert rerun_as_the_job(out, drawings, plan["judged_on"]) == pytest.approx(plan["mean_cosine"], abs=1e-4)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", str(PACKAGE_DIR / "models" / "x.yaml")], "inside the installed package"),
        (["--out", "{tmp}/r.yaml", "--model", "ViT-B-32"], "--pretrained is required"),
        (["--out", "{tmp}/r.yaml", "--exits", "5"], "heads at [4, 6, 8, 10]"),
        (["--out", "{tmp}/r.yaml", "--images", "12"], "calibration needs at least 20"),
        (["--out", "{tmp}/r.yaml", "--gallery-size", "12"], "each gallery needs 20 images"),
    ],
)
def test_bad_requests_fail_fast_with_exit_2(argv, message, drawings, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["calibrate", "--input", str(drawings), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.yaml").exists()


def test_calibration_refuses_the_test_split(tmp_path, capsys):
    """Scene shards name their stream; calibration (which chooses) must never read the test stream,
    whose only use is reporting. Mixed in with calib rows it is refused just the same."""
    write_corpus(tmp_path / "mixed" / "calib", seed=0, split=CALIB, num_images=12, shard_size=12)
    write_corpus(tmp_path / "mixed" / "test", seed=0, split=TEST, num_images=12, shard_size=12)
    out = tmp_path / "r.yaml"
    assert main(["calibrate", "--input", str(tmp_path / "mixed"), "--out", str(out), *TOY]) == 2
    assert f"read rows of the {TEST!r} scene split" in capsys.readouterr().err
    assert not out.exists()
    sample = read_captioned([str(tmp_path / "mixed" / "calib")], 64, 12)
    assert sample.splits == {CALIB} and len(sample) == 12
