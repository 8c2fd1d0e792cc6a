"""The nightly reindex: bring the table in line with the input, maintain it, and write a run report.

Under the table's lease, in one run: shards no longer in the input lose their rows (refused when that
would remove more than `reindex.max_removed_share` of the indexed shards: a mistyped pattern must not
empty the table); new shards are indexed and changed ones replaced, exactly as `icar index` does; then
LanceDB maintenance: compaction, new rows folded into the vector index (or the index rebuilt when more
than `reindex.rebuild_unindexed_share` of the rows are outside it), versions older than
`reindex.cleanup_older_than_days` pruned. The report (JSON + markdown) says what changed and what it cost.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import fsspec

from pipeline.config import ConfigError, IndexConfig
from pipeline.job import RunSummary, index_pending, open_run
from pipeline.progress import Progress
from pipeline.query import build_indexes
from pipeline.write import LanceWriter, is_local, output_filesystem

REPORTS_DIR = "_reports"


@dataclass
class Maintenance:
    vector_index: str  # "none", "folded in" or "rebuilt"
    unindexed_rows_before: int
    versions_pruned_older_than_days: float
    seconds: float


@dataclass
class ReindexReport:
    started_utc: str
    input: list[str]
    output: str
    table: str
    model_id: str
    shards_removed: list[str]
    summary: dict[str, Any]
    maintenance: Maintenance
    rows_before: int
    rows_after: int
    version_before: int
    version_after: int
    seconds: float
    paths: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        s, m = self.summary, self.maintenance
        routes = ", ".join(f"{name} {count}" for name, count in sorted(s["routes"].items())) or "none"
        saved = 1 - s["mean_gflops"] / s["gflops_full"] if s["rows_ok"] else 0.0
        lines = [
            f"# icar reindex {self.started_utc}",
            "",
            f"`{', '.join(self.input)}` -> `{self.output}` table `{self.table}` ({self.model_id}), "
            f"{self.seconds:.1f} s",
            "",
            "| | |",
            "|---|---|",
            f"| shards found / already indexed / committed / failed / removed | {s['shards_total']} / "
            f"{s['shards_already_done']} / {s['shards_committed']} / {s['shards_failed']} / "
            f"{len(self.shards_removed)} |",
            f"| rows ok / failed / skipped | {s['rows_ok']} / {s['rows_failed']} / {s['rows_skipped']} |",
            f"| table rows before -> after | {self.rows_before} -> {self.rows_after} |",
            f"| table version before -> after | {self.version_before} -> {self.version_after} |",
            f"| routes | {routes} |",
            f"| compute saved vs full depth | {saved:.0%} of GFLOPs |",
            "| vector index | "
            + (
                f"{m.vector_index} ({m.unindexed_rows_before} rows were outside it) |"
                if m.vector_index != "none"
                else "none (`icar build-index` builds one) |"
            ),
            f"| versions pruned | older than {self.maintenance.versions_pruned_older_than_days:g} days |",
        ]
        lines += [f"| FAILED {uri} | {why} |" for uri, why in s["failed_shards"].items()]
        lines += [f"| removed {uri} | rows deleted |" for uri in self.shards_removed]
        return "\n".join(lines) + "\n"


def remove_missing(writer: LanceWriter, input_uris: set[str], cfg: IndexConfig) -> list[str]:
    """Delete the rows of every indexed shard that the input no longer lists; returns their uris."""
    indexed = writer.known()
    removed = sorted(indexed - input_uris)
    if not removed or not cfg.reindex.delete_removed:
        return []
    if len(removed) > cfg.reindex.max_removed_share * len(indexed):
        raise ConfigError(
            f"{len(removed)} of the {len(indexed)} indexed shards are missing from the input (e.g. "
            f"{removed[0]}); refusing to delete more than reindex.max_removed_share="
            f"{cfg.reindex.max_removed_share:g} of them. Check input.paths, or raise the share for this run"
        )
    for uri in removed:
        writer.remove_shard(uri)
    return removed


def maintain(writer: LanceWriter, cfg: IndexConfig) -> Maintenance:
    """Compact, fold new rows into the vector index, prune old versions; then rebuild the vector index if
    too many rows were outside it (folding keeps the old partitions, which drift as the data grows)."""
    started = time.perf_counter()
    images, rows = writer.images, writer.images.count_rows()
    vector_indexes = [i.name for i in images.list_indices() if i.columns == ["vector"]]
    unindexed = images.index_stats(vector_indexes[0]).num_unindexed_rows if vector_indexes else 0
    writer.optimize(cleanup_older_than=timedelta(days=cfg.reindex.cleanup_older_than_days))
    action = "folded in" if vector_indexes else "none"
    if vector_indexes and rows and unindexed > cfg.reindex.rebuild_unindexed_share * rows:
        writer.check_lease()
        build_indexes(cfg)
        action = "rebuilt"
    return Maintenance(action, unindexed, cfg.reindex.cleanup_older_than_days, time.perf_counter() - started)


def _summary_dict(summary: RunSummary) -> dict[str, Any]:
    out = asdict(summary)
    out |= {"routes": dict(summary.routes), "mean_gflops": summary.mean_gflops}
    return out


def write_report(report: ReindexReport, cfg: IndexConfig) -> None:
    """`<report_dir>/<UTC>.json` and `.md`, copied to `latest.json` / `latest.md` (paths in the report)."""
    if cfg.reindex.report_dir:
        fs, directory = fsspec.core.url_to_fs(cfg.reindex.report_dir)
    else:
        fs, root = output_filesystem(cfg.output)
        directory = posixpath.join(root, REPORTS_DIR)
    fs.makedirs(directory, exist_ok=True)
    local = is_local(fs)
    stamp = report.started_utc.replace("-", "").replace(":", "")
    stamped = [posixpath.join(directory, f"{stamp}.{ext}") for ext in ("json", "md")]
    report.paths = stamped if local else [fs.unstrip_protocol(p) for p in stamped]
    texts = {"json": json.dumps(asdict(report), indent=2), "md": report.markdown()}
    for name in (stamp, "latest"):
        for ext, text in texts.items():
            fs.pipe_file(posixpath.join(directory, f"{name}.{ext}"), text.encode())


def run_reindex(
    cfg: IndexConfig, progress: Progress | None = None, verbose: bool = False, wait: bool = False
) -> ReindexReport:
    """The nightly run (module docstring); raises `ConfigError` on a mass removal, `OutputBusy` if another
    job holds the table."""
    progress = progress or Progress.silent()
    started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open_run(cfg, verbose, wait) as run:
        images = run.writer.images
        rows_before, version_before = images.count_rows(), images.version
        removed = remove_missing(run.writer, {s.uri for s in run.shards}, cfg)
        for uri in removed:
            progress.note(f"removed {uri}: no longer in the input")
        index_pending(run, progress)
        maintenance = maintain(run.writer, cfg)
        images.checkout_latest()
        rows_after, version_after = images.count_rows(), images.version
    report = ReindexReport(
        started_utc=started_utc,
        input=list(cfg.input.paths),
        output=cfg.output.uri,
        table=cfg.output.table,
        model_id=cfg.model.model_id,
        shards_removed=removed,
        summary=_summary_dict(run.summary),
        maintenance=maintenance,
        rows_before=rows_before,
        rows_after=rows_after,
        version_before=version_before,
        version_after=version_after,
        seconds=run.summary.seconds,
    )
    write_report(report, cfg)
    return report
