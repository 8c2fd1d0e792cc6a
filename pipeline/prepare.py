"""Stages 1-3 on the CPU workers: read a row group -> decode -> score -> route, yielding uint8 batches.

Plain Python, testable without Ray, and free of torch so CPU workers start fast. Rows that cannot be
encoded travel on with an outcome and a reason, so the writer records every row.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from functools import cache
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import IndexConfig
from pipeline.decode import DecodeError, Preprocess, decode
from pipeline.read import Shard, ShardChanged, ShardPlan, read_chunks, row_id
from pipeline.route import assign_routes
from pipeline.score import Scorer, complexity_features, load_scorer

OK, FAILED, SKIPPED = "ok", "failed", "skipped"
UNREADABLE = "unreadable"  # outcome of a `failed_unit` marker row
READ_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.5
Batch = dict[str, np.ndarray]


@cache
def scorer_for(spec: str) -> Scorer:
    """One scorer per worker process (a learned one is read from disk once)."""
    return load_scorer(spec)


def work_unit(plan: ShardPlan, row_group: int) -> dict[str, Any]:
    """A Ray-serialisable description of one row group to prepare."""
    shard = plan.shard
    return {
        "uri": shard.uri,
        "name": shard.name,
        "fingerprint": shard.fingerprint,
        "row_group": row_group,
        "num_rows": plan.num_rows,
        **{f"col_{k}": v or "" for k, v in plan.columns.items()},
    }


def bundle_units(
    units: list[dict[str, Any]], rows: list[float], task_rows: int, actors: int
) -> list[dict[str, str]]:
    """Work units packed, in order, into Ray tasks of at most about `task_rows` rows, each also at most
    1/(2 x actors) of the rows not yet packed (guided self-scheduling), down to a floor: the early tasks
    are big, so the fixed cost of a task (Ray Data dispatches the next one about 0.12 s after an actor
    finishes one, measured with an empty task) is paid rarely, and the last ones are small, so the actors
    finish together. A row group bigger than the target still travels alone. A task whose worker dies
    takes its bundle's shards with it (`ray.task_rows` bounds how many)."""
    remaining = float(sum(rows))
    floor = min(task_rows / 8, remaining / (4 * max(actors, 1)))  # small jobs: still 4+ tasks per actor
    bundles: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    filled = target = 0.0
    for unit, n in zip(units, rows, strict=True):
        if current and filled + n > target:
            bundles.append(current)
            remaining -= filled
            current, filled = [], 0.0
        if not current:
            target = min(task_rows, max(floor, remaining / (2 * max(actors, 1))))
        current.append(unit)
        filled += n
    if current:
        bundles.append(current)
    return [{"bundle": json.dumps(bundle)} for bundle in bundles]


def unbundle(items: Batch) -> Batch:
    """The units of a batch of bundles, as the columns `prepare_unit` takes."""
    units = [unit for text in items["bundle"] for unit in json.loads(str(text))]
    return {key: np.asarray([unit[key] for unit in units]) for key in units[0]}


def _plan_from_unit(unit: dict[str, Any]) -> ShardPlan:
    columns = {k[4:]: (v or None) for k, v in unit.items() if k.startswith("col_")}
    shard = Shard(uri=str(unit["uri"]), name=str(unit["name"]), fingerprint=str(unit["fingerprint"]))
    return ShardPlan(shard, int(unit["num_rows"]), 0, columns)


def prepare_rows(table: pa.Table, cfg: IndexConfig, preprocess: Preprocess) -> Batch:
    """Decode, score and route one chunk of rows; each row gets an outcome and, if not ok, a reason."""
    n = table.num_rows
    started = time.perf_counter()
    outcome = np.full(n, OK, dtype=object)
    reason = np.full(n, "", dtype=object)
    ids, repeat = _skip_repeats(table, outcome, reason)
    images, bytes_per_pixel, thumbnails = _decode_rows(table, repeat, outcome, reason, cfg, preprocess)
    decoded = time.perf_counter()
    complexity, route = _score_and_route(images, bytes_per_pixel, outcome == OK, cfg)
    scored = time.perf_counter()
    batch: Batch = {
        name: np.asarray(table.column(name).to_pylist(), dtype=object)
        for name in ("shard", "key", "url", "caption")
    }
    batch.update(
        id=ids,
        row=table.column("row").to_numpy(),
        outcome=outcome,
        reason=reason,
        image=images,
        thumbnail=thumbnails,
        complexity=complexity,
        route=route,
        t_decode=np.full(n, (decoded - started) / max(n, 1), np.float32),
        t_score=np.full(n, (scored - decoded) / max(n, 1), np.float32),
    )
    # Rows leave grouped by route (stable). The encoder's batches are runs of consecutive rows, so most
    # of them then hold a single route and run as one dense forward instead of several small ones.
    order = np.argsort(route, kind="stable")
    return {name: column[order] for name, column in batch.items()}


def _skip_repeats(table: pa.Table, outcome: np.ndarray, reason: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The chunk's ids, and which rows repeat a key: a row whose id an earlier row of the shard holds
    (`repeat_of`, from `read_chunks`) is skipped before any decode and takes its positional id, so that
    ids stay unique whichever worker writes the row. Marks those rows in `outcome` and `reason`."""
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    repeat_of = table.column("repeat_of").to_numpy()
    repeat = repeat_of >= 0
    if repeat.any():
        shard = table.column("shard")[0].as_py()
        rows = table.column("row").to_numpy()
        outcome[repeat] = SKIPPED
        reason[repeat] = [
            f"duplicate key: row {r} of the shard has it and was kept" for r in repeat_of[repeat]
        ]
        ids[repeat] = [row_id(shard, None, int(r)) for r in rows[repeat]]
    return ids, repeat


def _decode_rows(
    table: pa.Table,
    repeat: np.ndarray,
    outcome: np.ndarray,
    reason: np.ndarray,
    cfg: IndexConfig,
    preprocess: Preprocess,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels, compressed bytes per pixel and thumbnail of every row that decodes; a row that does
    not (a caption that failed to read, a source failure, no image, a bad image) gets its outcome and
    reason in `outcome` and `reason` instead."""
    n = table.num_rows
    images = np.zeros((n, *preprocess.size, 3), np.uint8)
    bytes_per_pixel = np.zeros(n, np.float32)
    thumbnails = np.full(n, None, dtype=object)
    statuses = table.column("status").to_pylist()
    errors = table.column("error_message").to_pylist()
    text_errors = table.column("text_error").to_pylist()
    for i, (status, data) in enumerate(zip(statuses, table.column("image").to_pylist(), strict=True)):
        if repeat[i]:
            continue
        if text_errors[i]:
            outcome[i], reason[i] = FAILED, text_errors[i]
            continue
        if status != "success":
            outcome[i], reason[i] = SKIPPED, f"source status {status!r}: {errors[i] or 'no error message'}"
            continue
        if data is None:
            outcome[i], reason[i] = SKIPPED, "image is null"
            continue
        try:
            images[i], (w, h), thumbnails[i] = decode(
                data, preprocess, cfg.decode.max_pixels, cfg.decode.use_draft, cfg.output.thumbnail_side
            )
            bytes_per_pixel[i] = len(data) / (w * h)
        except DecodeError as exc:
            outcome[i], reason[i] = FAILED, str(exc)
    return images, bytes_per_pixel, thumbnails


def _score_and_route(
    images: np.ndarray, bytes_per_pixel: np.ndarray, ok: np.ndarray, cfg: IndexConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Complexity (NaN where not `ok`) and route index (0 where not `ok`) of each row."""
    complexity = np.full(len(ok), np.nan, np.float32)
    route = np.zeros(len(ok), np.int32)
    if ok.any():  # a chunk where no image decoded has nothing to score
        complexity[ok] = scorer_for(cfg.router.scorer)(complexity_features(images[ok], bytes_per_pixel[ok]))
        route[ok] = assign_routes(complexity[ok], cfg.router)
    return complexity, route


def failed_unit(unit: dict[str, Any], reason: str, preprocess: Preprocess) -> Batch:
    """One marker row saying that a row group could not be read: the writer fails its whole shard (the
    shard's other row groups are dropped too) instead of the job failing."""
    text = {name: np.asarray([None], dtype=object) for name in ("key", "url", "caption")}
    return text | {
        "id": np.asarray([""], dtype=object),
        "shard": np.asarray([str(unit["name"])], dtype=object),
        "row": np.asarray([-1], np.int64),
        "outcome": np.asarray([UNREADABLE], dtype=object),
        "reason": np.asarray([reason], dtype=object),
        "image": np.zeros((1, *preprocess.size, 3), np.uint8),
        "thumbnail": np.asarray([None], dtype=object),
        "complexity": np.full(1, np.nan, np.float32),
        "route": np.zeros(1, np.int32),
        **{timer: np.zeros(1, np.float32) for timer in ("t_decode", "t_score", "t_read")},
    }


def _prepare_row_group(unit: dict[str, Any], config: IndexConfig, preprocess: Preprocess) -> Iterator[Batch]:
    """Prepared chunks of one row group. Transient I/O errors (a timeout, a dropped connection) are
    retried with backoff, resuming after the chunks already yielded, so no row is sent twice; a shard
    that changed since it was listed (`ShardChanged`) is not transient and is not retried."""
    plan = _plan_from_unit(unit)
    sent = 0
    for attempt in range(READ_ATTEMPTS):
        try:
            chunks = read_chunks(plan, int(unit["row_group"]), config.input, config.ray.decode_batch_size)
            for index in itertools.count():
                started = time.perf_counter()
                table = next(chunks, None)
                if table is None:
                    return
                if index < sent:
                    continue
                read_seconds = time.perf_counter() - started
                batch = prepare_rows(table, config, preprocess)
                batch["t_read"] = np.full(table.num_rows, read_seconds / max(table.num_rows, 1), np.float32)
                sent += 1
                yield batch
        except OSError:
            if attempt == READ_ATTEMPTS - 1:
                raise
            time.sleep(RETRY_BACKOFF_S * 2**attempt)


def prepare_unit(units: Batch, cfg: dict[str, Any], preprocess: Preprocess) -> Iterator[Batch]:
    """Ray map_batches generator: one unit (row group) in, chunks of prepared rows out.

    A row group that cannot be read (a corrupt page after a valid footer, I/O still failing after the
    retries) becomes a `failed_unit` marker naming the file, the row group and the error."""
    config = IndexConfig.model_validate(cfg)
    for i in range(len(units["uri"])):
        unit = {k: v[i] for k, v in units.items()}
        try:
            yield from _prepare_row_group(unit, config, preprocess)
        except ShardChanged as exc:  # names the file and says what changed
            yield failed_unit(unit, str(exc), preprocess)
        except Exception as exc:  # noqa: BLE001 - any read error fails this shard, not the job
            where = f"{unit['uri']} (row group {int(unit['row_group'])})"
            yield failed_unit(unit, f"{where}: unreadable ({type(exc).__name__}: {exc})", preprocess)
