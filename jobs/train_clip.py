"""Train the embedded icar-tiny-vit CLIP model from scratch on rendered scenes (CPU, ~90 minutes).

    python jobs/train_clip.py --seed 0 --steps 2400 --out pipeline/models

Writes <out>/icar-tiny-vit.safetensors (fp16), a JSONL log, a summary and a curves plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from pipeline.lab.training.clip import TrainSettings, train


def plot_curves(log_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    evals = [r for r in rows if "t2i_R@10" in r]
    fig, (ax_loss, ax_rec) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.6)
    ax_loss.set(xlabel="step", ylabel="InfoNCE loss", title="training loss")
    for name in ("t2i_R@1", "t2i_R@10", "i2t_R@1", "i2t_R@10"):
        ax_rec.plot([r["step"] for r in evals], [r[name] for r in evals], marker="o", label=name)
    ax_rec.set(xlabel="step", ylabel="recall (held-out)", title="held-out recall", ylim=(0, 1))
    ax_rec.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for field in dataclasses.fields(TrainSettings):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default
        )
    settings = TrainSettings(**vars(parser.parse_args()))
    summary = train(settings)
    out = Path(settings.out)
    plot_curves(out / "icar-tiny-vit.train_log.jsonl", out / "icar-tiny-vit.curves.png")
    print(json.dumps(summary["final"], indent=2))


if __name__ == "__main__":
    main()
