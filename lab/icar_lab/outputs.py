"""Where the lab may write: anywhere but the installed package. The shipped model, heads and router are
read-only package data; a new calibration or training run writes to a path the caller names, and
replacing a shipped file is a deliberate copy, never a side effect."""

from __future__ import annotations

from pathlib import Path

import pipeline
from pipeline.config import ConfigError

PACKAGE_DIR = Path(pipeline.__file__).resolve().parent


def output_path(path: str | Path) -> Path:
    """`path`, absolute, with its parent created; a ConfigError if it lies inside the installed package."""
    resolved = Path(path).expanduser().resolve()
    if resolved == PACKAGE_DIR or PACKAGE_DIR in resolved.parents:
        raise ConfigError(
            f"{path} is inside the installed package ({PACKAGE_DIR}): shipped files are read-only; "
            "write elsewhere (e.g. results/) and point the config at it"
        )
    resolved.parent.mkdir(parents=True, exist_ok=True)
    return resolved
