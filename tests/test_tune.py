"""`icar tune` at toy size on a random-weights tower shaped like ViT-B-16 (patch 16 at 224 px, four narrow
blocks; tests/model_configs/tiny-vit-b16.json): the heads file and routes file it writes have the right
shapes, load back, and `icar index` runs with them as they are; an interrupted tune resumes from its
checkpoint to the same weights as an uninterrupted one."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import lancedb
import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from imagefactory import smooth_rgb
from safetensors.torch import load_file

from icar_lab.catalogue import calibration_routes, merge_schedule, spec_key
from icar_lab.scenes.shards import write_corpus
from icar_lab.training.clip import save_checkpoint
from icar_lab.training.loop import EpochKeeper
from icar_lab.tune.cli import register
from icar_lab.tune.request import TuneRequest
from icar_lab.tune.run import tune
from pipeline.config import ConfigError, load_config
from pipeline.encode.heads import ExitHeads, token_path_key
from pipeline.encode.model import register_embedded_models
from pipeline.job import run_index

MODEL = "tiny-vit-b16"
SCHEDULE = "tome-keep75-floor8"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A random-weights checkpoint, captioned scene shards to learn on plus a shard of uncaptioned
    images, and captioned scenes kept apart for calibration."""
    root = tmp_path_factory.mktemp("tune")
    register_embedded_models()
    torch.manual_seed(0)
    save_checkpoint(open_clip.create_model(MODEL), root / "random.safetensors", torch.float32)
    write_corpus(root / "learn", seed=3, split="heads", num_images=24, shard_size=12)
    images = []
    for i in range(8):
        buffer = io.BytesIO()
        smooth_rgb(96 + 8 * i, 80, seed=i).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    table = pa.table({"key": [f"u{i}" for i in range(8)], "jpg": pa.array(images, pa.binary())})
    (root / "plain").mkdir()
    pq.write_table(table, root / "plain" / "uncaptioned.parquet")
    write_corpus(root / "calib", seed=5, split="calib", num_images=24, shard_size=24)
    return {"root": root, "checkpoint": root / "random.safetensors"}


def run_tune(argv: list[str]) -> int:
    """`icar tune` through its own `register` (the installed entry points may name another checkout)."""
    parser = argparse.ArgumentParser(prog="icar")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tune", *argv])
    threads = torch.get_num_threads()
    try:
        return args.func(args)
    finally:
        torch.set_num_threads(threads)


def test_tune_writes_heads_and_routes_that_the_index_job_uses_as_they_are(files, ray_local, tmp_path):
    root, out = files["root"], tmp_path / "tuned"
    learn = [str(root / "learn"), str(root / "plain")]
    argv = ["--model", MODEL, "--pretrained", str(files["checkpoint"]), "--input", *learn, "--out", str(out)]
    argv += ["--heads", "2", "--schedules", SCHEDULE, "--tail-blocks", "2", "--images", "32", "--epochs", "2"]
    calibrate = ["--captioned", str(root / "calib"), "--calibration-images", "24"]
    calibrate += ["--calibrate-args", "--timing-images 8 --rounds 1 --batch-size 24"]
    assert run_tune([*argv, *calibrate]) == 0

    paths = [f"input.paths=['{root / 'plain'}']", f"output.uri={tmp_path / 'db'}"]
    cfg = load_config(out / "routes.yaml", [*paths, "encoder.batch_size=8", "ray.decode_batch_size=8"])
    assert (cfg.model.name, cfg.model.pretrained) == (MODEL, str(files["checkpoint"]))
    assert cfg.model.heads == str(out / "heads.safetensors")
    visual = open_clip.create_model(MODEL, pretrained=str(files["checkpoint"])).visual
    heads = ExitHeads.load(cfg.model.heads, visual)  # stamped for this tower: it loads
    assert heads.depths == [2] and heads.projs["2"].shape == (64, 64)
    assert heads.tail_paths == [token_path_key(merge_schedule(SCHEDULE))]
    assert heads.tails[0].start == 2 and len(heads.tails[0].blocks) == 2
    assert {spec_key(r) for r in cfg.router.routes} <= {spec_key(r) for r in calibration_routes([2], heads)}

    summary = run_index(cfg)
    assert (summary.shards_committed, summary.rows_ok, summary.rows_failed) == (1, 8, 0)
    table = lancedb.connect(str(tmp_path / "db")).open_table("images").to_arrow()
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
    assert vectors.shape == (8, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)


def test_the_summary_reports_what_the_tune_cost(files, tmp_path):
    summary = tune(request(files, tmp_path / "cost", epochs=1), log=lambda _: None)
    cost = summary["cost"]
    visual = open_clip.create_model(MODEL, pretrained=str(files["checkpoint"])).visual
    heads = ExitHeads.load(summary["heads_file"], visual)
    assert cost["trainable_parameters"] == sum(p.numel() for p in heads.parameters())
    assert cost["frozen_parameters"] == sum(p.numel() for p in visual.parameters())
    assert cost["images"] == 32
    assert set(cost["wall_seconds"]) == {"targets", "heads", f"tail {SCHEDULE}", "total"}
    assert cost["wall_seconds_per_1000_images"] == pytest.approx(cost["wall_seconds"]["total"] * 1000 / 32)
    assert cost["peak_memory_mb"] > cost["targets_mb_per_1000_images"] * 32 / 1000 > 0
    assert summary["precision"] == "fp32" and cost["device"] == "cpu"  # autocast is for GPUs only


class Interrupted(Exception):
    """Stands for a kill: raised right after a checkpoint was written."""


def request(files: dict[str, Path], out: Path, **changes) -> TuneRequest:
    root = files["root"]
    fields = dict(
        model=MODEL, pretrained=str(files["checkpoint"]), inputs=[str(root / "learn"), str(root / "plain")],
        out=str(out), depths=[2], schedules=[SCHEDULE], images=32, epochs=3, tail_blocks=2,
    )  # fmt: skip
    return TuneRequest(**{**fields, **changes})


def test_an_interrupted_tune_resumes_from_its_last_epoch_to_the_same_weights(files, tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    uninterrupted = tune(request(files, tmp_path / "whole"), log=lambda _: None)
    end_epoch = EpochKeeper.end_epoch

    def killed_after_the_first_tail_epoch(self, history, optimizer, schedule):
        end_epoch(self, history, optimizer, schedule)
        if self.path.name.startswith("tail-") and len(history) == 1:
            raise Interrupted

    monkeypatch.setattr(EpochKeeper, "end_epoch", killed_after_the_first_tail_epoch)
    with pytest.raises(Interrupted):
        tune(request(files, tmp_path / "cut"), log=lambda _: None)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="pass --resume"):
        tune(request(files, tmp_path / "cut"), log=lambda _: None)
    with pytest.raises(ConfigError, match="epochs"):
        tune(request(files, tmp_path / "cut", resume=True, epochs=4), log=lambda _: None)
    lines: list[str] = []
    resumed = tune(request(files, tmp_path / "cut", resume=True), log=lines.append)
    torch.set_num_threads(threads)

    assert "heads resuming at epoch 3 of 3" in lines
    assert f"{SCHEDULE}-tuned resuming at epoch 1 of 3" in lines
    for stage in ("heads", SCHEDULE):
        before, after = uninterrupted["stages"][stage]["history"], resumed["stages"][stage]["history"]
        assert [e["epoch"] for e in after] == [0, 1, 2]
        assert [e["loss"] for e in after] == pytest.approx([e["loss"] for e in before], rel=1e-5)
        assert [e["heldout_cosine"] for e in after] == pytest.approx([e["heldout_cosine"] for e in before])
    whole, cut = (load_file(s["heads_file"]) for s in (uninterrupted, resumed))
    assert whole.keys() == cut.keys() and all(torch.allclose(whole[k], cut[k], atol=1e-5) for k in whole)
