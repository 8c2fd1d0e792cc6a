"""What a run did, for the person who started it: counts, speed, routes, compute, and where time went."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pipeline.write.fragments import STAGE_TIMERS


@dataclass
class RunSummary:
    shards_total: int = 0
    shards_already_done: int = 0
    shards_committed: int = 0
    shards_failed: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    rows_skipped: int = 0
    seconds: float = 0.0
    routes: Counter = field(default_factory=Counter)
    gflops_sum: float = 0.0
    gflops_full: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGE_TIMERS, 0.0))
    commit_seconds: float = 0.0  # the driver's time in commit rounds
    commit_rounds: int = 0
    driver_bytes: int = 0  # what the workers sent the driver: part metadata, never rows
    failed_shards: dict[str, str] = field(default_factory=dict)  # uri -> why
    # (seconds since start, rows written so far) each time a shard's last part arrived: the pipeline's pace,
    # whatever the commit rounds' cadence
    written: list[tuple[float, int]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.rows_ok / self.seconds if self.seconds else 0.0

    @property
    def mean_gflops(self) -> float:
        return self.gflops_sum / self.rows_ok if self.rows_ok else 0.0

    def render(self) -> str:
        lines = [
            f"shards: {self.shards_total} found, {self.shards_already_done} already indexed, "
            f"{self.shards_committed} committed, {self.shards_failed} failed",
            f"rows:   {self.rows_ok} ok, {self.rows_failed} failed, {self.rows_skipped} skipped",
            f"speed:  {self.images_per_second:.1f} images/s over {self.seconds:.1f} s",
        ]
        if self.rows_ok:
            share = ", ".join(
                f"{name} {count} ({count / self.rows_ok:.0%})" for name, count in sorted(self.routes.items())
            )
            lines.append(f"routes: {share}")
            lines.append(
                f"compute: {self.mean_gflops:.3f} GFLOPs/image vs {self.gflops_full:.3f} at full depth "
                f"({self.mean_gflops / self.gflops_full:.0%})"
            )
        busy = {k[2:]: v for k, v in self.stage_seconds.items()}
        lines.append(
            "stage seconds (summed over workers): " + ", ".join(f"{k} {v:.1f}" for k, v in busy.items())
        )
        rows = self.rows_ok + self.rows_failed + self.rows_skipped
        lines.append(
            f"driver: {self.commit_rounds} commit rounds in {self.commit_seconds:.1f} s, received "
            f"{self.driver_bytes / max(rows, 1):.0f} bytes/row (fragment metadata only)"
        )
        lines += [f"FAILED shard {uri}: {why}" for uri, why in self.failed_shards.items()]
        return "\n".join(lines)
