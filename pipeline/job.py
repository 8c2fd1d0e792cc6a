"""The indexing job: plan the shards -> stream row groups through Ray (decode/score, encode, write
fragments on the workers) -> collect whole shards -> commit them in rounds -> record them in the manifest.

Reads top to bottom like the architecture; the Ray graph is in `stream`, the write path in `write`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import open_clip

from pipeline.alias import Aliases, Generation, target_generation
from pipeline.cluster import init_ray
from pipeline.config import IndexConfig
from pipeline.decode import Preprocess
from pipeline.encode.flops import full_depth_gflops
from pipeline.encode.model import model_preprocess
from pipeline.lease import LeaseLost, TableLease
from pipeline.prepare import work_unit
from pipeline.progress import Progress
from pipeline.read import Shard, ShardPlan, inspect_shard, list_shards
from pipeline.score import load_scorer
from pipeline.stream import DroppedBatches, stream
from pipeline.summary import RunSummary
from pipeline.write.collect import ShardCollector
from pipeline.write.commit import Committer
from pipeline.write.manifest import ShardManifest, ShardRecord
from pipeline.write.output import OutputTables


@dataclass
class Run:
    """One job's hold on its output: the shards found, the tables it writes (under the alias's lease,
    fenced), their manifest, the summary, and the generation it writes and the one `output.table` names."""

    cfg: IndexConfig
    shards: list[Shard]
    tables: OutputTables
    manifest: ShardManifest
    lease: TableLease
    summary: RunSummary
    preprocess: Preprocess
    started: float
    generation: Generation
    live: Generation

    @property
    def switching(self) -> bool:
        """This run builds a new generation (a changed identity), to be switched to when complete."""
        return self.generation != self.live


@contextlib.contextmanager
def open_run(
    cfg: IndexConfig, verbose: bool = False, wait: bool = False, switch: bool = False
) -> Iterator[Run]:
    """Check the config's files, list the shards, start Ray, take the alias's lease, open and fence the
    tables of the generation this config's embedding identity writes (`alias.target_generation`: a changed
    identity is a ConfigError unless `switch`, reindex's, which builds a new generation), and remove the
    fragment files of runs that died before committing them.

    Raises `OutputBusy` if another job holds the lease (with `wait`, waits for it); the lease is released
    when the block ends, however it ends."""
    started = time.time()
    preprocess = model_preprocess(cfg.model)  # also checks that model.name is an open_clip model
    model_cfg = open_clip.get_model_config(cfg.model.name)
    load_scorer(cfg.router.scorer)  # a missing learned-scorer file fails here, before any work
    shards = list_shards(cfg.input)
    init_ray(cfg, verbose)  # before LanceDB is opened: Ray forks its processes, LanceDB warns on fork
    with TableLease(cfg.output).acquire(wait) as lease:
        generation, live = target_generation(cfg, switch)
        output = generation.output(cfg.output)
        tables = OutputTables(output, cfg.model.model_id, int(model_cfg["embed_dim"]), cfg.input.dataset)
        manifest = tables.fence()
        tables.remove_orphans(timedelta(days=cfg.reindex.cleanup_older_than_days))
        if live is None:  # the first generation: named as soon as its tables exist
            lease.check()
            Aliases(cfg.output).switch(generation)
        summary = RunSummary(gflops_full=full_depth_gflops(model_cfg))
        run = Run(
            cfg, shards, tables, manifest, lease, summary, preprocess, started, generation, live or generation
        )
        try:
            yield run
        except Exception as exc:
            if not isinstance(exc, LeaseLost):
                # a job that took the table over may have removed this run's uncommitted files under it
                # (its orphan cleanup): whatever failed then is the takeover's doing, reported as such
                lease.check()
            raise
        summary.seconds = time.time() - started


def run_index(
    cfg: IndexConfig, progress: Progress | None = None, verbose: bool = False, wait: bool = False
) -> RunSummary:
    """Index every shard of `cfg.input` not yet committed for this model; return the run's summary.

    `progress` gets the job's events (silent by default: a library does not print); `verbose` lets Ray
    and Ray Data log as they normally do. See `open_run` for the table's lease and `wait`."""
    with open_run(cfg, verbose, wait) as run:
        index_pending(run, progress or Progress.silent())
        if run.summary.shards_committed:
            run.lease.check()
            run.tables.optimize()
    return run.summary


def index_pending(run: Run, progress: Progress) -> None:
    """Skip the committed shards, stream the rest through Ray, commit whole shards in rounds."""
    plans = _inspect_pending(run, progress)
    committer = Committer(run.tables, run.manifest, run.tables.cfg, on_commit=_reporter(run, progress))
    collector = ShardCollector({p.shard.name: p for p in plans}, committer)
    progress.start(len(plans), sum(p.num_rows for p in plans if not p.error))
    units, rows = _work_units(plans, collector)
    if units:
        _stream_into(collector, units, rows, run, progress)
    committer.flush()
    _summarise(run.summary, collector, committer)


def _inspect_pending(run: Run, progress: Progress) -> list[ShardPlan]:
    """The plans of the shards not yet committed with their current contents; the committed ones are
    recorded where they are read from now."""
    cfg, shards, summary, manifest = run.cfg, run.shards, run.summary, run.manifest
    done = manifest.committed()
    pending = [s for s in shards if done.get(s.name) != s.fingerprint]
    manifest.relocate({s.name: s.uri for s in shards if done.get(s.name) == s.fingerprint})
    summary.shards_total, summary.shards_already_done = len(shards), len(shards) - len(pending)
    progress.note(
        f"{len(shards)} shards found, {summary.shards_already_done} already indexed, {len(pending)} to do; "
        f"routes: {', '.join(r.name for r in cfg.router.routes)}"
    )
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda s: inspect_shard(s, cfg.input), pending))


def _work_units(plans: list[ShardPlan], collector: ShardCollector) -> tuple[list[dict], list[float]]:
    """The row groups to stream and the rows each holds; a shard that cannot be read fails and an empty
    one is recorded right away, without Ray."""
    units: list[dict] = []
    rows: list[float] = []
    for plan in plans:
        if plan.error:
            collector.fail(plan.shard.name, plan.error)
        elif plan.num_rows == 0:
            collector.empty(plan)
        else:
            units += [work_unit(plan, rg) for rg in range(plan.row_groups)]
            rows += [plan.num_rows / plan.row_groups] * plan.row_groups
    return units, rows


def _stream_into(
    collector: ShardCollector, units: list[dict], rows: list[float], run: Run, progress: Progress
) -> None:
    """Stream the row groups through Ray into `collector`, which commits each shard once all of it is
    back; a shard whose rows never came back (a batch dropped after its retries, a stream that stopped)
    fails, like an unreadable one, and the next run retries it: nothing of it was committed."""
    cfg, summary = run.cfg, run.summary
    parts = stream(units, rows, cfg, run.preprocess, run.tables.target()).iter_batches(
        batch_size=None, batch_format="numpy"
    )
    # closing: a commit error (S3 down, the table lost) shuts the stream down before it propagates
    with DroppedBatches() as dropped, contextlib.closing(iter(parts)) as batches:
        while (batch := dropped.next(batches)) is not None:
            if collector.add(batch):
                summary.written.append((time.time() - run.started, collector.received.rows.total()))
            progress.advance(int(batch["rows"].sum()))
    for name, lost in collector.incomplete().items():
        plan = collector.plans[name]
        why = f"{lost} of its {plan.num_rows} rows never came back from Ray: {dropped.reason(cfg)}"
        collector.fail(name, f"{plan.shard.uri}: {why}")


def _summarise(summary: RunSummary, collector: ShardCollector, committer: Committer) -> None:
    """Add what the workers reported and what the commits cost to the run's summary."""
    received = collector.received
    summary.routes.update(received.routes)
    summary.gflops_sum += received.gflops
    for timer, seconds in received.stage_seconds.items():
        summary.stage_seconds[timer] += seconds
    summary.driver_bytes += received.bytes
    summary.commit_seconds, summary.commit_rounds = committer.stats.seconds, committer.stats.rounds
    for name, why in collector.failed.items():
        summary.shards_failed += 1
        summary.failed_shards[collector.plans[name].shard.uri] = why


def _reporter(run: Run, progress: Progress) -> Callable[[list[ShardRecord], list[ShardRecord]], None]:
    """What the job does as each round commits: count its shards and say so."""
    summary = run.summary

    def on_commit(committed: list[ShardRecord], failed: list[ShardRecord]) -> None:
        summary.shards_committed += len(committed)
        for record in committed:
            summary.rows_ok += record.rows_ok
            summary.rows_failed += record.rows_failed
            summary.rows_skipped += record.rows_skipped
            progress.shard_done(
                f"committed {record.shard}: {record.rows_ok} ok, {record.rows_failed} failed, "
                f"{record.rows_skipped} skipped"
            )
        for record in failed:
            progress.note(f"FAILED {record.error}")
            progress.shard_done(None)

    return on_commit
