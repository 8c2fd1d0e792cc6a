"""The lab's plots. matplotlib is a dependency of the lab's distribution only and is imported lazily,
through `pyplot`, which every chart of the lab (the bench's and the studies' too) draws with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display on a server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def frontier(points: list[dict[str, Any]], path: Path, title: str) -> None:
    """R@10 against measured ms and against GFLOPs, and mean cosine to full depth against ms."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [
        ("ms_per_image", "t2i_R@10", "ms / image (measured)"),
        ("gflops_per_image", "t2i_R@10", "GFLOPs / image"),
        ("ms_per_image", "mean_cosine_to_full", "ms / image (measured)"),
    ]
    for ax, (x, y, label) in zip(axes, panels, strict=True):
        for p in points:
            marker = "*" if p["kind"] == "routed" else "o" if p["kind"] == "fixed" else "s"
            ax.scatter(p[x], p[y], marker=marker, s=90 if marker == "*" else 40)
            ax.annotate(p["name"], (p[x], p[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=label, ylabel=y)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title} (star: calibrated router; square: open_clip encode_image)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_curves(log_path: Path, png_path: Path) -> None:
    """Loss per step and held-out recall per evaluation, from a training run's JSONL log."""
    plt = pyplot()
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
    plt.close(fig)
