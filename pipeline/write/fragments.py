"""On the workers: encoded rows become Lance fragment files of the output tables, and the driver gets back
only what it needs to commit them — fragment metadata, counts and timings, a few hundred bytes per part.

A part is the rows of one shard that one worker wrote (a row group on CPU plans, the shard's rows of one
encoder batch on GPU plans). Its fragments are invisible until the driver commits them; a part whose
shard fails, or whose run dies first, is never committed, and its files are removed by the next run
(`output.OutputTables.remove_orphans`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline.prepare import FAILED, OK, SKIPPED, UNREADABLE, Batch
from pipeline.storage import retrying
from pipeline.write.schema import REJECTED_SCHEMA

if TYPE_CHECKING:
    from lance.fragment import FragmentMetadata

STAGE_TIMERS = ("t_read", "t_decode", "t_score", "t_encode", "t_write")


@dataclass(frozen=True)
class FragmentTarget:
    """Where a run's workers write: the Lance datasets of the generation's images and rejected tables."""

    images_uri: str
    rejected_uri: str
    images_schema: pa.Schema
    model_id: str
    storage_options: dict[str, str]
    rows_per_fragment: int
    write_attempts: int = 5  # output.commit_attempts: an S3 outage of seconds fails no shard
    backoff_seconds: float = 1.0


def _text(values: np.ndarray, type: pa.DataType | None = None) -> pa.Array:
    """Object array of str/bytes/None -> arrow strings (or binary), each value as long as itself (numpy's
    `astype(str)` would pad every value to the longest one). Ray Data hands over a column that is null in
    every row of a batch as float NaNs, so NaN means null here (`from_pandas`)."""
    type = type or pa.string()
    if values.dtype.kind == "f":
        return pa.nulls(len(values), type)
    return pa.array(values, type, from_pandas=True)


def images_rows(rows: Batch, target: FragmentTarget) -> pa.Table:
    """The images-table rows of the ok rows of an encoded batch."""
    ok = rows["outcome"] == OK
    table = pa.table(
        {
            **{name: _text(rows[name][ok]) for name in ("id", "shard", "key", "url", "caption")},
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(rows["vector"][ok].reshape(-1)), rows["vector"].shape[1]
            ),
            "complexity": rows["complexity"][ok],
            "route": _text(rows["route_name"][ok]),
            "exit_depth": rows["exit_depth"][ok],
            "tokens": rows["tokens"][ok],
            "gflops": rows["gflops"][ok],
            "model_id": pa.array([target.model_id] * int(ok.sum()), pa.string()),
            "thumbnail": _text(rows["thumbnail"][ok], pa.binary()),
        }
    )
    return table.cast(target.images_schema)


def rejected_rows(rows: Batch, model_id: str) -> pa.Table:
    """The rejected-table rows (failed or skipped) of an encoded batch."""
    bad = rows["outcome"] != OK
    return pa.table(
        {
            **{name: _text(rows[name][bad]) for name in ("id", "shard", "key", "url", "caption")},
            "status": _text(rows["outcome"][bad]),
            "reason": _text(rows["reason"][bad]),
            "model_id": pa.array([model_id] * int(bad.sum()), pa.string()),
        },
        schema=REJECTED_SCHEMA,
    )


@dataclass
class Part:
    """What one worker wrote of one shard: the row it sends to the driver (`row`)."""

    shard: str
    rows: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    rows_skipped: int = 0
    images: list[FragmentMetadata] | None = None
    rejected: list[FragmentMetadata] | None = None
    routes: Counter | None = None
    gflops: float = 0.0
    error: str = ""

    def row(self, seconds: dict[str, float]) -> dict:
        return {
            "shard": self.shard,
            "rows": self.rows,
            "rows_ok": self.rows_ok,
            "rows_failed": self.rows_failed,
            "rows_skipped": self.rows_skipped,
            "images": json.dumps([f.to_json() for f in self.images or []]),
            "rejected": json.dumps([f.to_json() for f in self.rejected or []]),
            "routes": json.dumps(dict(self.routes or {})),
            "gflops": self.gflops,
            "error": self.error,
            **seconds,
        }


def fragments_of(text: str) -> list[FragmentMetadata]:
    """A part's fragment list as sent (`Part.row`), back as Lance objects (in the driver)."""
    from lance.fragment import FragmentMetadata

    return [FragmentMetadata.from_json(json.dumps(f)) for f in json.loads(text)]


def write_part(batches: Iterable[Batch], shard: str, target: FragmentTarget) -> dict:
    """Write one shard's encoded batches as fragments of the images and rejected tables; the part's row.

    The part's table rows are held until its batches are all encoded (embeddings and thumbnails: a few
    kB a row, never the pixels), so that a write S3 fails for seconds is tried again whole. A batch that
    says its row group was unreadable fails the part: nothing of it is written."""
    part, seconds = Part(shard, routes=Counter()), dict.fromkeys(STAGE_TIMERS, 0.0)
    images, rejected = [], []
    for rows in batches:
        unreadable = rows["outcome"] == UNREADABLE
        if unreadable.any():
            part.error = str(rows["reason"][unreadable][0])
            return part.row(seconds)
        started = time.perf_counter()
        outcome = rows["outcome"]
        ok = outcome == OK
        part.rows += len(outcome)
        part.rows_ok += int(ok.sum())
        part.rows_failed += int((outcome == FAILED).sum())
        part.rows_skipped += int((outcome == SKIPPED).sum())
        part.routes.update(rows["route_name"][ok].tolist())
        part.gflops += float(rows["gflops"][ok].sum())
        for timer in STAGE_TIMERS[:-1]:
            seconds[timer] += float(rows[timer].sum())
        images.append(images_rows(rows, target))
        rejected.append(rejected_rows(rows, target.model_id))
        seconds["t_write"] += time.perf_counter() - started
    started = time.perf_counter()
    part.images = _write(images, target.images_uri, target)
    part.rejected = _write(rejected, target.rejected_uri, target)
    seconds["t_write"] += time.perf_counter() - started
    return part.row(seconds)


def _write(tables: list[pa.Table], uri: str, target: FragmentTarget) -> list[FragmentMetadata]:
    """Fragment files of `tables` (none when they hold no row), retried while S3 fails transiently (a
    failed try leaves unreferenced files, removed by the next run)."""
    from lance.fragment import write_fragments  # in the worker only

    rows = pa.concat_tables(tables) if tables else None
    if rows is None or rows.num_rows == 0:
        return []
    return retrying(
        lambda _: write_fragments(
            rows,
            uri,
            schema=rows.schema,
            max_rows_per_file=target.rows_per_fragment,
            storage_options=target.storage_options or None,
        ),
        target.write_attempts,
        target.backoff_seconds,
        what="fragment write",
    )


def write_parts(rows: Batch, target: FragmentTarget) -> Batch:
    """An encoded batch that may span shards (GPU plans): one part per shard, as a batch of part rows."""
    parts = [
        write_part([{k: v[rows["shard"] == name] for k, v in rows.items()}], str(name), target)
        for name in np.unique(rows["shard"])
    ]
    return part_batch(parts)


def part_batch(parts: list[dict]) -> Batch:
    """Part rows as the columns Ray Data carries to the driver."""
    return {name: np.asarray([p[name] for p in parts], dtype=object) for name in parts[0]} if parts else {}
