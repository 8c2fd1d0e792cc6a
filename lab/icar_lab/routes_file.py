"""The calibration's outputs: a config fragment that `icar index --config` loads (the `model:` it was
calibrated for and the `router:` it chose), the learned scorer beside it when the router uses one, and a
JSON report of every number the choice rests on.

Paths inside the YAML are absolute: `load_scorer` resolves a relative scorer path against the working
directory and then the package's models directory, never against the YAML's own directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from icar_lab.calibrate import Calibration
from icar_lab.outputs import output_path
from pipeline.config import ModelConfig, RouterConfig, load_config


def absolute_if_local(value: str | None) -> str | None:
    """A path to an existing local file becomes absolute, so the YAML works from any directory; an
    open_clip tag (or None) is kept as it is."""
    if value is None or not Path(value).expanduser().exists():
        return value
    return str(Path(value).expanduser().resolve())


def routes_document(model: ModelConfig, router: RouterConfig) -> dict[str, Any]:
    """The `model:` section in full (null: the embedded weights, the model's shipped heads) and the
    `router:` section, route fields at their defaults left out."""
    return {
        "model": model.model_dump(),
        "router": {
            "scorer": router.scorer,
            "thresholds": router.thresholds,
            "routes": [r.model_dump(exclude_defaults=True) for r in router.routes],
        },
    }


def write_calibration(
    calibration: Calibration,
    model: ModelConfig,
    out: str | Path,
    report: str | Path | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write the routes YAML (plus `<out>.scorer.json` when a learned scorer routes, and the report, by
    default `<out>.report.json`); check the YAML loads as the router it describes. Returns the paths."""
    out_path = output_path(out)
    report_path = output_path(report or out_path.with_suffix(".report.json"))
    written = {"routes": str(out_path), "report": str(report_path)}
    scorer = "handcrafted"
    if calibration.learned is not None:
        scorer_path = output_path(out_path.with_suffix(".scorer.json"))
        calibration.learned.save(scorer_path)
        scorer = written["scorer"] = str(scorer_path)
    router = calibration.plan.router(scorer)
    header = (
        f"# Written by icar calibrate: the best router for {calibration.target} on "
        f"{calibration.sample['images']} captioned images.\n# Report: {report_path}\n"
        "# Use it with: icar index --config <this file> --input <shards>\n"
        "# model.pretrained null: the embedded weights; model.heads null: the model's shipped heads.\n"
    )
    out_path.write_text(header + yaml.safe_dump(routes_document(model, router), sort_keys=False))
    loaded = load_config(out_path)
    if loaded.router != router or loaded.model != model:  # a writer bug, not a user error
        raise RuntimeError(f"{out_path} does not load back as the router and model it was written from")
    payload = {"options": options or {}, "model": model.model_dump(), "outputs": written}
    payload |= calibration.report()
    report_path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return written
