"""Stage 1: find parquet shards on any fsspec filesystem, inspect them, and read them as row chunks.

Shards are inspected (footer only) in the driver before any work is scheduled, so a truncated file or a
missing column fails that shard with a message naming it, instead of failing the whole Ray job.
"""

from __future__ import annotations

import glob as globlib
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import InputConfig

IMAGE_COLUMN_CANDIDATES = ("jpg", "png", "webp", "image", "jpeg", "IMAGE", "image_bytes")


@dataclass(frozen=True)
class Shard:
    """One input file: where it is read from now, its stable name and its content fingerprint.

    The name (`[<input.dataset>/]<path relative to the input root>`) is the shard's identity: row ids,
    the tables' `shard` column and the manifest use it, so the same shards read from another location
    are the same shards, and two datasets with the same file names are not."""

    uri: str
    name: str
    fingerprint: str


class ShardChanged(RuntimeError):
    """The file is no longer the one listed: its rows would not match the plan (row count, ids). Not a
    transient error, so it is never retried; the shard fails alone and the next run lists it afresh."""

    def __init__(self, shard: Shard, what: str) -> None:
        super().__init__(f"{shard.uri}: changed while being read ({what}); rerun to index its new content")


@dataclass
class ShardPlan:
    """What the footer told us: the rows to expect and how to map columns, or why it cannot be read."""

    shard: Shard
    num_rows: int = 0
    row_groups: int = 0
    columns: dict[str, str | None] = field(default_factory=dict)  # pipeline name -> source column
    error: str | None = None


def _filesystem(url: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return fs, path


def _glob_root(path: str) -> str:
    """The directory part of a pattern before its first wildcard."""
    if not globlib.has_magic(path):
        return posixpath.dirname(path.rstrip("/"))
    head = path
    while globlib.has_magic(head):
        head = posixpath.dirname(head)
    return head


def _fingerprint(info: dict) -> str:
    """Size plus the store's change marker (S3 ETag, else mtime): cheap and changes when content does."""
    marker = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size')}:{str(marker).strip(chr(34))}"


def list_shards(cfg: InputConfig) -> list[Shard]:
    """Expand every input pattern to parquet files. Names are relative to each pattern's root, under
    `input.dataset` when it is set (see `Shard`)."""
    shards: dict[str, Shard] = {}
    for pattern in cfg.paths:
        fs, path = _filesystem(pattern, cfg.storage_options)
        # fsspec reuses filesystem instances and s3fs caches listings in them: a second run in one process
        # would otherwise see the first run's files and ETags (changed shards skipped, new ones missed).
        fs.invalidate_cache()
        protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
        if fs.isdir(path):
            matches, root = fs.glob(posixpath.join(path, "**/*.parquet")), path.rstrip("/")
        else:
            matches, root = fs.glob(path), _glob_root(path)
        if not matches:
            raise FileNotFoundError(f"input pattern {pattern!r} matches no parquet file")
        for match in sorted(matches):
            info = fs.info(match)
            if info.get("type") == "directory":
                continue
            name = posixpath.relpath(match, root) if root else match
            name = f"{cfg.dataset}/{name}" if cfg.dataset else name
            uri = match if protocol in ("file", "local") else f"{protocol}://{match}"
            if name in shards and shards[name].uri != uri:
                raise ValueError(
                    f"shards {shards[name].uri} and {uri} would share the row-id prefix {name!r}; "
                    "list them under one common input directory"
                )
            shards[name] = Shard(uri=uri, name=name, fingerprint=_fingerprint(info))
    return list(shards.values())


def _resolve_columns(schema: pa.Schema, cfg: InputConfig) -> dict[str, str | None]:
    names = set(schema.names)
    aliases_by_target: dict[str, list[str]] = {}
    for source, target in cfg.aliases.items():
        aliases_by_target.setdefault(target, []).append(source)

    def pick(target: str, preferred: str) -> str | None:
        if preferred in names:
            return preferred
        return next((s for s in aliases_by_target.get(target, []) if s in names), None)

    if cfg.image_column is not None:
        image = cfg.image_column if cfg.image_column in names else None
    else:
        image = pick("image", "__none__") or next((c for c in IMAGE_COLUMN_CANDIDATES if c in names), None)
    return {
        "image": image,
        "key": pick("key", cfg.key_column),
        "url": pick("url", cfg.url_column),
        "caption": pick("caption", cfg.caption_column),
        "status": pick("status", cfg.status_column),
        "error_message": "error_message" if "error_message" in names else None,
    }


def inspect_shard(shard: Shard, cfg: InputConfig) -> ShardPlan:
    """Read the footer: row count and column mapping; any problem becomes `error`, naming the file."""
    try:
        fs, path = _filesystem(shard.uri, cfg.storage_options)
        with fs.open(path, "rb") as fh:
            meta = pq.ParquetFile(fh)
            schema, num_rows, row_groups = meta.schema_arrow, meta.metadata.num_rows, meta.num_row_groups
    except Exception as exc:  # noqa: BLE001 - any unreadable footer fails just this shard
        return ShardPlan(
            shard, error=f"{shard.uri}: not a readable parquet file ({type(exc).__name__}: {exc})"
        )
    columns = _resolve_columns(schema, cfg)
    if columns["image"] is None:
        wanted = cfg.image_column or " / ".join(IMAGE_COLUMN_CANDIDATES)
        return ShardPlan(
            shard,
            num_rows,
            row_groups,
            columns,
            error=f"{shard.uri}: missing required image column ({wanted}); columns are {schema.names}; "
            "set input.image_column",
        )
    return ShardPlan(shard, num_rows, row_groups, columns)


def _as_text(array: pa.Array) -> pa.Array:
    """A column as UTF-8 strings; bytes that are not UTF-8 are replaced (U+FFFD), row by row, rather than
    failing the shard: a caption with one bad byte is still a caption."""
    try:
        text = pc.cast(array, pa.string())
        text.validate(full=True)
        return text
    except pa.ArrowInvalid:
        raw = array.cast(pa.binary()) if pa.types.is_string(array.type) else pc.cast(array, pa.binary())
        return pa.array([None if v is None else v.decode("utf-8", "replace") for v in raw.to_pylist()])


def _over_limit(values: pa.Array, limit: int) -> tuple[pa.Array, pa.Array]:
    """Byte lengths (null counts as 0) and which values are longer than `limit`."""
    lengths = pc.fill_null(pc.binary_length(values), 0)
    return lengths, pc.greater(lengths, limit)


def _cap_text(text: dict[str, pa.Array], limit: int) -> tuple[dict[str, pa.Array], pa.Array]:
    """Cut every key/url/caption longer than `limit` bytes to `limit` characters; return the cut columns
    and a reason per row (null when none was too long). A cut key loses its id (`_row_ids`)."""
    n = len(text["key"])
    reasons: list[str | None] = [None] * n
    for name, values in text.items():
        lengths, over = _over_limit(values, limit)
        if pc.any(over).as_py():
            for i in pc.indices_nonzero(over).to_pylist():
                reasons[i] = (
                    reasons[i] or f"{name} is {lengths[i].as_py()} bytes, over input.max_text_bytes={limit}"
                )
            text[name] = pc.if_else(over, pc.utf8_slice_codeunits(values, 0, limit), values)
    return text, pa.array(reasons, pa.string())


def row_id(shard_name: str, key: str | None, row: int) -> str:
    """The id of a row: `<shard name>/<key>`, or `<shard name>#<row index>` for a row without a key (a
    real key cannot produce it: after the same shard name, a key's id continues with '/').

    The shard name is `[<input.dataset>/]<path relative to the input root>` (`Shard`): with a dataset,
    `laion/part-00000.parquet/123`; without, `part-00000.parquet/123`. A dataset name holds no '/'."""
    return f"{shard_name}/{key}" if key is not None else f"{shard_name}#{row}"


def _row_ids(shard_name: str, keys: pa.Array, row_index: pa.Array, limit: int) -> pa.Array:
    """`row_id` vectorised over uncut keys. A key over `limit` bytes is stored cut, and two keys cut alike
    would share an id, so its row gets the positional id, like a null key."""
    _, too_long = _over_limit(keys, limit)
    by_key = pc.binary_join_element_wise(shard_name, keys, "/")
    by_row = pc.binary_join_element_wise(shard_name, pc.cast(row_index, pa.string()), "#")
    return pc.if_else(too_long, by_row, pc.coalesce(by_key, by_row))


def _repeats(meta: pq.ParquetFile, plan: ShardPlan, row_group: int, first_row: int, limit: int) -> np.ndarray:
    """For each row of `row_group`: the shard row index of the first row with its id, when that is an
    earlier row of the shard, else -1. Only the key column of row groups 0..row_group is read, so a
    worker holding one row group de-duplicates as if it had seen the whole shard."""
    n = meta.metadata.row_group(row_group).num_rows
    source = plan.columns.get("key")
    if not source:  # every row has its positional id: none repeats
        return np.full(n, -1, np.int64)
    keys = meta.read_row_groups(list(range(row_group + 1)), columns=[source]).column(source)
    ids = _row_ids(plan.shard.name, _as_text(keys.combine_chunks()), pa.array(np.arange(len(keys))), limit)
    codes = ids.dictionary_encode().indices.to_numpy()
    _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    first_of = first[inverse][first_row:]
    return np.where(first_of < np.arange(first_row, first_row + n), first_of, -1).astype(np.int64)


def _open_checked(fh: Any, plan: ShardPlan, row_group: int, now: str) -> pq.ParquetFile:
    """The opened file, if it is still the listed one: same fingerprint (`now`, taken after opening, so
    the handle is no newer than it), same row count, and the row group exists."""
    if now != plan.shard.fingerprint:
        raise ShardChanged(plan.shard, f"listed as {plan.shard.fingerprint}, now {now}")
    meta = pq.ParquetFile(fh)
    if meta.metadata.num_rows != plan.num_rows or row_group >= meta.num_row_groups:
        raise ShardChanged(
            plan.shard,
            f"listed with {plan.num_rows} rows, its footer now declares {meta.metadata.num_rows} rows "
            f"in {meta.num_row_groups} row groups",
        )
    return meta


def read_chunks(plan: ShardPlan, row_group: int, cfg: InputConfig, chunk_rows: int) -> Iterator[pa.Table]:
    """Yield the row group `chunk_rows` rows at a time, with the pipeline's column names.

    `row` is the row's index in the shard; ids follow `row_id` (`_row_ids`). `repeat_of` is the shard
    row index of an earlier row with the same id, or -1 (`_repeats`). A file that is not the one listed
    raises `ShardChanged`."""
    fs, path = _filesystem(plan.shard.uri, cfg.storage_options)
    mapping = plan.columns
    source_columns = sorted({c for c in mapping.values() if c})
    with fs.open(path, "rb") as fh:
        fs.invalidate_cache(path)  # a cached listing would hide a change
        meta = _open_checked(fh, plan, row_group, _fingerprint(fs.info(path)))
        first_row = sum(meta.metadata.row_group(i).num_rows for i in range(row_group))
        repeat_of = _repeats(meta, plan, row_group, first_row, cfg.max_text_bytes)
        offset = 0  # in the row group
        for batch in meta.iter_batches(batch_size=chunk_rows, row_groups=[row_group], columns=source_columns):
            n = batch.num_rows
            if first_row + offset + n > plan.num_rows:
                raise ShardChanged(
                    plan.shard, f"row group {row_group} holds rows past the listed {plan.num_rows}"
                )
            row_index = pa.array(range(first_row + offset, first_row + offset + n), pa.int64())

            def column(name: str, batch: pa.RecordBatch = batch, n: int = n) -> pa.Array:
                source = mapping.get(name)
                return _as_text(batch.column(source)) if source else pa.nulls(n, pa.string())

            text = {name: column(name) for name in ("key", "url", "caption")}
            ids = _row_ids(plan.shard.name, text["key"], row_index, cfg.max_text_bytes)
            text, text_error = _cap_text(text, cfg.max_text_bytes)
            yield pa.table(
                {
                    "id": ids,
                    "row": row_index,
                    "repeat_of": pa.array(repeat_of[offset : offset + n], pa.int64()),
                    "shard": pa.array([plan.shard.name] * n, pa.string()),
                    **text,
                    "text_error": text_error,
                    "status": pc.coalesce(column("status"), pa.scalar("success")),
                    "error_message": column("error_message"),
                    "image": pc.cast(batch.column(mapping["image"]), pa.binary()),
                }
            )
            offset += n
