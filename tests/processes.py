"""Real processes for the crash tests: run a command in a session of its own, SIGKILL all it started,
and check what the tables hold afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def assert_exactly_once(ids: list[str], expected: list[str]) -> None:
    duplicated = {i: n for i, n in Counter(ids).items() if n > 1}
    assert not duplicated, f"ids written more than once: {duplicated}"
    assert sorted(ids) == sorted(expected)


def processes() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, parent pid, session id) of every process, from /proc (Linux)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                state, ppid, _, session = stat[stat.rindex(")") + 2 :].split()[:4]
                table[int(entry)] = (state, int(ppid), int(session))
    return table


def session_pids(sid: int, needle: str = "") -> list[int]:
    """Live processes of session `sid` (whose command line contains `needle`, if given)."""
    pids = []
    for pid, (state, _, session) in processes().items():
        if session == sid and state not in "ZX":
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                    pids.append(pid)
    return pids


def kill_session(sid: int) -> None:
    """SIGKILL all that a session we started runs, and wait until it is gone.

    Its process group first (the crash), then the rest of the session (Ray workers run in process groups
    of their own) and descendants that started sessions of their own (a Ray job's driver).
    """
    tree, table = {sid}, processes()
    while grown := {pid for pid, (_, ppid, _) in table.items() if ppid in tree} - tree:
        tree |= grown

    def alive() -> list[int]:
        return [
            pid
            for pid, (state, _, session) in processes().items()
            if state not in "ZX" and (session == sid or pid in tree)
        ]

    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while pids := alive():
        assert time.monotonic() < deadline, f"processes of session {sid} survived SIGKILL: {pids}"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


@contextlib.contextmanager
def session_process(cmd: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """`cmd` in its own session, output to `log`; afterwards everything that session still runs is
    SIGKILLed (exact pids, never `ray stop`, which would take the tests' `ray_local` and anyone else's
    Ray with it)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        kill_session(proc.pid)
        proc.wait(timeout=30)
