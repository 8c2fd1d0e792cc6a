"""Train the embedded icar-tiny-vit CLIP model from scratch on rendered scenes (CPU, ~90 minutes).

    python jobs/train_clip.py --seed 0 --steps 2400 --out results/training

Writes <out>/icar-tiny-vit.safetensors (fp16), a JSONL log, a summary and a curves plot. The shipped
checkpoint (pipeline/models/) is read-only package data: use a new one with model.pretrained=<path>, or
replace the shipped file by a deliberate copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from icar_lab import plots
from icar_lab.training.clip import TrainSettings, train
from pipeline.config import ConfigError


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for field in dataclasses.fields(TrainSettings):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default
        )
    settings = TrainSettings(**vars(parser.parse_args()))
    try:
        summary = train(settings)
    except ConfigError as exc:  # an --out inside the installed package
        raise SystemExit(str(exc)) from None
    out = Path(summary["out"])
    plots.training_curves(out / "icar-tiny-vit.train_log.jsonl", out / "icar-tiny-vit.curves.png")
    print(json.dumps(summary["final"], indent=2))


if __name__ == "__main__":
    main()
