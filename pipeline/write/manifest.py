"""The shard manifest of one alias: which shards are indexed, from which file version, with what counts.

It is an append-only log (a Lance table, `MANIFEST_SCHEMA`): recording a state appends a row, and a
shard's state is its row with the highest `seq`. The log is read once when a run opens the table and kept
in memory, so a lookup never scans it and a commit never rewrites it (an upsert would add a fragment and a
deletion file per commit, which is what made each commit slower than the last); `compact` rewrites it as
the current states when its fragments pile up.

States: `writing` (a commit of the shard's rows may have landed: a rerun deletes them before writing
again), `done` (its rows are in; skipped while its fingerprint is unchanged), `failed` (unreadable; retried
by the next run), `removed` (its rows were deleted: no longer in the input).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.read import Shard
from pipeline.write.fenced import FencedTable
from pipeline.write.schema import MANIFEST_SCHEMA

WRITING, DONE, FAILED, REMOVED = "writing", "done", "failed", "removed"
HOLDS_ROWS = (WRITING, DONE)  # states in which the tables may hold rows of the shard


@dataclass
class ShardRecord:
    shard: str  # the shard's name (read.Shard), its identity
    fingerprint: str
    status: str
    rows_ok: int = 0
    rows_failed: int = 0
    rows_skipped: int = 0
    error: str | None = None
    uri: str | None = None  # where it was read from

    @classmethod
    def of(cls, shard: Shard, status: str, error: str | None = None) -> ShardRecord:
        return cls(shard.name, shard.fingerprint, status, error=error, uri=shard.uri)


class ShardManifest:
    """The manifest of one dataset (`input.dataset`) in an alias's manifest table. Other datasets' shards
    share the table but are never seen as this dataset's, nor dropped by `compact`."""

    def __init__(self, table: FencedTable, dataset: str | None):
        self.table, self.dataset = table, dataset
        log = table.ds.to_table(columns=MANIFEST_SCHEMA.names)
        self.next_seq = int(pc.max(log["seq"]).as_py() or 0) + 1 if log.num_rows else 0
        latest = log.sort_by("seq").to_pylist()  # later rows replace earlier ones below
        self.states: dict[tuple[str | None, str], dict] = {(r["dataset"], r["shard"]): r for r in latest}

    def state(self, name: str) -> dict | None:
        return self.states.get((self.dataset, name))

    def status(self, name: str) -> str | None:
        row = self.state(name)
        return row["status"] if row else None

    def committed(self) -> dict[str, str]:
        """shard name -> fingerprint of every shard of this dataset that is done."""
        return {
            s: r["fingerprint"]
            for (d, s), r in self.states.items()
            if d == self.dataset and r["status"] == DONE
        }

    def known(self) -> set[str]:
        """This dataset's shards whose rows may be in the tables (`writing` or `done`)."""
        return {s for (d, s), r in self.states.items() if d == self.dataset and r["status"] in HOLDS_ROWS}

    def record(self, records: list[ShardRecord]) -> None:
        """Append these states in one commit. A failure never replaces `writing` or `done` (their rows may
        be in the tables; the status is what makes the next run replace or skip them): it only adds the
        error to the state."""
        if not records:
            return
        now, rows = time.time(), []
        for record in records:
            current = self.state(record.shard)
            row = {
                "shard": record.shard,
                "seq": self.next_seq,
                "uri": record.uri,
                "dataset": self.dataset,
                "fingerprint": record.fingerprint,
                "status": record.status,
                "rows_ok": record.rows_ok,
                "rows_failed": record.rows_failed,
                "rows_skipped": record.rows_skipped,
                "error": record.error,
                "at": now,
            }
            if record.status == FAILED and current and current["status"] in HOLDS_ROWS:
                row = current | {"seq": self.next_seq, "error": record.error, "at": now}
            self.next_seq += 1
            rows.append(row)
        self.table.append_rows(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
        for row in rows:
            self.states[(row["dataset"], row["shard"])] = row

    def relocate(self, uris: dict[str, str]) -> list[str]:
        """Record where done shards are read from now (`uris`: name -> uri), in one commit; returns the
        names of those that moved. Their rows stay as they are: a move changes no row."""
        moved = [
            ShardRecord(
                name,
                row["fingerprint"],
                DONE,
                row["rows_ok"],
                row["rows_failed"],
                row["rows_skipped"],
                uri=uri,
            )
            for name, uri in uris.items()
            if (row := self.state(name)) and row["status"] == DONE and row["uri"] != uri
        ]
        self.record(moved)
        return [r.shard for r in moved]

    def compact(self) -> None:
        """Rewrite the log as the current states, in one commit (removed shards are forgotten)."""
        rows = [r for r in self.states.values() if r["status"] != REMOVED]
        self.table.rewrite(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
        self.states = {(r["dataset"], r["shard"]): r for r in rows}
