"""Stage 5: write embeddings, rejected rows and the shard manifest to LanceDB, exactly once.

Protocol per shard (one writer per table, under its lease):
1. manifest row -> status 'writing';
2. rejected rows, then embeddings, each in ONE LanceDB commit (a shard's rows appear together or not),
   except for a shard too large for the driver's buffer (`output.max_buffered_rows`), written in parts;
3. manifest row -> status 'done' with counts.
A shard with no manifest row for this model is appended; any other (left 'writing' by a crash, 'failed'
after a partial write, or changed since it was indexed) is upserted on `id`, and its rows that the new
version no longer has are deleted in the same commit. So rerunning after a kill at any moment leaves every
id exactly once. 'done' shards with the same fingerprint and model are skipped on rerun; a 'failed' record
never replaces 'writing' or 'done'.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import fsspec
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


MODEL_KEY = b"icar.model_id"  # images-table schema metadata: the one model whose embeddings it holds


def images_schema(dim: int, dtype: str, model_id: str | None = None) -> pa.Schema:
    value = pa.float16() if dtype == "float16" else pa.float32()
    metadata = {MODEL_KEY: model_id.encode()} if model_id else None
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
            ("thumbnail", pa.binary()),  # small WebP (output.thumbnail_side), null when off
        ],
        metadata=metadata,
    )


def table_model(table) -> str | None:
    """The model an images table belongs to: its schema metadata, else (older tables) a row's model_id."""
    metadata = table.schema.metadata or {}
    if MODEL_KEY in metadata:
        return metadata[MODEL_KEY].decode()
    rows = table.search().select(["model_id"]).limit(1).to_list()
    return rows[0]["model_id"] if rows else None


@dataclass
class ShardRecord:
    shard: str
    fingerprint: str
    status: str
    rows_ok: int = 0
    rows_failed: int = 0
    rows_skipped: int = 0
    error: str | None = None


def sql_literal(value: str) -> str:
    """A string as a Lance SQL literal: quoted, with its quotes doubled, so no value can end the literal."""
    return "'" + value.replace("'", "''") + "'"


# LanceDB object-store option -> s3fs option, so one `output.storage_options` serves LanceDB and fsspec
_S3FS_OPTIONS = {
    "aws_endpoint": "endpoint_url",
    "aws_access_key_id": "key",
    "aws_secret_access_key": "secret",
}


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def output_filesystem(cfg: OutputConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The output location as an fsspec filesystem and root path (for the lease and the run reports)."""
    options: dict = {}
    if cfg.uri.startswith("s3://"):
        for name, value in cfg.storage_options.items():
            if name in _S3FS_OPTIONS:
                options[_S3FS_OPTIONS[name]] = value
            elif name in ("aws_region", "region"):
                options.setdefault("client_kwargs", {})["region_name"] = value
    return fsspec.core.url_to_fs(cfg.uri, **options)


def connect(cfg: OutputConfig) -> lancedb.DBConnection:
    """Open the output database. lancedb is imported here, not at module load: importing it installs a
    fork hook that warns in every process forked afterwards, and the job starts Ray (which forks) first."""
    import lancedb

    return lancedb.connect(cfg.uri, storage_options=cfg.storage_options or None)


class LanceWriter:
    """The single writer of a job: owns the images, rejected and manifest tables."""

    def __init__(
        self, cfg: OutputConfig, model_id: str, dim: int, check_lease: Callable[[], None] = lambda: None
    ):
        self.cfg, self.model_id, self.check_lease = cfg, model_id, check_lease
        self.db = connect(cfg)
        self.images = self._open(cfg.table, images_schema(dim, cfg.vector_dtype, model_id))
        self.rejected = self._open(cfg.rejected_table, REJECTED_SCHEMA)
        self.manifest = self._open(cfg.manifest_table, MANIFEST_SCHEMA)
        self._check_vectors(dim)
        self._check_model()

    def _open(self, name: str, schema: pa.Schema):
        """The existing table as it is (its schema is checked afterwards, with a message), else a new one."""
        try:
            return self.db.open_table(name)
        except ValueError:  # "Table ... was not found"
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

    def _check_model(self) -> None:
        """One table per model: the same ids from two models would overwrite or duplicate each other."""
        owner = table_model(self.images)
        if owner is not None and owner != self.model_id:
            raise ValueError(
                f"table {self.cfg.table!r} at {self.cfg.uri} holds embeddings of {owner}, this job embeds "
                f"with {self.model_id}; index each model into its own output.table"
            )

    def _manifest_rows(self, status: str | None = None) -> list[dict]:
        where = f"model_id = {sql_literal(self.model_id)}"
        if status:
            where += f" AND status = {sql_literal(status)}"
        return self.manifest.search().where(where).limit(None).to_list()

    def _manifest_key(self, shard: str) -> str:
        return f"{self.model_id}|{shard}"

    def committed(self) -> dict[str, str]:
        """shard uri -> fingerprint of every shard already done for this model."""
        return {row["shard"]: row["fingerprint"] for row in self._manifest_rows(DONE)}

    def known(self) -> set[str]:
        """Every shard with a manifest row for this model, whatever its status: such a shard may already
        have rows in the tables, so it is upserted, never appended."""
        return {row["shard"] for row in self._manifest_rows()}

    def _set_manifest(self, record: ShardRecord, started_at: float, finished_at: float | None) -> None:
        row = {
            "manifest_key": self._manifest_key(record.shard),
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

    def _put(self, table, rows: pa.Table, shard: str, mode: str) -> None:
        """One commit of a shard's rows. `append`: rows never written before. `upsert`: on `id`.
        `replace`: upsert, and delete the shard's old rows it no longer has, in the same commit.
        Columns the table lacks (a thumbnail, on a table made before thumbnails) are left out."""
        this_shard = f"shard = {sql_literal(shard)}"
        rows = rows.select([name for name in table.schema.names if name in rows.column_names])
        if mode == "replace" and rows.num_rows == 0:
            table.delete(this_shard)
        elif mode == "append" and rows.num_rows:
            table.add(rows.cast(table.schema))
        elif rows.num_rows:
            merge = table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all()
            if mode == "replace":
                merge = merge.when_not_matched_by_source_delete(this_shard)
            merge.execute(rows.cast(table.schema))

    def begin_shard(self, record: ShardRecord) -> float:
        """Mark the shard `writing` before any of its rows are written; returns the start time."""
        self.check_lease()
        started = time.time()
        self._set_manifest(ShardRecord(record.shard, record.fingerprint, WRITING), started, None)
        return started

    def put_part(self, shard: str, images: pa.Table, rejected: pa.Table, mode: str) -> None:
        """Rejected rows, then embeddings, of a whole shard or of one part of it (`_put` for `mode`)."""
        self.check_lease()
        self._put(self.rejected, rejected, shard, mode)
        self._put(self.images, images, shard, mode)

    def finish_shard(self, record: ShardRecord, started: float) -> None:
        self.check_lease()
        self._set_manifest(record, started, time.time())

    def commit_shard(self, record: ShardRecord, images: pa.Table, rejected: pa.Table, upsert: bool) -> None:
        """Make one whole shard's rows visible in one commit per table and mark it done."""
        started = self.begin_shard(record)
        self.put_part(record.shard, images, rejected, "replace" if upsert else "append")
        self.finish_shard(record, started)

    def record_failed_shard(self, record: ShardRecord) -> None:
        """A shard that could not be read; retried on the next run.

        A shard already `writing` or `done` keeps its status and only gets the error: its rows may be in
        the tables, and the status is what makes the next run upsert them (or skip them) correctly."""
        self.check_lease()
        now = time.time()
        key = sql_literal(self._manifest_key(record.shard))
        current = self.manifest.search().where(f"manifest_key = {key}").limit(1).to_list()
        if current and current[0]["status"] in (WRITING, DONE):
            self.manifest.update(where=f"manifest_key = {key}", values={"error": record.error})
            return
        self._set_manifest(record, now, now)

    def remove_shard(self, shard: str) -> None:
        """Delete a shard's rows (images, then rejected), then its manifest rows: a crash in between
        leaves a manifest row, so the next run deletes again."""
        self.check_lease()
        where = f"shard = {sql_literal(shard)}"
        self.images.delete(where)
        self.rejected.delete(where)
        self.manifest.delete(f"{where} AND model_id = {sql_literal(self.model_id)}")

    def optimize(self, cleanup_older_than: timedelta | None = None) -> None:
        """Compact the many small per-shard commits, fold new rows into the indexes, and prune versions
        older than `cleanup_older_than` (LanceDB's default, 7 days, when None)."""
        for table in (self.images, self.rejected, self.manifest):
            table.optimize(cleanup_older_than=cleanup_older_than)
