"""Where the output lives: the LanceDB connection, the same location as an fsspec filesystem, the path of a
table's Lance dataset, and what counts as a transient object-store failure.

One place for the storage helpers that the writer, the lease, the aliases, the reindex and the query side
all need, so that none of them imports another's internals."""

from __future__ import annotations

import logging
import posixpath
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import fsspec

from pipeline.config import OutputConfig

if TYPE_CHECKING:
    import lancedb

log = logging.getLogger("icar.write")
T = TypeVar("T")

# LanceDB object-store option -> s3fs option, so one `output.storage_options` serves LanceDB and fsspec
_S3FS_OPTIONS = {
    "aws_endpoint": "endpoint_url",
    "aws_access_key_id": "key",
    "aws_secret_access_key": "secret",
}

# What an object store says when a request may well succeed later. Lance raises these, and schema or type
# errors alike, as RuntimeError/OSError/ValueError, so the text decides. `\btimeout` skips the
# `retry_timeout: 180s` that Lance appends to every S3 error, a 403 included; S3's error codes are matched
# with their case.
_TRANSIENT = re.compile(
    r"(?i:connection (reset|refused|closed|aborted)|broken pipe|\btimed out\b|\btimeout\b"
    r"|error sending request|tcp connect|could not connect|network unreachable|status code:? 5\d\d"
    r"|service unavailable|reduce your request rate)|SlowDown|ServiceUnavailable|InternalError"
)


def is_transient(exc: BaseException) -> bool:
    """An object-store failure worth another try (connection reset/refused, timeout, 5xx, SlowDown);
    never a schema, type or conflict error. Lance raises an I/O failure while opening a dataset as a
    ValueError that says `LanceError(IO)`."""
    io = isinstance(exc, OSError | RuntimeError) or (
        isinstance(exc, ValueError) and "LanceError(IO)" in str(exc)
    )
    return io and bool(_TRANSIENT.search(str(exc)))


def retrying(
    call: Callable[[int], T],
    attempts: int,
    backoff: float,
    retryable: Callable[[BaseException], bool] = is_transient,
    what: str = "commit",
) -> T:
    """`call(attempt)`, tried `attempts` times, waiting `backoff` seconds doubled after each failure that
    `retryable` accepts: Lance's own request retries give up after a few seconds of S3 down (about 2.5 s
    with connections refused), the backoff rides out an outage of about 25 s with the defaults."""
    for attempt in range(1, attempts + 1):
        try:
            return call(attempt)
        except Exception as exc:
            if attempt == attempts or not retryable(exc):
                raise
            wait = backoff * 2 ** (attempt - 1)
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            log.warning(
                "%s failed (try %d of %d), retrying in %.1f s: %s",
                what,
                attempt,
                attempts,
                wait,
                first,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def sql_literal(value: str) -> str:
    """A string as a Lance SQL literal: quoted, with its quotes doubled, so no value can end the literal."""
    return "'" + value.replace("'", "''") + "'"


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


def dataset_uri(cfg: OutputConfig, table: str) -> str:
    """The Lance dataset behind a LanceDB table of the output database (LanceDB's `<uri>/<name>.lance`)."""
    return posixpath.join(cfg.uri.rstrip("/"), f"{table}.lance")


def connect(cfg: OutputConfig) -> lancedb.DBConnection:
    """Open the output database. lancedb is imported here, not at module load: importing it installs a
    fork hook that warns in every process forked afterwards, and the job starts Ray (which forks) first."""
    import lancedb

    return lancedb.connect(cfg.uri, storage_options=cfg.storage_options or None)
