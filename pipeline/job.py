"""The indexing job: shards -> Ray (prepare on CPU tasks, encode on an actor pool) -> LanceDB.

Reads top to bottom like the architecture: list and inspect shards, skip the ones already committed,
stream row groups through the two Ray stages, and commit each shard as soon as all its rows are back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import open_clip
import pyarrow as pa
import ray

from pipeline.alias import Aliases, Generation, target_generation
from pipeline.assemble import STAGE_TIMERS, shard_tables
from pipeline.config import IndexConfig
from pipeline.decode import Preprocess
from pipeline.encode.actor import DecodeEncodeStage, EncodeStage
from pipeline.encode.flops import full_depth_gflops
from pipeline.encode.model import model_preprocess
from pipeline.lease import TableLease
from pipeline.prepare import UNREADABLE, prepare_unit, work_unit
from pipeline.progress import Progress, quiet_ray_data
from pipeline.read import Shard, ShardPlan, inspect_shard, list_shards
from pipeline.score import load_scorer
from pipeline.write import DONE, LanceWriter, ShardRecord
from pipeline.write import FAILED as SHARD_FAILED

PREPARE_TASK_MEMORY = 512 * 2**20  # bytes reserved per prepare task: one row group plus decoded pixels


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
    write_seconds: float = 0.0
    failed_shards: dict[str, str] = field(default_factory=dict)  # uri -> why
    commits: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, rows ok so far)
    peak_buffered_rows: int = 0  # the most rows the driver held at once

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
        busy = {k[2:]: v for k, v in self.stage_seconds.items()} | {"write": self.write_seconds}
        lines.append(
            "stage seconds (summed over workers): " + ", ".join(f"{k} {v:.1f}" for k, v in busy.items())
        )
        lines += [f"FAILED shard {uri}: {why}" for uri, why in self.failed_shards.items()]
        return "\n".join(lines)


def init_ray(cfg: IndexConfig, verbose: bool = False) -> None:
    """Connect to the configured cluster, the one a `ray job submit` set up, or start a local Ray.

    The embedded Ray keeps token authentication on (Ray's default) but starts without a dashboard and,
    unless `verbose`, without start-up chatter; a cluster's dashboard is the place to watch a big job."""
    if not ray.is_initialized():
        level = logging.INFO if verbose else logging.ERROR
        if cfg.ray.address:
            ray.init(address=cfg.ray.address, logging_level=level)
        elif os.environ.get("RAY_ADDRESS"):
            ray.init(logging_level=level)
        else:
            ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=verbose, logging_level=level)
    quiet_ray_data(verbose)


@dataclass
class _Written:
    """A shard written in parts so far: its record's running counts, when it began, the ids it holds."""

    record: ShardRecord
    started: float
    parts: int = 0
    seen: dict[str, int] = field(default_factory=dict)


class _ShardAssembler:
    """Buffers each shard's rows until all have come back from Ray, then commits the shard (shards are
    keyed by name, the `shard` column of the rows).

    The driver holds at most `max_buffered_rows` rows plus one row group's: past that, the shard holding
    the most is written as a part (its manifest row stays `writing` until its last part, so a crash in
    between makes the next run replace the shard)."""

    def __init__(
        self,
        writer: LanceWriter,
        plans: dict[str, ShardPlan],
        known: set[str],
        summary: RunSummary,
        progress: Progress,
        started: float,
        max_buffered_rows: int,
    ):
        self.writer, self.plans, self.known = writer, plans, known
        self.summary, self.progress, self.started = summary, progress, started
        self.max_buffered_rows = max_buffered_rows
        self.parts: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)
        self.rows: Counter = Counter()  # rows received per shard
        self.buffered: Counter = Counter()  # rows held per shard
        self.written: dict[str, _Written] = {}
        self.failed: set[str] = set()

    def add(self, batch: dict[str, np.ndarray]) -> None:
        held = self.buffered.total() + len(batch["shard"])  # before any shard of it commits
        self.summary.peak_buffered_rows = max(self.summary.peak_buffered_rows, held)
        for name in np.unique(batch["shard"]):
            mask = batch["shard"] == name
            if name in self.failed:
                continue
            rows = {k: v[mask] for k, v in batch.items()}
            unreadable = rows["outcome"] == UNREADABLE
            if unreadable.any():
                self.fail(name, str(rows["reason"][unreadable][0]))
                continue
            n = int(mask.sum())
            self.parts[name].append(rows)
            self.rows[name] += n
            self.buffered[name] += n
            self.progress.advance(n)
            if self.rows[name] == self.plans[name].num_rows:
                self.commit(name)
            elif self.rows[name] > self.plans[name].num_rows:
                uri = self.plans[name].shard.uri
                raise RuntimeError(f"{uri}: received more rows than the shard holds; refusing to write")
        while self.buffered.total() > self.max_buffered_rows:
            self.write(max(self.buffered, key=self.buffered.__getitem__), final=False)

    def fail(self, name: str, reason: str) -> None:
        """A row group of this shard could not be read: drop its rows, record why, go on with the rest."""
        self.failed.add(name)
        self.parts.pop(name, None)
        self.buffered.pop(name, None)
        self.written.pop(name, None)  # parts already written stay under `writing`: the next run replaces them
        shard = self.plans[name].shard
        self.writer.record_failed_shard(ShardRecord.of(shard, SHARD_FAILED, reason))
        self.summary.shards_failed += 1
        self.summary.failed_shards[shard.uri] = reason
        self.progress.note(f"FAILED {reason}")
        self.progress.shard_done(None)

    def commit(self, name: str) -> None:
        self.write(name, final=True)

    def write(self, name: str, final: bool) -> None:
        """Write the rows held for a shard: the whole shard (one commit per table), or its next part."""
        plan, s = self.plans[name], self.summary
        parts = self.parts.pop(name, [])
        self.buffered.pop(name, None)
        state = self.written.get(name)
        if state is None and not final:  # the first part of a shard too large to hold
            record = ShardRecord.of(plan.shard, DONE)
            state = self.written[name] = _Written(record, self.writer.begin_shard(record))
        record = state.record if state else ShardRecord.of(plan.shard, DONE)
        images = rejected = pa.table({})
        if parts:
            rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            tables = shard_tables(rows, plan.shard.name, self.writer.model_id, state.seen if state else None)
            images, rejected = tables.images, tables.rejected
            record.rows_ok += tables.rows_ok
            record.rows_failed += tables.rows_failed
            record.rows_skipped += tables.rows_skipped
            s.routes.update(tables.routes)
            s.gflops_sum += tables.gflops
            for timer, seconds in tables.stage_seconds.items():
                s.stage_seconds[timer] += seconds
        t0, known = time.perf_counter(), name in self.known
        if state is None:
            self.writer.commit_shard(record, images, rejected, upsert=known)
        else:
            mode = ("replace" if state.parts == 0 else "upsert") if known else "append"
            self.writer.put_part(name, images, rejected, mode)
            state.parts += 1
            if final:
                self.writer.finish_shard(record, state.started)
                del self.written[name]
        s.write_seconds += time.perf_counter() - t0
        if not final:
            return
        s.shards_committed += 1
        s.rows_ok += record.rows_ok
        s.rows_failed += record.rows_failed
        s.rows_skipped += record.rows_skipped
        s.commits.append((time.time() - self.started, s.rows_ok))
        self.progress.shard_done(
            f"committed {plan.shard.name}: {record.rows_ok} ok, {record.rows_failed} failed, "
            f"{record.rows_skipped} skipped"
        )


def encoder_actors(cfg: IndexConfig) -> int:
    """The configured pool size, else as many actors as the cluster's GPUs (or CPUs) can hold."""
    if cfg.encoder.actors is not None:
        return cfg.encoder.actors
    resources = ray.cluster_resources()
    if cfg.encoder.gpus_per_actor > 0:
        return max(1, int(resources.get("GPU", 0) / cfg.encoder.gpus_per_actor))
    return max(1, int(resources.get("CPU", 1) / cfg.encoder.cpus_per_actor))


def stream(work: list[dict], cfg: IndexConfig, preprocess: Preprocess) -> ray.data.Dataset:
    """Row groups -> embedded rows, with the resources declared where each stage is declared.

    GPU encoders: decode/score run on CPU tasks of their own (a memory reservation of its own keeps Ray
    from fusing them into the GPU actors), so the GPUs never wait on JPEG decoding. CPU encoders: the
    stages share the same cores anyway, so one actor per core decodes, scores and encodes its own rows.

    A process that dies under a batch (a decoder segfault on one image, an OOM kill, its node lost) is
    restarted and the batch retried at most `encoder.max_restarts` times, never forever (Ray Data's
    default for actor pools); past that, Ray Data drops the batch and goes on (`max_errored_blocks=-1`),
    and `index_pending` fails the shards whose rows never came back. The actor process itself is always
    restarted: Ray 2.60 never replaces a pool actor that is dead for good, so a bounded actor would shrink
    the pool and, once every actor is gone, stall the job (ray-project/ray#62746). The tasks queued on an
    actor die with it and spend a retry each, so a CPU actor (row groups in, no pixels to prefetch) takes
    one task at a time; a GPU actor keeps Ray Data's two, the next batch's pixels travelling meanwhile."""
    cfg_dict = cfg.model_dump()
    retries = cfg.encoder.max_restarts
    units = ray.data.from_items(work, override_num_blocks=len(work))
    cpu_plan = cfg.encoder.gpus_per_actor == 0
    encoder_args = {
        # never more actors than row groups: an idle actor costs a model load and Ray warns about it
        "compute": ray.data.ActorPoolStrategy(
            size=min(encoder_actors(cfg), len(work)), max_tasks_in_flight_per_actor=1 if cpu_plan else None
        ),
        "num_cpus": cfg.encoder.cpus_per_actor,
        "max_restarts": -1,
        "max_task_retries": retries,
    }
    # Ray 2.60 deprecates passing actor options as keyword arguments but has no named parameter for these
    # two (ray-project/ray#65227 names the ones it adds): the warning is for Ray 2.64, not for the user.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
        if cpu_plan:
            dataset = units.map_batches(
                DecodeEncodeStage,
                fn_constructor_kwargs={"cfg": cfg_dict, "preprocess": preprocess},
                batch_size=1,
                **encoder_args,
            )
        else:
            dataset = units.map_batches(
                prepare_unit,
                batch_size=1,
                fn_kwargs={"cfg": cfg_dict, "preprocess": preprocess},
                num_cpus=cfg.ray.decode_cpus,
                memory=PREPARE_TASK_MEMORY,
                max_retries=retries,  # the decoding happens here on this plan: the same bound
            ).map_batches(
                EncodeStage,
                fn_constructor_kwargs={"cfg": cfg_dict},
                batch_size=cfg.encoder.batch_size,
                num_gpus=cfg.encoder.gpus_per_actor,
                **encoder_args,
            )
    dataset.context.max_errored_blocks = -1
    return dataset


@dataclass
class Run:
    """One job's hold on its output: the shards found, the writer (under the table's lease), the summary,
    the generation of tables it writes and the one `output.table` names now (`pipeline.alias`)."""

    cfg: IndexConfig
    shards: list[Shard]
    writer: LanceWriter
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
    """Check the config's files, list the shards, start Ray, take the table's lease, open the writer on
    the generation of tables this config's embedding identity writes (`alias.target_generation`: a
    changed identity is a ConfigError unless `switch`, reindex's, which builds a new generation).

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
        dim = int(model_cfg["embed_dim"])
        output = generation.output(cfg.output)
        writer = LanceWriter(output, cfg.model.model_id, dim, lease.check, cfg.input.dataset)
        if live is None:  # the first generation: named as soon as its tables exist, as tables always were
            lease.check()
            Aliases(cfg.output).switch(generation)
        summary = RunSummary(gflops_full=full_depth_gflops(model_cfg))
        run = Run(cfg, shards, writer, summary, preprocess, started, generation, live or generation)
        yield run
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
            run.writer.optimize()
    return run.summary


def index_pending(run: Run, progress: Progress) -> None:
    """Skip the committed shards, stream the rest through Ray, commit each shard as it completes."""
    cfg, shards, writer, summary = run.cfg, run.shards, run.writer, run.summary
    done, known = writer.committed(), writer.known()  # a known shard may hold rows: upsert it
    pending = [s for s in shards if done.get(s.name) != s.fingerprint]
    writer.relocate({s.name: s.uri for s in shards if done.get(s.name) == s.fingerprint})
    summary.shards_total, summary.shards_already_done = len(shards), len(shards) - len(pending)
    progress.note(
        f"{len(shards)} shards found, {summary.shards_already_done} already indexed, {len(pending)} to do; "
        f"routes: {', '.join(r.name for r in cfg.router.routes)}"
    )
    with ThreadPoolExecutor(max_workers=16) as pool:
        plans = list(pool.map(lambda s: inspect_shard(s, cfg.input), pending))

    plan_of = {p.shard.name: p for p in plans}
    assembler = _ShardAssembler(
        writer, plan_of, known, summary, progress, run.started, cfg.output.max_buffered_rows
    )
    progress.start(len(plans), sum(p.num_rows for p in plans if not p.error))
    units = []
    for plan in plans:
        if plan.error:
            writer.record_failed_shard(ShardRecord.of(plan.shard, SHARD_FAILED, plan.error))
            summary.shards_failed += 1
            summary.failed_shards[plan.shard.uri] = plan.error
            progress.note(f"FAILED {plan.error}")
            progress.shard_done(None)
        elif plan.num_rows == 0:
            assembler.commit(plan.shard.name)
        else:
            units += [work_unit(plan, rg) for rg in range(plan.row_groups)]

    if not units:
        return
    batches = iter(stream(units, cfg, run.preprocess).iter_batches(batch_size=None, batch_format="numpy"))
    # closing: a writer error (S3 down, the lease lost) shuts the stream down before it propagates
    with _DroppedBatches() as dropped, contextlib.closing(batches):
        while (batch := dropped.next(batches)) is not None:
            assembler.add(batch)
    # Rows that never came back (a batch dropped after its retries, a stream that stopped): the shard
    # fails, like an unreadable one, and the next run retries it. Its parts already written, if any, stay
    # under `writing`, so the next run replaces them whole; nothing of it is marked done.
    for plan in plans:
        name, got = plan.shard.name, assembler.rows[plan.shard.name]
        if not plan.error and got < plan.num_rows and name not in assembler.failed:
            lost = f"{plan.num_rows - got} of its {plan.num_rows} rows never came back from Ray"
            assembler.fail(name, f"{plan.shard.uri}: {lost}: {dropped.reason(cfg)}")


class _DroppedBatches(logging.Handler):
    """What Ray Data gave up on while streaming: the error of each batch it dropped (it logs each one,
    with its exception, under `max_errored_blocks=-1`), or the error that stopped the stream."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[BaseException] = []
        self.stopped: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])

    def __enter__(self) -> _DroppedBatches:
        logging.getLogger("ray.data").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("ray.data").removeHandler(self)

    def next(self, batches: Iterator[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
        """The stream's next batch; None at its end, or when it failed (the error is kept, the job goes
        on to fail the shards it left incomplete: the writer's own errors are not caught here)."""
        try:
            return next(batches)
        except StopIteration:
            return None
        except Exception as exc:  # noqa: BLE001 - whatever stopped Ray, the shards it left fail
            self.stopped = exc
            return None

    def reason(self, cfg: IndexConfig) -> str:
        def short(exc: BaseException) -> str:
            first = (str(exc).strip().splitlines() or [""])[0]
            return f"{type(exc).__name__}: {first[:300]}"

        if self.stopped is not None:
            return f"the stream stopped ({short(self.stopped)})"
        errors = "; ".join(list(dict.fromkeys(short(e) for e in self.errors))[:3]) or "no error reported"
        n = cfg.encoder.max_restarts
        for died, who in (
            (ray.exceptions.RayActorError, "the encoder actor"),
            (ray.exceptions.WorkerCrashedError, "the worker decoding it"),  # the GPU plan's CPU tasks
        ):
            if any(isinstance(e, died) for e in self.errors):
                return f"{who} died {n + 1} times on a batch (encoder.max_restarts={n}): {errors}"
        return f"Ray Data dropped a batch: {errors}"
