"""In the driver: written shards become visible in rounds, many shards per Lance commit.

A round, for the shards whose every row is written (`collect`):
1. manifest: the shards are `writing` (and the failures gathered since the last round are recorded);
2. shards whose rows an earlier run may have committed (`writing` or `done` before) lose those rows;
3. their fragments are appended to the rejected table, then to the images table (one commit each);
4. manifest: the shards are `done`, with their counts.
A crash anywhere leaves each shard of the round `writing` or `done`, so a rerun replaces or skips it:
every id exactly once. Each commit is fenced (`write.fenced`): a run that lost the table commits nothing.
Small fragments are compacted as they pile up, so a commit costs the same at the end of a long run as at
its start (Lance rewrites the list of every fragment in each commit).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.config import OutputConfig
from pipeline.storage import sql_literal
from pipeline.write.manifest import HOLDS_ROWS, REMOVED, WRITING, ShardManifest, ShardRecord
from pipeline.write.output import OutputTables

if TYPE_CHECKING:
    from lance.fragment import FragmentMetadata

IN_LIST = 500  # shard names per `shard IN (...)` predicate


@dataclass
class WrittenShard:
    """A shard whose rows are all in fragment files, waiting for a round to commit them."""

    record: ShardRecord
    images: list[FragmentMetadata] = field(default_factory=list)
    rejected: list[FragmentMetadata] = field(default_factory=list)


@dataclass
class CommitStats:
    rounds: int = 0
    commits: int = 0
    compactions: int = 0
    seconds: float = 0.0
    round_seconds: list[float] = field(default_factory=list)


class Committer:
    """Gathers written shards and commits them in rounds of `output.commit_shards` shards, or sooner
    when the oldest has waited `output.commit_seconds`, or when the stream ends (`flush`); `on_commit`
    hears of each round's committed and failed shards."""

    def __init__(
        self,
        tables: OutputTables,
        manifest: ShardManifest,
        cfg: OutputConfig,
        on_commit: Callable[[list[ShardRecord], list[ShardRecord]], None] = lambda done, failed: None,
    ):
        self.tables, self.manifest, self.cfg, self.on_commit = tables, manifest, cfg, on_commit
        self.waiting: list[WrittenShard] = []
        self.failures: list[ShardRecord] = []
        self.oldest = 0.0
        self.stats = CommitStats()

    def add(self, shard: WrittenShard) -> None:
        if not self.waiting:
            self.oldest = time.monotonic()
        self.waiting.append(shard)
        self.flush_if_due()

    def fail(self, record: ShardRecord) -> None:
        """A shard that could not be read or lost rows: recorded with the next round (never `done`)."""
        self.failures.append(record)

    def flush_if_due(self) -> None:
        due = len(self.waiting) >= self.cfg.commit_shards or (
            self.waiting and time.monotonic() - self.oldest >= self.cfg.commit_seconds
        )
        if due:
            self.flush()

    def flush(self) -> None:
        """One round (module docstring) for everything waiting."""
        shards, failures = self.waiting, self.failures
        self.waiting, self.failures = [], []
        if not shards and not failures:
            return
        started, versions = time.perf_counter(), self._versions()
        names = [s.record.shard for s in shards]
        replace = [name for name in names if self.manifest.status(name) in HOLDS_ROWS]
        writing = [
            ShardRecord(s.record.shard, s.record.fingerprint, WRITING, uri=s.record.uri) for s in shards
        ]
        self.manifest.record(failures + writing)
        if shards:
            self._delete_rows(replace)
            self.tables.rejected.append([f for s in shards for f in s.rejected])
            self.tables.images.append([f for s in shards for f in s.images])
            self.manifest.record([s.record for s in shards])
        self._compact_when_due()
        seconds = time.perf_counter() - started
        self.stats.rounds += 1
        self.stats.commits += self._versions() - versions
        self.stats.seconds += seconds
        self.stats.round_seconds.append(seconds)
        self.on_commit([s.record for s in shards], failures)

    def remove(self, names: list[str]) -> None:
        """Delete every row of these shards and record them `removed` (a crash in between leaves their
        state as it was, so the next run deletes again)."""
        self._delete_rows(names)
        self.manifest.record([ShardRecord(n, self.manifest.state(n)["fingerprint"], REMOVED) for n in names])

    def _delete_rows(self, names: list[str]) -> None:
        for start in range(0, len(names), IN_LIST):
            where = f"shard IN ({', '.join(sql_literal(n) for n in names[start : start + IN_LIST])})"
            self.tables.images.delete(where)
            self.tables.rejected.delete(where)

    def _compact_when_due(self) -> None:
        for table in (self.tables.images, self.tables.rejected):
            if table.appended_since_compaction >= self.cfg.compact_fragments:
                table.compact(self.cfg.rows_per_fragment)
                self.stats.compactions += 1
        if self.tables.manifest_log.appended_since_compaction >= self.cfg.compact_fragments:
            self.manifest.compact()
            self.stats.compactions += 1

    def _versions(self) -> int:
        return sum(t.version for t in (self.tables.images, self.tables.rejected, self.tables.manifest_log))
