"""The benchmark suite end to end at a tiny size (seconds, not a measurement): every section is written
and every number is sane. Timing itself stays out of `make test`."""

from __future__ import annotations

import json

import pytest

from pipeline.lab.bench.encoder import BASELINE
from pipeline.lab.bench.pipeline_run import steady_rate
from pipeline.lab.bench.projection import FULL_IMAGES_PER_GPU_SECOND, IMAGES, project
from pipeline.lab.bench.suite import run_suite

STAGES = {"read", "decode", "score", "encode", "write"}
FRONTIER_R10 = {BASELINE: 0.5, "full": 0.5, "exit6": 0.3, "exit8": 0.495, "tome4": 0.492, "energy90": 0.2}


@pytest.fixture(scope="module")
def tiny(ray_local, tmp_path_factory):
    """One tiny run, with a stand-in frontier so the equal-quality choice is exercised."""
    tmp = tmp_path_factory.mktemp("bench")
    frontier = tmp / "frontier.json"
    points = [{"name": k, "t2i_R@10": v, "mean_cosine_to_full": 1.0} for k, v in FRONTIER_R10.items()]
    frontier.write_text(json.dumps({"points": points}))
    out = tmp / "out"
    run_suite("tiny", out, threads=1, frontier=frontier, log=lambda _: None)
    return out, json.loads((out / "latest.json").read_text())


def test_tiny_run_writes_json_summary_and_plots(tiny):
    out, result = tiny
    assert {"encoder", "machine", "pipeline", "router", "query", "projection", "answers"} <= set(result)
    for name in ("latest.md", "encoder.png", "pipeline.png", "query.png"):
        assert (out / name).stat().st_size > 0
    assert len(list(out.glob("20*.json"))) == 1
    summary = (out / "latest.md").read_text()
    assert all(text in summary for text in result["answers"].values())


def test_encoder_section_has_positive_rates_and_fraction_of_peak(tiny):
    _, result = tiny
    assert [e["model"] for e in result["encoder"]] == ["icar-tiny-vit", "ViT-B-32", "ViT-B-16"]
    for e in result["encoder"]:
        names = {p["name"] for p in e["points"]}
        assert {BASELINE, "full", "exit6", "exit8", "tome4", "energy90"} <= names
        for p in e["points"]:
            assert p["images_per_second"]["median"] > 0 and p["speedup"]["median"] > 0
            assert p["gflops_per_image"] > 0 and 0 < p["fraction_of_peak"] < 5
    assert "untrained" in result["encoder"][1]["heads"] and "random" in result["encoder"][1]["weights"]
    assert result["machine"]["peak_gflops"] > 0 and "2 FLOPs" in result["machine"]["convention"]


def test_equal_quality_picks_the_fastest_adaptive_point_within_one_r10_point(tiny):
    _, result = tiny
    embedded = result["encoder"][0]
    r10 = {p["name"]: p["t2i_R@10"] for p in embedded["points"]}
    assert r10["tome4"] == 0.492 and r10["energy90"] == 0.2
    if "untrained" in embedded["heads"]:
        assert r10["exit8"] is None  # the frontier's exit quality belongs to trained heads
    eligible = [p for p in embedded["points"] if p["name"] in ("exit8", "tome4") and r10[p["name"]]]
    fastest = max(eligible, key=lambda p: p["speedup"]["median"])
    assert embedded["equal_quality"]["point"] == fastest["name"]


def test_pipeline_section_names_a_stage_and_compares_to_the_encoder(tiny):
    _, result = tiny
    p = result["pipeline"]
    assert p["end_to_end_images_per_second"] > 0 and p["fraction_of_encoder"] > 0
    assert all(s["median"] > 0 for s in p["encoder_alone_images_per_second"].values())
    assert set(p["stages"]["busy_seconds"]) == STAGES and p["stages"]["bottleneck"]["stage"] in STAGES
    assert sum(p["routes"].values()) == p["images"]


def test_router_and_query_sections_are_sane(tiny):
    _, result = tiny
    router = result["router"]
    assert router["router"]["cpu_s_per_image"] > 0 and router["router_share_of_encoder_cpu"] > 0
    query = result["query"]
    assert query["rows"] == 2000 and [t["dtype"] for t in query["tables"]] == ["float32", "float16"]
    for table in query["tables"]:
        assert table["index_build_s"] > 0 and table["index_bytes"] > 0 and table["data_bytes"] > 0
        for setting in table["settings"].values():
            assert 0.0 <= setting["recall@10"] <= 1.0
            assert 0 < setting["latency_ms"]["p50"] <= setting["latency_ms"]["p99"]
    f16, f32 = query["tables"][1]["data_bytes"], query["tables"][0]["data_bytes"]
    assert f16 < 0.75 * f32


def test_projection_prints_its_assumptions_and_scales_with_gpus():
    projection = project(1.5, "test ratio", 0.6)
    assert sum("ASSUMPTION" in a for a in projection["assumptions"]) >= 3
    rows = {(r["encoder"], r["gpus"]): r for r in projection["rows"]}
    full8 = rows[("full depth", 8)]
    assert full8["hours"] == pytest.approx(IMAGES / FULL_IMAGES_PER_GPU_SECOND / 3600 / 8)
    assert rows[("adaptive", 8)]["hours"] == pytest.approx(full8["hours"] / 1.5)
    assert rows[("full depth", 64)]["usd"] == pytest.approx(full8["usd"])


def test_steady_rate_refuses_a_burst_of_commits():
    assert steady_rate([(10.0, 10), (10.1, 20), (10.2, 30), (10.3, 40)])[0] is None
    assert steady_rate([(2.0, 10), (10.0, 90)])[0] is None
    rate, _ = steady_rate([(2.0, 10), (4.0, 30), (6.0, 50), (10.0, 90)])
    assert rate == pytest.approx(10.0)
