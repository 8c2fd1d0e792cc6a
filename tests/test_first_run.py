"""What a new user sees: the shipped routes by default, one progress line, a summary, and no warnings."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from pipeline.config import MODELS_DIR, load_config
from pipeline.progress import Progress, StderrFilter

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def test_no_router_section_means_the_embedded_models_shipped_routes():
    shipped = yaml.safe_load((MODELS_DIR / "icar-tiny-vit.routes.yaml").read_text())["router"]
    cfg = load_config(None, [])
    assert [r.model_dump(exclude_defaults=True) for r in cfg.router.routes] == shipped["routes"]
    assert cfg.router.thresholds == shipped["thresholds"]


@pytest.mark.parametrize("override", ["model.pretrained=/ckpt/other.safetensors", "model.name=ViT-B-32"])
def test_a_model_without_shipped_routes_runs_full_depth(override):
    cfg = load_config(None, [override])
    assert [r.name for r in cfg.router.routes] == ["full"]


def test_an_explicit_router_wins_over_the_shipped_one():
    cfg = load_config(None, ['router.routes=[{"name": "d6", "exit_depth": 6}]'])
    assert [(r.name, r.exit_depth) for r in cfg.router.routes] == [("d6", 6)]


def test_progress_line_counts_rows_and_shards_and_throttles_in_a_log_file():
    out = io.StringIO()
    progress = Progress(stream=out, interval=3600)  # not a tty: at most one line per interval
    progress.start(shards=2, rows=200)
    progress.advance(50)
    progress.advance(50)
    assert out.getvalue() == ""  # throttled
    progress.shard_done("committed a")
    progress.advance(100)
    progress.shard_done("committed b")  # the last shard always draws
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("shards 2/2 | rows 200/200 (100%) |") and "ETA -" in lines[0]


def test_verbose_progress_adds_a_line_per_shard():
    out = io.StringIO()
    progress = Progress(stream=out, interval=3600, verbose=True)
    progress.start(shards=3, rows=30)
    progress.shard_done("committed 00000.parquet: 10 ok")
    assert out.getvalue().splitlines() == ["committed 00000.parquet: 10 ok"]


def test_stderr_filter_drops_only_the_known_native_line(capfd):
    with StderrFilter(patterns=(b"noise marker",)):
        os.write(2, b"[E core_worker.cc] actor has a noise marker here\n")
        os.write(2, b"a real error line\n")
        os.write(2, b"partial line without newline")
    err = capfd.readouterr().err
    assert "noise marker" not in err
    assert "a real error line\n" in err and err.endswith("partial line without newline")


@pytest.mark.slow
def test_clean_first_run_routes_images_and_prints_no_warnings(scene_shards, tmp_path):
    # a fresh HOME: Ray generates its auth token on this first start, which must not be announced
    ray_tmp = tempfile.mkdtemp(prefix="icar-ray-", dir="/tmp")  # short: Ray's socket paths are limited
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "HOME": str(tmp_path)}
    try:
        run = subprocess.run(
            [str(BIN / "icar"), "index", "--input", str(scene_shards), "--output", str(tmp_path / "db")],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    shipped = load_config(None, []).router.routes
    assert f"routes: {shipped[0].name} 72 (100%)" in run.stdout  # the calibrated route, not full depth
    assert "rows:   72 ok, 0 failed, 0 skipped" in run.stdout
    err_lines = run.stderr.splitlines()
    assert err_lines[0].startswith("3 shards found, 0 already indexed, 3 to do; routes:")
    assert err_lines[-1].startswith("shards 3/3 | rows 72/72 (100%)")
    assert len(err_lines) <= 3, run.stderr  # start line + progress line(s): nothing from libraries
    for noise in ("Warning", "WARNING", "INFO", "core_worker", "logging_progress", "token"):
        assert noise not in run.stderr, run.stderr


@pytest.mark.slow
def test_make_demo_prints_progress_summary_and_answers_but_no_warnings(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="icar-ray-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "HOME": str(tmp_path)}
    demo = [
        str(BIN / "python"),
        "jobs/demo.py",
        "--images",
        "40",
        "--shard-size",
        "20",
        "--out",
        str(tmp_path),
    ]
    try:
        run = subprocess.run(demo, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rows:   40 ok, 0 failed, 0 skipped" in run.stdout and run.stdout.count("  1. ") == 4
    for noise in ("Warning", "WARNING", "INFO", "core_worker", "logging_progress", "token"):
        assert noise not in run.stderr, run.stderr
