"""The training jobs run end to end at toy size and write what the pipeline loads."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from icar_lab.catalogue import route
from icar_lab.heldout import load_heldout
from icar_lab.outputs import PACKAGE_DIR
from icar_lab.training.clip import TrainSettings, train
from icar_lab.training.heads import HeadSettings, train_heads
from pipeline.config import ConfigError, ModelConfig, RouteSpec
from pipeline.encode.heads import ExitHeads, HeadsMismatchError
from pipeline.encode.model import load_model
from pipeline.encode.routed import RoutedEncoder


def test_clip_training_writes_a_checkpoint_open_clip_loads(tmp_path):
    settings = TrainSettings(
        steps=2, batch_size=8, warmup=1, eval_every=2, eval_images=16, threads=1, out=str(tmp_path)
    )
    summary = train(settings)
    log = [json.loads(line) for line in (tmp_path / "icar-tiny-vit.train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1] and summary["final"] == log[-1] and "t2i_R@10" not in log[0]
    final = summary["final"]
    for direction in ("t2i", "i2t"):  # recall over 16 held-out scenes: multiples of 1/16, growing with k
        recalls = [final[f"{direction}_R@{k}"] for k in (1, 5, 10)]
        assert recalls == sorted(recalls) and all((16 * r).is_integer() for r in recalls)
    assert summary["out"] == str(tmp_path.resolve())
    loaded = load_model(ModelConfig(pretrained=str(tmp_path / "icar-tiny-vit.safetensors")))
    assert loaded.model.visual.conv1.weight.dtype == torch.float32  # fp16 on disk, fp32 in memory


def test_training_refuses_to_write_into_the_installed_package():
    with pytest.raises(ConfigError, match="inside the installed package"):
        train(TrainSettings(steps=1, out=str(PACKAGE_DIR / "models")))


def test_exit_heads_training_moves_early_exits_toward_full_depth():
    loaded = load_model(ModelConfig())
    settings = HeadSettings(
        depths=[4],
        images=64,
        epochs=3,
        batch_size=32,
        split="heads-test",
        reduced_routes=[RouteSpec(name="t", merge="tome", merge_r=2)],
    )
    untrained = ExitHeads(loaded.model.visual, [4])
    heads, report = train_heads(loaded, settings, log=lambda _: None)
    assert heads.fingerprint == untrained.fingerprint
    assert len(report["history"]) == 3
    assert report["history"][-1]["loss"] < report["history"][0]["loss"]
    assert report["train_cosine_to_full"][4] > 0.5
    with pytest.raises(KeyError):
        heads.project(torch.zeros(1, 192), 6)


def test_backbone_fine_tuning_writes_a_new_model_its_heads_are_bound_to(tmp_path, monkeypatch):
    out = tmp_path / "tuned.heads.safetensors"
    argv = ["train_heads", "--depths", "4", "--images", "64", "--epochs", "2", "--finetune-backbone"]
    monkeypatch.setattr("sys.argv", [*argv, "--backbone-lr", "1e-4", "--threads", "1", "--out", str(out)])
    threads = torch.get_num_threads()
    job = Path(__file__).resolve().parent.parent / "jobs" / "train_heads.py"
    runpy.run_path(str(job), run_name="__main__")
    torch.set_num_threads(threads)
    original = load_model(ModelConfig())
    tuned = load_model(ModelConfig(pretrained=str(tmp_path / "tuned.heads.backbone.safetensors")))
    before, after = original.model.visual.state_dict(), tuned.model.visual.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the tower did train
    text_before, text_after = original.model.state_dict(), tuned.model.state_dict()
    assert torch.equal(text_before["token_embedding.weight"], text_after["token_embedding.weight"])
    heads = ExitHeads.load(out, tuned.model.visual)
    assert heads.depths == [4]
    with pytest.raises(HeadsMismatchError):
        ExitHeads.load(out, original.model.visual)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["model_id"].endswith("tuned.heads.backbone.safetensors")
    assert summary["train_cosine_to_full"]["12"] > 0.95  # distillation keeps full depth where it was


def test_tail_training_adds_tuned_tails_beside_the_exit_heads_and_the_encoder_serves_them(
    tmp_path, monkeypatch
):
    out = tmp_path / "tails.safetensors"
    paths = '[{"merge": "tome", "merge_keep": 0.7, "merge_floor": 8}]'
    argv = ["train_tails", "--paths", paths, "--tail-blocks", "2", "--images", "64", "--epochs", "3"]
    monkeypatch.setattr("sys.argv", [*argv, "--threads", "1", "--out", str(out)])
    threads = torch.get_num_threads()
    job = Path(__file__).resolve().parent.parent / "jobs" / "train_tails.py"
    runpy.run_path(str(job), run_name="__main__")
    torch.set_num_threads(threads)
    summary = json.loads(out.with_suffix(".json").read_text())
    (tail,) = summary["tails"]
    assert tail["route"] == "tome-keep70-floor8-tuned" and tail["start"] == 10
    assert tail["history"][-1]["loss"] < tail["history"][0]["loss"]
    assert tail["train_cosine_to_full"] > 0.9
    cfg = ModelConfig(heads=str(out))
    tuned = route(tuned=True, merge="tome", merge_keep=0.7, merge_floor=8)
    encoder = RoutedEncoder.from_config(cfg, [tuned, tuned.model_copy(update={"tuned": False})])
    assert encoder.vit.heads.depths == [4, 6, 8, 10]  # the shipped exit heads came along
    images = load_heldout("heads", 8, encoder.loaded.image_size).images
    a, b = (encoder.encode(images, np.full(8, i)).vectors for i in (0, 1))
    assert 0.9 < float((a * b).sum(-1).mean()) < 0.9999  # the tail is used, and it is close to the tower's
