"""The three tables of an alias (`output.table`): embeddings, rejected rows, and the shard manifest."""

from __future__ import annotations

import pyarrow as pa

MODEL_KEY = b"icar.model_id"  # images-table schema metadata: the one model whose embeddings it holds

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

# An append-only log of shard states: the row with the highest `seq` of a shard is its state.
MANIFEST_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),  # the shard's name: its identity (read.Shard)
        ("seq", pa.int64()),  # position in the log
        ("uri", pa.string()),  # where it was last read from
        ("dataset", pa.string()),  # input.dataset (null: unset)
        ("fingerprint", pa.string()),
        ("status", pa.string()),  # manifest.WRITING | DONE | FAILED | REMOVED
        ("rows_ok", pa.int64()),
        ("rows_failed", pa.int64()),
        ("rows_skipped", pa.int64()),
        ("error", pa.string()),
        ("at", pa.float64()),  # when the state was recorded (the writer's clock; informative only)
    ]
)


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
    """The model an images table belongs to (its schema metadata; None for a table made elsewhere)."""
    value = (table.schema.metadata or {}).get(MODEL_KEY)
    return value.decode() if value is not None else None
