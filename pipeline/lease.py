"""One writer per output table, enforced by the output itself, on local disk and on S3.

A job writes a table only while it holds that table's lease: a small JSON object under
`<output.uri>/_leases/`, created with an exclusive create (a hard link of a complete file locally, a
conditional PUT with `If-None-Match: *` on S3), so of two jobs started at the same moment, anywhere,
exactly one gets it.
The holder renews its expiry from a background thread; a lease whose holder died expires after
`output.lease_seconds`, or at once when the holder ran on this machine and its process is gone. Taking
over an expired lease creates the next generation (`<table>.<n+1>.lease`) exclusively, so two jobs that
both see it expired still cannot both win, and the old holder, should it wake up, sees the newer
generation before its next commit and stops (`check`). Readers never look at it.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.config import OutputConfig
from pipeline.write import is_local, output_filesystem

LEASE_DIR = "_leases"

log = logging.getLogger("icar.lease")


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


@dataclass
class LeaseRecord:
    owner: str
    host: str
    pid: int
    started: float
    expires: float
    generation: int
    scope: str = ""  # `_process_scope()` of the holder

    def held(self) -> bool:
        """Unexpired, and not left by a process that this machine can see has died (a SIGKILLed run is
        rerun at once on the same machine; elsewhere its lease has to expire)."""
        if self.expires <= time.time():
            return False
        if self.scope and self.scope == _process_scope() and self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass  # alive, someone else's
        return True

    def describe(self) -> str:
        left = self.expires - time.time()
        return (
            f"job {self.owner[:8]} on {self.host} (pid {self.pid}), started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.started))}, lease "
            + (f"expires in {left:.0f} s" if left > 0 else f"expired {-left:.0f} s ago")
        )


class TableLease:
    """The lease on one output table (see the module docstring). Use as a context manager."""

    def __init__(self, cfg: OutputConfig):
        self.fs, root = output_filesystem(cfg)
        self.directory = posixpath.join(root, LEASE_DIR)
        self.table, self.seconds = cfg.table, cfg.lease_seconds
        self.local = is_local(self.fs)
        self.record: LeaseRecord | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._pattern = re.compile(rf"^{re.escape(self.table)}\.(\d+)\.lease$")

    def _path(self, generation: int) -> str:
        return posixpath.join(self.directory, f"{self.table}.{generation}.lease")

    def _generations(self) -> list[int]:
        self.fs.invalidate_cache(self.directory)
        try:
            names = [posixpath.basename(p) for p in self.fs.ls(self.directory, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(self._pattern.match, names) if m)

    def _read(self, generation: int) -> LeaseRecord | None:
        """The record of a generation, None if it is gone (released). Records are only ever written
        whole (a PUT on S3, write-aside then link or rename locally), so a partial one means damage."""
        path = self._path(generation)
        try:
            return LeaseRecord(**json.loads(self.fs.cat_file(path)))
        except FileNotFoundError:
            return None
        except ValueError:
            raise RuntimeError(
                f"lease file {path} is not a lease record; delete it if no job is running"
            ) from None

    @staticmethod
    def _aside(path: str, record: LeaseRecord, data: bytes) -> str:
        """`data` written whole under a name of this job's own, next to `path` (local disk only)."""
        aside = f"{path}.{record.owner}.tmp"
        Path(aside).write_bytes(data)
        return aside

    def _create(self, record: LeaseRecord) -> bool:
        """Exclusive create of this generation's file; False when it already exists."""
        path, data = self._path(record.generation), json.dumps(asdict(record)).encode()
        if self.local:  # link() of a complete file fails if the name exists: an exclusive, whole create
            self.fs.makedirs(self.directory, exist_ok=True)
            aside = self._aside(path, record, data)
            try:
                os.link(aside, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(aside)
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")
            return True
        except OSError:  # S3 answers 412 Precondition Failed; s3fs maps it to FileExistsError or EINVAL
            self.fs.invalidate_cache(self.directory)
            if self.fs.exists(path):
                return False
            raise

    def try_acquire(self) -> LeaseRecord | None:
        """Take the lease if it is free or expired; else return the current holder's record."""
        generations = self._generations()
        generation = 0
        if generations:
            holder = self._read(generations[-1])
            if holder is not None and holder.held():
                return holder
            generation = generations[-1] + 1
        now = time.time()
        mine = LeaseRecord(
            uuid.uuid4().hex,
            socket.gethostname(),
            os.getpid(),
            now,
            now + self.seconds,
            generation,
            _process_scope(),
        )
        if not self._create(mine):
            return self._read(generation) or self.try_acquire()
        self.record = mine
        self._renewer = threading.Thread(target=self._renew_forever, name="icar-lease", daemon=True)
        self._renewer.start()
        return None

    def acquire(self, wait: bool = False, poll_seconds: float = 10.0) -> TableLease:
        """Take the lease, or raise `OutputBusy` naming the holder (with `wait`, poll until it is free)."""
        while True:
            holder = self.try_acquire()
            if holder is None:
                return self
            if not wait:
                raise OutputBusy(
                    f"table {self.table!r} is being written by {holder.describe()}; one job writes a "
                    "table at a time. Rerun when it has finished (or pass --wait); a crashed job's lease "
                    "expires by itself after output.lease_seconds"
                )
            time.sleep(poll_seconds)

    def _renew_forever(self) -> None:
        """Renew every quarter of the lease; a failed renewal (S3 briefly down) is retried at the next
        tick, and `check()` still stops the job before a commit if the lease did run out."""
        while not self._stop.wait(self.seconds / 4):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - the thread must outlive a transient error
                log.warning("renewing the lease on %r failed (%s); retrying", self.table, exc)

    def renew(self) -> None:
        """Push the expiry forward (an overwrite of this job's own generation; nobody else writes it)."""
        assert self.record is not None
        self.record.expires = time.time() + self.seconds
        path, data = self._path(self.record.generation), json.dumps(asdict(self.record)).encode()
        if self.local:  # write aside, then rename: a reader never sees half a record
            os.replace(self._aside(path, self.record, data), path)
        else:  # an S3 PUT replaces the object whole
            self.fs.pipe_file(path, data)

    def check(self) -> None:
        """Before each commit: raise `LeaseLost` if another job has taken the table over."""
        assert self.record is not None
        generations = self._generations()
        current = self._read(self.record.generation)
        if (
            generations[-1:] != [self.record.generation]
            or current is None
            or current.owner != self.record.owner
        ):
            raise LeaseLost(
                f"lost the lease on table {self.table!r} (this job stalled past output.lease_seconds="
                f"{self.seconds:g} and another job took over); stopped before writing more"
            )

    def release(self) -> None:
        """Stop renewing and remove this generation and every older one."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.record is not None:
            for generation in self._generations():
                if generation <= self.record.generation:
                    self.fs.rm_file(self._path(generation))
            self.record = None

    def __enter__(self) -> TableLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
