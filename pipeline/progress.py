"""What a person watching a job sees: one progress line, and libraries that stay quiet unless asked.

On a terminal the line is rewritten in place; in a log file (not a tty) it is printed at most every
`interval` seconds, so a night's log holds a readable trace instead of Ray Data's per-operator flood.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import TextIO

# Ray's C++ core worker prints this for every Ray Data actor pool with restarts enabled (the pool's own
# constructor arguments live in the object store; github.com/ray-project/ray/issues/53727). It is not
# actionable for a user of this job and Ray has no switch for it short of silencing all C++ errors.
_RAY_NOISE = (b"has constructor arguments in the object store and max_restarts > 0",)


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data: no progress bars or per-operator INFO lines on the console (its log file keeps them)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if verbose:
        return
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.ERROR)


class StderrFilter:
    """Drop known, non-actionable lines that native code writes to file descriptor 2; pass the rest.

    Python's `logging`/`warnings` cannot reach C++ log lines, so the filter sits on the descriptor itself
    for the duration of a job. Everything else is forwarded unchanged, line by line."""

    def __init__(self, patterns: tuple[bytes, ...] = _RAY_NOISE):
        self.patterns = patterns
        self._saved: int | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StderrFilter:
        sys.stderr.flush()
        self._saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=self._pump, args=(read_end,), daemon=True)
        self._thread.start()
        return self

    def _pump(self, read_end: int) -> None:
        assert self._saved is not None
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not any(p in line for p in self.patterns):
                        os.write(self._saved, line + b"\n")
            if pending:
                os.write(self._saved, pending)

    def __exit__(self, *exc: object) -> None:
        sys.stderr.flush()
        assert self._saved is not None and self._thread is not None
        os.dup2(self._saved, 2)  # closes the pipe's last write end: the pump drains and stops
        self._thread.join(timeout=5)
        os.close(self._saved)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """One line per job: shards done, rows done, rows/s, ETA. `verbose` adds a line per committed shard."""

    def __init__(
        self, stream: TextIO | None = sys.stderr, interval: float | None = None, verbose: bool = False
    ):
        self.stream = stream
        self.tty = bool(stream is not None and stream.isatty())
        self.interval = interval if interval is not None else (0.2 if self.tty else 30.0)
        self.verbose = verbose
        self.shards_total = self.shards_done = self.rows_total = self.rows_done = 0
        self.started = self._last = time.monotonic()
        self._line_open = False

    @classmethod
    def silent(cls) -> Progress:
        return cls(stream=None)

    def start(self, shards: int, rows: int) -> None:
        self.shards_total, self.rows_total = shards, rows
        self.started = self._last = time.monotonic()

    def advance(self, rows: int) -> None:
        self.rows_done += rows
        self._maybe_draw()

    def shard_done(self, message: str | None) -> None:
        self.shards_done += 1
        if self.verbose and message:
            self.note(message)
        self._maybe_draw(force=self.shards_done == self.shards_total)

    def note(self, message: str) -> None:
        """A line of its own (a failed shard, a start-up fact), above the progress line."""
        if self.stream is None:
            return
        self._clear()
        print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._line_open:
            print(file=self.stream, flush=True)
            self._line_open = False

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.rows_done / elapsed
        left = self.rows_total - self.rows_done
        eta = _duration(left / rate) if rate > 0 and left > 0 else "-"
        percent = self.rows_done / self.rows_total if self.rows_total else 1.0
        return (
            f"shards {self.shards_done}/{self.shards_total} | rows {self.rows_done}/{self.rows_total} "
            f"({percent:.0%}) | {rate:.1f} rows/s | elapsed {_duration(elapsed)} | ETA {eta}"
        )

    def _maybe_draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.stream is None or (not force and now - self._last < self.interval):
            return
        self._last = now
        if self.tty:
            print("\r\x1b[2K" + self.line(), end="", file=self.stream, flush=True)
            self._line_open = True
        else:
            print(self.line(), file=self.stream, flush=True)

    def _clear(self) -> None:
        if self._line_open:
            print("\r\x1b[2K", end="", file=self.stream)
            self._line_open = False
