"""Stage 5: write embeddings, rejected rows and the shard manifest to LanceDB, exactly once.

Protocol per shard (one writer per table, under its lease):
1. manifest row -> status 'writing';
2. rejected rows, then embeddings, each in ONE LanceDB commit (a shard's rows appear together or not),
   except for a shard too large for the driver's buffer (`output.max_buffered_rows`), written in parts;
3. manifest row -> status 'done' with counts.
Shards are known by name (`read.Shard`: dataset plus path relative to the input root), never by the
location they are read from, so a moved bucket is the same shards. A shard with no manifest row for this
model is appended; any other (left 'writing' by a crash, 'failed' after a partial write, or changed since
it was indexed) is upserted on `id`, and its rows that the new version no longer has are deleted in the
same commit. So rerunning after a kill at any moment leaves every id exactly once. 'done' shards with the
same fingerprint and model are skipped on rerun; a 'failed' record never replaces 'writing' or 'done'.
Every commit runs under the lease and is retried, within `output.commit_attempts`, when the object store
fails transiently (`LanceWriter._commit`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import fsspec
import pyarrow as pa

from pipeline.config import ConfigError, OutputConfig

if TYPE_CHECKING:
    import lancedb

    from pipeline.read import Shard

WRITING, DONE, FAILED = "writing", "done", "failed"

log = logging.getLogger("icar.write")

MANIFEST_SCHEMA = pa.schema(
    [
        ("manifest_key", pa.string()),  # model_id|shard name
        ("shard", pa.string()),  # the shard's name: its identity (read.Shard)
        ("uri", pa.string()),  # where it was last read from
        ("dataset", pa.string()),  # input.dataset (null: unset)
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


# What an object store says when a request may well succeed later. LanceDB raises these, and schema or
# type errors alike, as RuntimeError/OSError/ValueError, so the text decides. `\btimeout` skips the
# `retry_timeout: 180s` that Lance appends to every S3 error, a 403 included; S3's error codes are
# matched with their case.
_TRANSIENT = re.compile(
    r"(?i:connection (reset|refused|closed|aborted)|broken pipe|\btimed out\b|\btimeout\b"
    r"|error sending request|tcp connect|could not connect|network unreachable|status code:? 5\d\d"
    r"|service unavailable|reduce your request rate)|SlowDown|ServiceUnavailable|InternalError"
)


def is_transient(exc: BaseException) -> bool:
    """An object-store failure worth another try (connection reset/refused, timeout, 5xx, SlowDown);
    never a schema, type or conflict error."""
    return isinstance(exc, OSError | RuntimeError) and bool(_TRANSIENT.search(str(exc)))


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
    """The single writer of a job: owns the images, rejected and manifest tables.

    The manifest may hold several datasets (`input.dataset`); the writer sees only its own dataset's
    shards, so indexing or reindexing one dataset never treats another's shards as its own or as removed."""

    def __init__(
        self,
        cfg: OutputConfig,
        model_id: str,
        dim: int,
        check_lease: Callable[[], None] = lambda: None,
        dataset: str | None = None,
    ):
        self.cfg, self.model_id, self.check_lease, self.dataset = cfg, model_id, check_lease, dataset
        self.db = connect(cfg)
        self.images = self._open(cfg.table, images_schema(dim, cfg.vector_dtype, model_id))
        self.rejected = self._open(cfg.rejected_table, REJECTED_SCHEMA)
        self.manifest = self._open(cfg.manifest_table, MANIFEST_SCHEMA)
        self._check_vectors(dim)
        self._check_model()
        self._check_manifest()

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

    def _check_manifest(self) -> None:
        """A manifest from before shards were known by name records their URIs: its rows would not match
        this job's shards, which would then be appended a second time."""
        if "uri" not in self.manifest.schema.names:
            raise ConfigError(
                f"manifest table {self.cfg.manifest_table!r} at {self.cfg.uri} was written by an older icar "
                "that identified shards by URI (its rows would not match, and shards would be indexed "
                "twice); index into a new output.table, rejected_table and manifest_table"
            )

    def _manifest_rows(self, status: str | None = None) -> list[dict]:
        where = f"model_id = {sql_literal(self.model_id)} AND " + (
            f"dataset = {sql_literal(self.dataset)}" if self.dataset else "dataset IS NULL"
        )
        if status:
            where += f" AND status = {sql_literal(status)}"
        return self.manifest.search().where(where).limit(None).to_list()

    def _manifest_key(self, shard: str) -> str:
        return f"{self.model_id}|{shard}"

    def committed(self) -> dict[str, str]:
        """shard name -> fingerprint of every shard already done for this model."""
        return {row["shard"]: row["fingerprint"] for row in self._manifest_rows(DONE)}

    def relocate(self, uris: dict[str, str]) -> list[str]:
        """Record where done shards are read from now (`uris`: name -> uri), in one manifest commit;
        returns the names of those that moved. Their rows stay as they are: a move changes no row."""
        moved = [
            row | {"uri": uris[row["shard"]]}
            for row in self._manifest_rows(DONE)
            if row["shard"] in uris and row["uri"] != uris[row["shard"]]
        ]
        if moved:
            self._merge_manifest(pa.Table.from_pylist(moved, schema=MANIFEST_SCHEMA))
        return [row["shard"] for row in moved]

    def known(self) -> set[str]:
        """Every shard with a manifest row for this model, whatever its status: such a shard may already
        have rows in the tables, so it is upserted, never appended."""
        return {row["shard"] for row in self._manifest_rows()}

    def _set_manifest(self, record: ShardRecord, started_at: float, finished_at: float | None) -> None:
        row = {
            "manifest_key": self._manifest_key(record.shard),
            "shard": record.shard,
            "uri": record.uri,
            "dataset": self.dataset,
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
        self._merge_manifest(pa.Table.from_pylist([row], schema=MANIFEST_SCHEMA))

    def _merge_manifest(self, rows: pa.Table) -> None:
        def commit(_: int) -> None:
            merge = self.manifest.merge_insert("manifest_key").when_matched_update_all()
            merge.when_not_matched_insert_all().execute(rows)

        self._commit(commit)

    def _commit(self, commit: Callable[[int], object]) -> None:
        """Run `commit(attempt)` under the lease, retried with backoff on a transient object-store error.

        Lance already retries each object-store request (storage options `client_max_retries`, 3 in
        Lance 14, and `client_retry_timeout`, 180 s; `download_retry_count` for reads), but quickly: with
        S3 refusing connections a commit failed after 2.4 s, so a few seconds of S3 down used to stop
        the job. Here the whole commit is tried `output.commit_attempts` times, waiting
        `commit_backoff_seconds`, doubled each time; the lease is checked before every try. A try whose
        answer was lost may have committed: `commit` must be safe to repeat (upserts and deletes are; an
        append upserts from its second try)."""
        attempts = self.cfg.commit_attempts
        for attempt in range(1, attempts + 1):
            try:
                self.check_lease()
                commit(attempt)
                return
            except Exception as exc:
                if attempt == attempts or not is_transient(exc):
                    raise
                wait = self.cfg.commit_backoff_seconds * 2 ** (attempt - 1)
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                log.warning(
                    "commit failed (try %d of %d), retrying in %.1f s: %s", attempt, attempts, wait, first
                )
                time.sleep(wait)

    def _put(self, table, rows: pa.Table, shard: str, mode: str) -> None:
        """One commit of a shard's rows. `append`: rows never written before. `upsert`: on `id`.
        `replace`: upsert, and delete the shard's old rows it no longer has, in the same commit.
        Columns the table lacks (a thumbnail, on a table made before thumbnails) are left out."""
        this_shard = f"shard = {sql_literal(shard)}"
        rows = rows.select([name for name in table.schema.names if name in rows.column_names])
        rows = rows.cast(table.schema) if rows.num_rows else rows

        def commit(attempt: int) -> None:
            if mode == "replace" and rows.num_rows == 0:
                table.delete(this_shard)
            elif mode == "append" and attempt == 1 and rows.num_rows:
                table.add(rows)
            elif rows.num_rows:  # an append's retry too: its first try may have committed
                merge = table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all()
                if mode == "replace":
                    merge = merge.when_not_matched_by_source_delete(this_shard)
                merge.execute(rows)

        self._commit(commit)

    def begin_shard(self, record: ShardRecord) -> float:
        """Mark the shard `writing` before any of its rows are written; returns the start time."""
        started = time.time()
        writing = ShardRecord(record.shard, record.fingerprint, WRITING, uri=record.uri)
        self._set_manifest(writing, started, None)
        return started

    def put_part(self, shard: str, images: pa.Table, rejected: pa.Table, mode: str) -> None:
        """Rejected rows, then embeddings, of a whole shard or of one part of it (`_put` for `mode`)."""
        self._put(self.rejected, rejected, shard, mode)
        self._put(self.images, images, shard, mode)

    def finish_shard(self, record: ShardRecord, started: float) -> None:
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
        now = time.time()
        key = sql_literal(self._manifest_key(record.shard))
        current = self.manifest.search().where(f"manifest_key = {key}").limit(1).to_list()
        if current and current[0]["status"] in (WRITING, DONE):
            where = f"manifest_key = {key}"
            self._commit(lambda _: self.manifest.update(where=where, values={"error": record.error}))
            return
        self._set_manifest(record, now, now)

    def remove_shard(self, shard: str) -> None:
        """Delete a shard's rows (images, then rejected), then its manifest rows: a crash in between
        leaves a manifest row, so the next run deletes again."""
        where = f"shard = {sql_literal(shard)}"
        self._commit(lambda _: self.images.delete(where))
        self._commit(lambda _: self.rejected.delete(where))
        self._commit(lambda _: self.manifest.delete(f"{where} AND model_id = {sql_literal(self.model_id)}"))

    def optimize(self, cleanup_older_than: timedelta | None = None) -> None:
        """Compact the many small per-shard commits, fold new rows into the indexes, and prune versions
        older than `cleanup_older_than` (LanceDB's default, 7 days, when None)."""
        for table in (self.images, self.rejected, self.manifest):
            self._commit(lambda _, table=table: table.optimize(cleanup_older_than=cleanup_older_than))
