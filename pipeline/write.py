"""Stage 5: write embeddings, rejected rows and the shard manifest to LanceDB, exactly once.

Protocol per shard (one writer, so no two merge_inserts ever race on a key):
1. manifest row -> status 'writing';
2. rejected rows, then embeddings, each in ONE LanceDB commit (a shard's rows appear together or not);
3. manifest row -> status 'done' with counts.
A shard never seen before is appended; a shard left 'writing' by a crash is upserted on `id`, so rerunning
after a kill at any moment leaves every id exactly once. 'done' shards with the same fingerprint and model
are skipped on rerun; a shard whose fingerprint changed is upserted too, and its rows that the new version
no longer has are deleted in the same commit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from pipeline.config import OutputConfig

if TYPE_CHECKING:
    import lancedb

WRITING, DONE, FAILED = "writing", "done", "failed"

MANIFEST_SCHEMA = pa.schema(
    [
        ("manifest_key", pa.string()),  # model_id|shard uri
        ("shard", pa.string()),
        ("fingerprint", pa.string()),
        ("model_id", pa.string()),
        ("status", pa.string()),
        ("rows_ok", pa.int64()),
        ("rows_failed", pa.int64()),
        ("rows_skipped", pa.int64()),
        ("error", pa.string()),
        ("started_at", pa.float64()),
        ("finished_at", pa.float64()),
    ]
)
REJECTED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),  # failed | skipped
        ("reason", pa.string()),
        ("model_id", pa.string()),
    ]
)


def images_schema(dim: int, dtype: str) -> pa.Schema:
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [
            ("id", pa.string()),
            ("shard", pa.string()),
            ("key", pa.string()),
            ("url", pa.string()),
            ("caption", pa.string()),
            ("vector", pa.list_(value, dim)),
            ("complexity", pa.float32()),
            ("route", pa.string()),
            ("exit_depth", pa.int32()),
            ("tokens", pa.int32()),
            ("gflops", pa.float32()),
            ("model_id", pa.string()),
        ]
    )


@dataclass
class ShardRecord:
    shard: str
    fingerprint: str
    status: str
    rows_ok: int = 0
    rows_failed: int = 0
    rows_skipped: int = 0
    error: str | None = None


def connect(cfg: OutputConfig) -> lancedb.DBConnection:
    """Open the output database. lancedb is imported here, not at module load: importing it installs a
    fork hook that warns in every process forked afterwards, and the job starts Ray (which forks) first."""
    import lancedb

    return lancedb.connect(cfg.uri, storage_options=cfg.storage_options or None)


class LanceWriter:
    """The single writer of a job: owns the images, rejected and manifest tables."""

    def __init__(self, cfg: OutputConfig, model_id: str, dim: int):
        self.cfg, self.model_id = cfg, model_id
        self.db = connect(cfg)
        self.images = self._open(cfg.table, images_schema(dim, cfg.vector_dtype))
        self.rejected = self._open(cfg.rejected_table, REJECTED_SCHEMA)
        self.manifest = self._open(cfg.manifest_table, MANIFEST_SCHEMA)
        self._check_vectors(dim)

    def _open(self, name: str, schema: pa.Schema):
        return self.db.create_table(name, schema=schema, exist_ok=True)

    def _check_vectors(self, dim: int) -> None:
        field = self.images.schema.field("vector")
        have = (field.type.list_size, str(field.type.value_type))
        want = (dim, "halffloat" if self.cfg.vector_dtype == "float16" else "float")
        if have != want:
            raise ValueError(
                f"table {self.cfg.table!r} at {self.cfg.uri} holds vectors {have}, this job writes {want}; "
                "use another output.table or the matching model/vector_dtype"
            )

    def _manifest_rows(self, status: str | None = None) -> list[dict]:
        where = f"model_id = '{self.model_id}'" + (f" AND status = '{status}'" if status else "")
        return self.manifest.search().where(where).limit(None).to_list()

    def committed(self) -> dict[str, str]:
        """shard uri -> fingerprint of every shard already done for this model."""
        return {row["shard"]: row["fingerprint"] for row in self._manifest_rows(DONE)}

    def interrupted(self) -> set[str]:
        """Shards a previous run began writing but did not finish: they must be upserted, not appended."""
        return {row["shard"] for row in self._manifest_rows(WRITING)}

    def _set_manifest(self, record: ShardRecord, started_at: float, finished_at: float | None) -> None:
        row = {
            "manifest_key": f"{self.model_id}|{record.shard}",
            "shard": record.shard,
            "fingerprint": record.fingerprint,
            "model_id": self.model_id,
            "status": record.status,
            "rows_ok": record.rows_ok,
            "rows_failed": record.rows_failed,
            "rows_skipped": record.rows_skipped,
            "error": record.error,
            "started_at": started_at,
            "finished_at": finished_at,
        }
        table = pa.Table.from_pylist([row], schema=MANIFEST_SCHEMA)
        (
            self.manifest.merge_insert("manifest_key")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(table)
        )

    def _put(self, table, rows: pa.Table, shard: str, upsert: bool) -> None:
        """Append; or upsert on `id` and delete the shard's old rows it no longer has, in one commit."""
        if upsert:
            this_shard = "shard = '{}'".format(shard.replace("'", "''"))
            if rows.num_rows == 0:
                table.delete(this_shard)
                return
            (
                table.merge_insert("id")
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .when_not_matched_by_source_delete(this_shard)
                .execute(rows.cast(table.schema))
            )
        elif rows.num_rows:
            table.add(rows.cast(table.schema))

    def commit_shard(self, record: ShardRecord, images: pa.Table, rejected: pa.Table, upsert: bool) -> None:
        """Make one shard's rows visible and mark it done (see the module docstring for the protocol)."""
        started = time.time()
        self._set_manifest(ShardRecord(record.shard, record.fingerprint, WRITING), started, None)
        self._put(self.rejected, rejected, record.shard, upsert)
        self._put(self.images, images, record.shard, upsert)
        self._set_manifest(record, started, time.time())

    def record_failed_shard(self, record: ShardRecord) -> None:
        """A shard that could not be read at all; retried on the next run."""
        now = time.time()
        self._set_manifest(record, now, now)

    def optimize(self) -> None:
        """Compact the many small per-shard commits and prune old versions."""
        for table in (self.images, self.rejected, self.manifest):
            table.optimize()
