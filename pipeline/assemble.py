"""Between encode and write: one shard's rows, back from Ray in any order, become the tables to commit.

Ids are unique by construction: a key that repeats inside a shard keeps its first row (in shard order),
and every later row with that key goes to `rejected` as skipped, under its positional id, so that no
two rows of any table share an id.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.prepare import FAILED, OK, SKIPPED, Batch
from pipeline.read import row_id
from pipeline.write import REJECTED_SCHEMA

STAGE_TIMERS = ("t_read", "t_decode", "t_score", "t_encode")


@dataclass
class ShardTables:
    images: pa.Table
    rejected: pa.Table
    rows_ok: int = 0
    rows_failed: int = 0
    rows_skipped: int = 0
    routes: Counter = field(default_factory=Counter)
    gflops: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _text(values: np.ndarray, type: pa.DataType | None = None) -> pa.Array:
    """Object array of str/bytes/None -> arrow strings (or binary), each value as long as itself (numpy's
    `astype(str)` would pad every value to the longest one). Ray Data hands over a column that is null in
    every row of a batch as float NaNs, so NaN means null here (`from_pandas`)."""
    type = type or pa.string()
    if values.dtype.kind == "f":
        return pa.nulls(len(values), type)
    return pa.array(values, type, from_pandas=True)


def mark_duplicates(rows: Batch, shard_name: str, seen: dict[str, int] | None = None) -> Batch:
    """Rows in shard order, with every repeat of an id turned into a skipped row under its positional id.

    `seen` (id -> row) carries the ids of parts of this shard already written, and is updated: for a shard
    written in parts, a key's first row to arrive is the one kept."""
    order = np.argsort(rows["row"], kind="stable")
    rows = {k: v[order] for k, v in rows.items()}  # fresh arrays: safe to edit below
    codes = pa.array(rows["id"], pa.string()).dictionary_encode().indices.to_numpy()
    unique, first = np.unique(codes, return_index=True)
    first_row = rows["row"][first[np.searchsorted(unique, codes)]]
    repeat = first_row != rows["row"]
    if seen:
        earlier = np.fromiter((i in seen for i in rows["id"]), bool, count=len(codes))
        first_row[earlier] = [seen[i] for i in rows["id"][earlier]]
        repeat |= earlier
    if repeat.any():
        rows["outcome"][repeat] = SKIPPED
        rows["reason"][repeat] = [
            f"duplicate key: row {r} of the shard has it and was kept" for r in first_row[repeat]
        ]
        rows["id"][repeat] = [row_id(shard_name, None, int(r)) for r in rows["row"][repeat]]
    if seen is not None:
        seen.update(zip(rows["id"][~repeat].tolist(), rows["row"][~repeat].tolist(), strict=True))
    return rows


def shard_tables(
    rows: Batch, shard_name: str, model_id: str, seen: dict[str, int] | None = None
) -> ShardTables:
    """The images and rejected tables of one shard's rows (all of them, or one part: see `seen`)."""
    rows = mark_duplicates(rows, shard_name, seen)
    outcome = rows["outcome"]
    ok, bad = outcome == OK, outcome != OK
    images = pa.table(
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
            "model_id": pa.array([model_id] * int(ok.sum()), pa.string()),
            "thumbnail": _text(rows["thumbnail"][ok], pa.binary()),
        }
    )
    rejected = pa.table(
        {
            **{name: _text(rows[name][bad]) for name in ("id", "shard", "key", "url", "caption")},
            "status": _text(outcome[bad]),
            "reason": _text(rows["reason"][bad]),
            "model_id": pa.array([model_id] * int(bad.sum()), pa.string()),
        },
        schema=REJECTED_SCHEMA,
    )
    return ShardTables(
        images=images,
        rejected=rejected,
        rows_ok=int(ok.sum()),
        rows_failed=int((outcome == FAILED).sum()),
        rows_skipped=int((outcome == SKIPPED).sum()),
        routes=Counter(rows["route_name"][ok].tolist()),
        gflops=float(rows["gflops"][ok].sum()),
        stage_seconds={timer: float(rows[timer].sum()) for timer in STAGE_TIMERS},
    )
