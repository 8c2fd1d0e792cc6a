"""The nightly reindex: bring the table in line with the input, maintain it, and write a run report.

Under the table's lease, in one run: shards no longer in the input lose their rows (refused when that
would remove more than `reindex.max_removed_share` of the indexed shards: a mistyped pattern must not
empty the table); new shards are indexed and changed ones replaced, exactly as `icar index` does; then
LanceDB maintenance: compaction, new rows folded into the vector index (or the index rebuilt when more
than `reindex.rebuild_unindexed_share` of the rows are outside it), versions older than
`reindex.cleanup_older_than_days` pruned. The report (JSON + markdown) says what changed and what it cost.

A model, heads or router change (the embedding identity, `pipeline.alias`) re-embeds every shard into a
new generation of tables while queries go on reading the old one; the alias `output.table` switches to
the new generation in one commit once it is complete (no shard failed), and the generation it replaced
is dropped by the first reindex after `reindex.cleanup_older_than_days`.

A shard is "no longer in the input" when no input file has its name (`read.Shard`: dataset plus path
relative to the input root), wherever the input now is: a bucket moved to a new location is the same
shards, not a removal of them all.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import fsspec

from pipeline.alias import Aliases
from pipeline.config import ConfigError, IndexConfig
from pipeline.job import Run, index_pending, open_run
from pipeline.progress import Progress
from pipeline.query import build_indexes
from pipeline.storage import connect, is_local, output_filesystem
from pipeline.summary import RunSummary
from pipeline.write.commit import Committer

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
    identity: str  # the embedding identity this run wrote (pipeline.alias)
    physical_table: str  # the generation's images table it wrote
    switched: bool  # `table` now names that generation (it did not before this run)
    replaced_dropped: str | None  # identity of the replaced generation whose tables were dropped
    shards_removed: list[str]  # shard names
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
            f"embedding identity {self.identity} in `{self.physical_table}`"
            + (f"; `{self.table}` switched to it" if self.switched else ""),
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
        lines += [f"| removed {name} | rows deleted |" for name in self.shards_removed]
        if self.replaced_dropped:
            lines.append(f"| dropped the replaced tables | {self.replaced_dropped} |")
        return "\n".join(lines) + "\n"


def remove_missing(run: Run, input_names: set[str]) -> list[str]:
    """Delete the rows of every indexed shard whose name the input no longer lists; returns the names."""
    cfg = run.cfg
    indexed = run.manifest.known()
    removed = sorted(indexed - input_names)
    if not removed or not cfg.reindex.delete_removed:
        return []
    if len(removed) > cfg.reindex.max_removed_share * len(indexed):
        raise ConfigError(
            f"{len(removed)} of the {len(indexed)} indexed shards are missing from the input (e.g. "
            f"{removed[0]}); refusing to delete more than reindex.max_removed_share="
            f"{cfg.reindex.max_removed_share:g} of them. Check input.paths, or raise the share for this run"
        )
    Committer(run.tables, run.manifest, run.tables.cfg).remove(removed)
    return removed


def switch_when_complete(run: Run, progress: Progress) -> bool:
    """Point `output.table` at the generation this run built, in one commit, once it holds every input
    shard; with a vector index first when the live generation has one (queries must not lose it)."""
    if not run.switching:
        return False
    if run.summary.shards_failed:
        progress.note(
            f"not switched: {run.summary.shards_failed} shards failed; {run.cfg.output.table!r} stays on "
            f"{run.live.identity} until a reindex completes {run.generation.identity}"
        )
        return False
    live = run.live.output(run.cfg.output)
    old = connect(live).open_table(live.table)
    images = run.tables.images_table
    images.checkout_latest()
    if any(i.columns == ["vector"] for i in old.list_indices()) and images.count_rows():
        run.lease.check()
        build_indexes(run.cfg, table=images)
    run.lease.check()
    Aliases(run.cfg.output).switch(run.generation)
    progress.note(f"switched {run.cfg.output.table!r} to {run.generation.identity}")
    return True


def maintain(run: Run) -> Maintenance:
    """Compact, fold new rows into the vector index, prune old versions; then rebuild the vector index if
    too many rows were outside it (folding keeps the old partitions, which drift as the data grows)."""
    started, cfg = time.perf_counter(), run.cfg
    images = run.tables.images_table
    images.checkout_latest()
    rows = images.count_rows()
    vector_indexes = [i.name for i in images.list_indices() if i.columns == ["vector"]]
    unindexed = images.index_stats(vector_indexes[0]).num_unindexed_rows if vector_indexes else 0
    run.lease.check()
    run.tables.optimize(cleanup_older_than=timedelta(days=cfg.reindex.cleanup_older_than_days))
    action = "folded in" if vector_indexes else "none"
    if vector_indexes and rows and unindexed > cfg.reindex.rebuild_unindexed_share * rows:
        run.lease.check()
        build_indexes(cfg, table=images)
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
    with open_run(cfg, verbose, wait, switch=True) as run:
        images = run.tables.images_table
        rows_before, version_before = images.count_rows(), images.version
        removed = remove_missing(run, {s.name for s in run.shards})
        for name in removed:
            progress.note(f"removed {name}: no longer in the input")
        index_pending(run, progress)
        maintenance = maintain(run)
        switched = switch_when_complete(run, progress)
        run.lease.check()
        dropped = Aliases(cfg.output).drop_replaced(cfg.reindex.cleanup_older_than_days * 86400)
        images.checkout_latest()
        rows_after, version_after = images.count_rows(), images.version
    report = ReindexReport(
        started_utc=started_utc,
        input=list(cfg.input.paths),
        output=cfg.output.uri,
        table=cfg.output.table,
        model_id=cfg.model.model_id,
        identity=run.generation.identity,
        physical_table=run.tables.cfg.table,
        switched=switched,
        replaced_dropped=dropped,
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
