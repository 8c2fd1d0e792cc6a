"""One writer per output table, enforced by the output itself, on local disk and on S3.

A job writes a table only while it holds that table's lease: a small JSON record under
`<output.uri>/_leases/<table>.<generation>.lease`. Every write of a record is one of three atomic steps:

- create: a new generation, exclusively (a hard link of a complete file locally, a PUT with
  `If-None-Match: *` on S3), so of two jobs started at the same moment, anywhere, exactly one gets it;
- swap: replace a record only if it is still the version the writer last wrote or read (a PUT with
  `If-Match: <ETag>` on S3; locally a compare of the bytes and a rename, both under an `flock` of
  `<table>.lock`, which every swap and every delete of a record takes, so none can interleave);
- delete: of generations older than the writer's own, which only the holder of the latest one does.

The holder renews by swapping its record for one with the next `beat`; a failed swap means its record was
taken over (or removed), so the lease is lost for good: renewal stops and `check` raises `LeaseLost`.
Releasing swaps the record for a released one and deletes the older generations, so the latest
generation always stays and generation numbers are never reused: a holder that stalled through a
takeover and a release cannot bring its old generation back to life.

A record's wall-clock `expires` comes from its holder's clock, so it is only a hint. A job that finds the
table held takes it over only after watching the very same record version stay unchanged for the lease
length it carries, measured on its own monotonic clock (a live holder renews four times in that span), or
at once when the holder ran on this machine and its process is gone. Taking over swaps the old record for
a released one (failing if the holder renewed meanwhile) and then creates the next generation
exclusively, so two jobs that both decide to take over still cannot both win; the old holder's next
renewal or `check` fails before it commits again. Readers never look at the lease.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from fsspec.asyn import sync

from pipeline.config import OutputConfig
from pipeline.storage import is_local, output_filesystem

LEASE_DIR = "_leases"

log = logging.getLogger("icar.lease")

# Token: what a swap must find in place. Locally the record's bytes; on S3 its ETag (records are unique
# by owner and beat, so neither can recur for a different write).
Token = bytes | str


class OutputBusy(RuntimeError):
    """Another job holds the table's lease."""


class LeaseLost(RuntimeError):
    """This job's lease expired and another job took the table over: stop before writing more."""


def _process_scope() -> str:
    """Which pids a process can see: this boot of this machine and its pid namespace ('' if unknown)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _s3_error_code(exc: BaseException) -> str:
    """The S3 error code behind an s3fs exception (s3fs keeps botocore's error as the cause)."""
    response = getattr(exc.__cause__, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


@dataclass
class LeaseRecord:
    owner: str
    host: str
    pid: int
    started: float
    expires: float  # by the holder's clock: a hint for `acquire(wait=False)`, never a verdict
    generation: int
    scope: str = ""  # `_process_scope()` of the holder
    beat: int = 0  # renewals so far: a record that stops changing has a dead (or stalled) holder
    seconds: float = 0.0  # holder's lease length (renewed every quarter of it); 0: unknown, ours applies
    released: bool = False  # released by its holder, or taken over: the table is free at the next generation

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(data).items() if k in known})

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def dead_here(self) -> bool:
        """Left by a process that this machine can see has died (a SIGKILLed run is rerun at once on the
        same machine; elsewhere its record has to stop changing for a lease length)."""
        if not (self.scope and self.scope == _process_scope() and self.host == socket.gethostname()):
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, someone else's
        return False

    def describe(self) -> str:
        return (
            f"job {self.owner[:8]} on {self.host} (pid {self.pid}), started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.started))} by its clock, "
            f"renewed {self.beat} times, lease {self.seconds:g} s"
        )


class TableLease:
    """The lease on one output table (see the module docstring). Use as a context manager."""

    def __init__(self, cfg: OutputConfig):
        self.fs, root = output_filesystem(cfg)
        self.directory = posixpath.join(root, LEASE_DIR)
        self.table, self.seconds = cfg.table, cfg.lease_seconds
        self.local = is_local(self.fs)
        self.record: LeaseRecord | None = None
        self._token: Token | None = None  # of the record this job last wrote
        self._lost = False
        self._watch: tuple[int, Token, float] | None = None  # generation, token, monotonic first seen
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._pattern = re.compile(rf"^{re.escape(self.table)}\.(\d+)\.lease$")

    # -- storage: list, load, create, swap, delete ---------------------------------------------------

    def _path(self, generation: int) -> str:
        return posixpath.join(self.directory, f"{self.table}.{generation}.lease")

    def _generations(self) -> list[int]:
        self.fs.invalidate_cache(self.directory)
        try:
            names = [posixpath.basename(p) for p in self.fs.ls(self.directory, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(self._pattern.match, names) if m)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Locally: hold the table's lock file, so that a swap's compare-and-replace and the deletes of old
        generations never interleave (on S3 the conditional requests are atomic by themselves)."""
        if not self.local:
            yield
            return
        self.fs.makedirs(self.directory, exist_ok=True)
        fd = os.open(posixpath.join(self.directory, f"{self.table}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def _load(self, generation: int) -> tuple[LeaseRecord, Token] | None:
        """A generation's record and its token, read in one request; None if it is gone. Records are
        only ever written whole, so one that does not parse means damage."""
        path = self._path(generation)
        try:
            if self.local:
                data: bytes = Path(path).read_bytes()
                token: Token = data
            else:
                data, token = sync(self.fs.loop, self._get_object, path)
        except FileNotFoundError:
            return None
        try:
            return LeaseRecord.parse(data), token
        except (ValueError, TypeError):
            raise RuntimeError(
                f"lease file {path} is not a lease record; delete it if no job is running"
            ) from None

    async def _get_object(self, path: str) -> tuple[bytes, str]:
        bucket, key, _ = self.fs.split_path(path)
        response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await response["Body"].read(), response["ETag"]
        finally:
            response["Body"].close()

    def _aside(self, path: str, data: bytes) -> str:
        """`data` written whole under a name of its own next to `path` (local disk only)."""
        aside = f"{path}.{uuid.uuid4().hex}.tmp"
        Path(aside).write_bytes(data)
        return aside

    def _create(self, record: LeaseRecord) -> Token | None:
        """Exclusive create of the record's generation: its token, or None when the file already exists."""
        path, data = self._path(record.generation), record.encode()
        if self.local:  # link() of a complete file fails if the name exists: an exclusive, whole create
            self.fs.makedirs(self.directory, exist_ok=True)
            aside = self._aside(path, data)
            try:
                os.link(aside, path)
            except FileExistsError:
                return None
            finally:
                os.unlink(aside)
            return data
        bucket, key, _ = self.fs.split_path(path)
        try:
            return self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")["ETag"]
        except OSError:  # 412 (exists) or 409 (a concurrent create); also a retry of a PUT that landed
            current = self._load(record.generation)
            if current is None:
                raise
            return current[1] if current[0] == record else None

    def _swap(self, record: LeaseRecord, token: Token) -> Token | None:
        """Replace the record of `record.generation` if it is still the version `token` names: the new
        token, or None when it changed or is gone."""
        path, data = self._path(record.generation), record.encode()
        if self.local:
            with self._locked():
                try:
                    if Path(path).read_bytes() != token:
                        return None
                except FileNotFoundError:
                    return None
                os.replace(self._aside(path, data), path)  # a reader never sees half a record
            return data
        bucket, key, _ = self.fs.split_path(path)
        try:
            return self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=token)["ETag"]
        except OSError as exc:
            if not (isinstance(exc, FileNotFoundError) or _s3_error_code(exc) == "PreconditionFailed"):
                raise  # a 409 (concurrent conditional write), 5xx, no connection: undecided, try again
            current = self._load(record.generation)  # a retried PUT whose first try landed is ours
            return current[1] if current is not None and current[0] == record else None

    def _delete_before(self, generation: int) -> None:
        """Delete the generations older than `generation` (under the lock locally: see `_locked`)."""
        with self._locked():
            for older in self._generations():
                if older < generation:
                    try:
                        self.fs.rm_file(self._path(older))
                    except FileNotFoundError:
                        pass

    # -- the protocol --------------------------------------------------------------------------------

    def _unchanged_for_a_lease(self, generation: int, token: Token, record: LeaseRecord) -> bool:
        """Whether this job has seen this very record version for the holder's lease length, by this
        machine's monotonic clock (no other machine's clock is trusted); starts watching it if not."""
        now = time.monotonic()
        if self._watch is None or self._watch[:2] != (generation, token):
            self._watch = (generation, token, now)
        return now - self._watch[2] >= (record.seconds or self.seconds)

    def try_acquire(self) -> LeaseRecord | None:
        """One look: take the lease if it is free, released, left by a dead process on this machine, or
        unchanged since this object first saw it a lease length ago; else return the holder's record.
        Calling it repeatedly (as `acquire(wait=True)` does) is what watches a record."""
        while True:
            generations = self._generations()
            latest = generations[-1] if generations else -1
            loaded = self._load(latest) if generations else None
            if loaded is not None:
                holder, token = loaded
                if not holder.released:
                    if not (holder.dead_here() or self._unchanged_for_a_lease(latest, token, holder)):
                        return holder
                    released = replace(holder, released=True, beat=holder.beat + 1)
                    if self._swap(released, token) is None:
                        continue  # renewed, or another job took it first: look again
                    log.warning("took over the lease on %r from %s", self.table, holder.describe())
            now = time.time()
            mine = LeaseRecord(
                owner=uuid.uuid4().hex,
                host=socket.gethostname(),
                pid=os.getpid(),
                started=now,
                expires=now + self.seconds,
                generation=latest + 1,
                scope=_process_scope(),
                seconds=self.seconds,
            )
            token = self._create(mine)
            if token is None:
                continue  # another job created this generation first: look at it
            self.record, self._token, self._watch, self._lost = mine, token, None, False
            self._stop = threading.Event()  # a fresh one: this object may have held and released before
            self._renewer = threading.Thread(target=self._renew_forever, name="icar-lease", daemon=True)
            self._renewer.start()
            return None

    def acquire(self, wait: bool = False, poll_seconds: float = 10.0) -> TableLease:
        """Take the lease, or raise `OutputBusy` naming the holder; with `wait`, poll until it is free.

        Without `wait`, a holder whose record is unexpired by this machine's clock is refused at once. One
        that looks expired (it died, or the clocks disagree) is watched, for up to its lease length: if it
        renews, it is alive and is refused; if it stays unchanged, it is taken over."""
        holder = self.try_acquire()
        first = holder
        if holder is not None and not wait and holder.expires <= time.time():
            log.warning(
                "the lease on %r held by %s looks expired by this machine's clock; watching it for up to "
                "%g s before taking it over",
                self.table,
                holder.describe(),
                holder.seconds or self.seconds,
            )
        while holder is not None:
            if not wait and (holder != first or holder.expires > time.time()):
                raise OutputBusy(
                    f"table {self.table!r} is being written by {holder.describe()}; one job writes a "
                    "table at a time. Rerun when it has finished (or pass --wait); a crashed job's lease "
                    "is taken over once it has stopped changing for output.lease_seconds"
                )
            pause = poll_seconds if wait else min(poll_seconds, (holder.seconds or self.seconds) / 8)
            time.sleep(pause)
            holder = self.try_acquire()
        return self

    def _renew_forever(self) -> None:
        """Renew every quarter of the lease; a failed request (S3 briefly down) is retried at the next
        tick, while a refused one means the lease is lost, and renewing stops."""
        while not self._stop.wait(self.seconds / 4):
            try:
                self.renew()
            except LeaseLost as exc:
                log.error("%s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - the thread must outlive a transient error
                log.warning("renewing the lease on %r failed (%s); retrying", self.table, exc)

    def _lose(self) -> LeaseLost:
        """Remember that the lease is gone (for good: renewing stops) and say so."""
        self._lost = True
        self._stop.set()
        return LeaseLost(
            f"lost the lease on table {self.table!r} (this job stalled past output.lease_seconds="
            f"{self.seconds:g} and another job took over); stopped before writing more"
        )

    def renew(self) -> None:
        """Swap this job's record for the next beat; raise `LeaseLost` if it is no longer this job's own
        (taken over, released by its successor, removed): only the owner's renewal can succeed."""
        assert self.record is not None and self._token is not None
        if self._lost:
            raise self._lose()
        renewed = replace(self.record, beat=self.record.beat + 1, expires=time.time() + self.seconds)
        token = self._swap(renewed, self._token)
        if token is None:
            raise self._lose()
        self.record, self._token = renewed, token

    def check(self) -> None:
        """Before each commit: raise `LeaseLost` if another job has taken the table over."""
        assert self.record is not None
        if self._lost:
            raise self._lose()
        generations = self._generations()
        current = self._load(self.record.generation)
        if (
            generations[-1:] != [self.record.generation]
            or current is None
            or current[0].owner != self.record.owner
            or current[0].released
        ):
            raise self._lose()

    def release(self) -> None:
        """Stop renewing, mark this job's generation released (only if it is still its own) and delete the
        older ones. The released record stays, so the next job takes the next generation number."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.record is not None and self._token is not None and not self._lost:
            released = replace(self.record, released=True, beat=self.record.beat + 1)
            if self._swap(released, self._token) is None:
                self._lost = True
                log.warning("the lease on %r was taken over before it was released", self.table)
            else:
                self._delete_before(self.record.generation)
        self.record = self._token = None

    def __enter__(self) -> TableLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
