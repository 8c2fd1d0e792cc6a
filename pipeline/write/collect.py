"""In the driver: the parts the workers wrote (`fragments.Part` rows) become whole shards to commit.

A shard is written when the rows of its parts add up to the rows its footer declared; it then goes to the
committer. A part that reports an error (an unreadable row group, a file that changed while read) fails
its shard, as do more rows than declared; the shard's other parts are then never committed."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pipeline.read import ShardPlan
from pipeline.write.commit import Committer, WrittenShard
from pipeline.write.fragments import STAGE_TIMERS, fragments_of
from pipeline.write.manifest import DONE, FAILED, ShardRecord


@dataclass
class Received:
    """What the driver received, over every part: for the summary."""

    rows: Counter = field(default_factory=Counter)  # rows per shard
    routes: Counter = field(default_factory=Counter)
    gflops: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGE_TIMERS, 0.0))
    bytes: int = 0  # part rows' size as received: metadata only


class ShardCollector:
    def __init__(self, plans: dict[str, ShardPlan], committer: Committer):
        self.plans, self.committer = plans, committer
        self.written: dict[str, WrittenShard] = {}
        self.failed: dict[str, str] = {}  # shard name -> why
        self.received = Received()

    def add(self, parts: dict[str, np.ndarray]) -> list[str]:
        """Take a batch of part rows; returns the shards it completed."""
        self.received.bytes += _size(parts)
        completed = []
        for i in range(len(parts["shard"])):
            part = {k: v[i] for k, v in parts.items()}
            name = str(part["shard"])
            if name in self.failed:
                continue
            if part["error"]:
                self.fail(name, str(part["error"]))
                continue
            shard = self.written.setdefault(name, WrittenShard(ShardRecord.of(self.plans[name].shard, DONE)))
            record = shard.record
            record.rows_ok += int(part["rows_ok"])
            record.rows_failed += int(part["rows_failed"])
            record.rows_skipped += int(part["rows_skipped"])
            shard.images += fragments_of(part["images"])
            shard.rejected += fragments_of(part["rejected"])
            received = self.received
            received.rows[name] += int(part["rows"])
            received.routes.update(json.loads(part["routes"]))
            received.gflops += float(part["gflops"])
            for timer in STAGE_TIMERS:
                received.stage_seconds[timer] += float(part[timer])
            declared = self.plans[name].num_rows
            if received.rows[name] == declared:
                self.committer.add(self.written.pop(name))
                completed.append(name)
            elif received.rows[name] > declared:
                uri = self.plans[name].shard.uri
                self.fail(
                    name,
                    f"{uri}: {received.rows[name]} rows read, its footer declared {declared}: "
                    "changed while being read; rerun to index its new content",
                )
        self.committer.flush_if_due()
        return completed

    def empty(self, plan: ShardPlan) -> None:
        """A shard with no rows is written as soon as it is planned."""
        self.committer.add(WrittenShard(ShardRecord.of(plan.shard, DONE)))

    def fail(self, name: str, reason: str) -> None:
        self.failed[name] = reason
        self.written.pop(name, None)  # its parts' files are never committed; the next run removes them
        self.committer.fail(ShardRecord.of(self.plans[name].shard, FAILED, reason))

    def incomplete(self) -> dict[str, int]:
        """Shards planned with rows whose rows did not all come back (nor failed): name -> rows missing."""
        return {
            name: plan.num_rows - self.received.rows[name]
            for name, plan in self.plans.items()
            if not plan.error and name not in self.failed and self.received.rows[name] < plan.num_rows
        }


def _size(parts: dict[str, np.ndarray]) -> int:
    """Bytes of a batch of part rows as the driver holds them: numbers, plus the text of each string."""
    return sum(
        sum(len(str(x)) for x in column) if column.dtype == object else column.nbytes
        for column in parts.values()
    )
