"""Configuration is validated up front, and every error names the field at fault."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, load_config


def test_yaml_and_overrides_combine(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input:\n  paths: [a/*.parquet]\nencoder:\n  batch_size: 32\n")
    cfg = load_config(path, ["encoder.batch_size=128", "output.vector_dtype=float16"])
    assert cfg.input.paths == ["a/*.parquet"]
    assert (cfg.encoder.batch_size, cfg.output.vector_dtype) == (128, "float16")


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("encoder.batch_size=0", "encoder.batch_size"),
        ("output.vector_dtype=float64", "output.vector_dtype"),
        ("encoder.batchsize=3", "encoder.batchsize"),
        ("decode.max_pixels=-1", "decode.max_pixels"),
    ],
)
def test_bad_field_is_named(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_router_needs_one_more_route_than_thresholds():
    with pytest.raises(ConfigError, match="len\\(routes\\) == len\\(thresholds\\) \\+ 1"):
        load_config(None, ["router.thresholds=[0.5]"])


def test_route_cannot_have_two_budgets():
    routes = "[{name: a, energy_tau: 0.9, keep_tokens: 8}]"
    with pytest.raises(ConfigError, match="set energy_tau or keep_tokens, not both"):
        load_config(None, [f"router.routes={routes}"])


def test_thresholds_must_ascend():
    routes = "[{name: a}, {name: b}, {name: c}]"
    with pytest.raises(ConfigError, match="strictly ascending"):
        load_config(None, [f"router.routes={routes}", "router.thresholds=[0.6, 0.2]"])


def test_missing_and_malformed_files_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_cli_reports_config_errors_with_exit_status_2(capsys):
    assert main(["index", "--input", "x.parquet", "--set", "encoder.actors=0"]) == 2
    assert "encoder.actors" in capsys.readouterr().err
