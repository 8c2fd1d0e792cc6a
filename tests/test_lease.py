"""One writer per table: the lease on local disk and on a real S3 API (moto's server), raced for real."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from uuid import uuid4

import pytest

from pipeline.config import OutputConfig
from pipeline.lease import LeaseLost, OutputBusy, TableLease

KEY = SECRET = "testing"
REGION = "us-east-1"


def _crash(lease: TableLease) -> None:
    """What a SIGKILL leaves: the lease file stays, nobody renews it."""
    lease._stop.set()
    lease._renewer.join()


def test_a_held_table_is_refused_naming_the_holder_and_free_again_after_release(tmp_path):
    cfg = OutputConfig(uri=str(tmp_path / "db"))
    with TableLease(cfg).acquire():
        with pytest.raises(OutputBusy, match=r"'images' is being written by job \w+ on .+ \(pid \d+\)"):
            TableLease(cfg).acquire()
        other_table = cfg.model_copy(update={"table": "other"})
        with TableLease(other_table).acquire():  # leases are per table
            pass
    with TableLease(cfg).acquire() as again:
        assert again.record.generation == 1  # released: the next job takes the next generation at once


def test_an_expired_lease_is_taken_over_and_the_stale_holder_stops_before_writing(tmp_path):
    cfg = OutputConfig(uri=str(tmp_path / "db"), lease_seconds=0.3)
    stale = TableLease(cfg).acquire()
    stale.check()
    _crash(stale)
    with pytest.raises(OutputBusy):
        TableLease(cfg).acquire()  # not expired yet
    time.sleep(0.4)
    with TableLease(cfg).acquire() as successor:
        assert successor.record.generation == 1
        with pytest.raises(LeaseLost, match="another job took over"):
            stale.check()  # a holder that wakes up after expiry never commits again
        successor.check()


def test_a_live_holder_keeps_its_lease_by_renewing_it(tmp_path):
    cfg = OutputConfig(uri=str(tmp_path / "db"), lease_seconds=0.4)
    with TableLease(cfg).acquire() as holder:
        time.sleep(1.0)  # 2.5 lease lengths: only renewal keeps it
        with pytest.raises(OutputBusy):
            TableLease(cfg).acquire()
        holder.check()


def _race(uri: str, barrier) -> bool:
    barrier.wait()
    lease = TableLease(OutputConfig(uri=uri))
    won = lease.try_acquire() is None
    if won:
        time.sleep(1.0)  # hold it while the others look
        lease.release()
    return won


def test_of_processes_started_at_the_same_moment_exactly_one_gets_the_table(tmp_path):
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        barrier = manager.Barrier(6)
        with context.Pool(6) as pool:
            wins = pool.starmap(_race, [(str(tmp_path / "db"), barrier)] * 6)
    assert sum(wins) == 1


def _s3_output(endpoint: str, **settings: object) -> OutputConfig:
    """An output in a fresh bucket of moto's server."""
    import boto3

    bucket = f"lease-{uuid4().hex[:8]}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    options = {
        "aws_endpoint": endpoint,
        "aws_access_key_id": KEY,
        "aws_secret_access_key": SECRET,
        "aws_region": REGION,
        "allow_http": "true",
    }
    return OutputConfig(uri=f"s3://{bucket}/index", storage_options=options, **settings)


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """An output config maker, on local disk and on moto's S3."""
    if request.param == "local":
        return lambda **settings: OutputConfig(uri=str(tmp_path / "db"), **settings)
    endpoint = request.getfixturevalue("s3_server")
    return lambda **settings: _s3_output(endpoint, **settings)


def test_on_s3_exactly_one_of_many_racing_jobs_gets_the_table_and_expiry_works(s3_server):
    cfg = _s3_output(s3_server, lease_seconds=2.0)
    leases = [TableLease(cfg) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        holders = list(pool.map(lambda lease: lease.try_acquire(), leases))
    winners = [lease for lease, holder in zip(leases, holders, strict=True) if holder is None]
    assert len(winners) == 1
    (winner,) = winners
    assert {h.owner for h in holders if h is not None} == {winner.record.owner}  # all name the winner

    _crash(winner)
    time.sleep(2.2)
    with TableLease(cfg).acquire() as successor:
        assert successor.record.generation == 1
        with pytest.raises(LeaseLost):
            winner.check()
        with pytest.raises(LeaseLost):
            winner.renew()  # its record was swapped for a released one: the ETag no longer matches


def _acquire_and_die(uri: str) -> None:
    TableLease(OutputConfig(uri=uri)).acquire()
    os._exit(0)  # no release, no cleanup: what SIGKILL leaves


def test_a_lease_left_by_a_dead_process_on_this_machine_is_taken_at_once(tmp_path):
    uri = str(tmp_path / "db")
    holder = multiprocessing.get_context("spawn").Process(target=_acquire_and_die, args=(uri,))
    holder.start()
    holder.join()
    with TableLease(OutputConfig(uri=uri)).acquire() as rerun:  # lease_seconds is 600: not expired
        assert rerun.record.generation == 1


def _wake(lease: TableLease) -> None:
    """A stalled holder resumes: its renew thread runs again, as after SIGCONT or a long GC pause."""
    lease._stop.clear()
    lease._renewer = threading.Thread(target=lease._renew_forever, daemon=True)
    lease._renewer.start()


def test_a_stalled_holder_that_was_taken_over_never_gets_its_lease_back(output):
    cfg = output(lease_seconds=0.3)
    stalled = TableLease(cfg).acquire()
    _crash(stalled)  # stalled: alive, but not renewing
    successor = TableLease(cfg).acquire(wait=True, poll_seconds=0.05)  # after 0.3 s of no change
    assert successor.record.generation == 1
    successor.release()  # the successor finishes before the stalled holder wakes up

    _wake(stalled)
    stalled._renewer.join(timeout=5)
    assert not stalled._renewer.is_alive()  # its first renewal was refused, and it stopped renewing
    with pytest.raises(LeaseLost, match="another job took over"):
        stalled.renew()
    with pytest.raises(LeaseLost, match="another job took over"):
        stalled.check()  # and stays lost
    assert TableLease(cfg)._generations() == [1]  # generation 0 was not written back
    stalled.release()  # deletes nothing: not its lease any more
    with TableLease(cfg).acquire() as next_job:  # a released lease is free at once, at a new generation
        assert next_job.record.generation == 2


def test_a_holder_taken_over_learns_it_at_its_next_renewal(output):
    cfg = output(lease_seconds=0.3)
    stalled = TableLease(cfg).acquire()
    _crash(stalled)
    with TableLease(cfg).acquire(wait=True, poll_seconds=0.05) as successor:
        with pytest.raises(LeaseLost, match="another job took over"):
            stalled.renew()
        with pytest.raises(LeaseLost):
            stalled.check()
        successor.renew()
        successor.check()


def test_generation_numbers_keep_growing_across_releases_and_takeovers(output):
    cfg = output(lease_seconds=0.3)
    seen = []
    for _ in range(3):
        with TableLease(cfg).acquire() as lease:
            seen.append(lease.record.generation)
    crashed = TableLease(cfg).acquire()
    seen.append(crashed.record.generation)
    _crash(crashed)
    with TableLease(cfg).acquire(wait=True, poll_seconds=0.05) as successor:
        seen.append(successor.record.generation)
    with TableLease(cfg).acquire() as lease:
        seen.append(lease.record.generation)
    assert seen == [0, 1, 2, 3, 4, 5]
    assert TableLease(cfg)._generations() == [5]  # older generations are deleted, the latest stays


def _hold_with_a_slow_clock(uri: str, lease_seconds: float, acquired, done) -> None:
    """A holder on a machine whose clock is an hour behind: every `expires` it writes looks long past."""
    real = time.time
    time.time = lambda: real() - 3600
    with TableLease(OutputConfig(uri=uri, lease_seconds=lease_seconds)).acquire():
        acquired.set()
        done.wait(30)


def test_a_renewing_holder_is_not_taken_over_however_far_behind_its_clock_is(tmp_path):
    uri, context = str(tmp_path / "db"), multiprocessing.get_context("spawn")
    acquired, done = context.Event(), context.Event()
    holder = context.Process(target=_hold_with_a_slow_clock, args=(uri, 0.4, acquired, done))
    holder.start()
    try:
        assert acquired.wait(30)
        cfg = OutputConfig(uri=uri, lease_seconds=0.4)
        current = TableLease(cfg)._load(0)[0]
        assert current.expires < time.time() - 3000  # expired by this clock
        with pytest.raises(OutputBusy, match=r"'images' is being written by job \w+ on .+ \(pid \d+\)"):
            TableLease(cfg).acquire()  # watched it, saw it renewed: alive
        watcher, deadline = TableLease(cfg), time.monotonic() + 1.2  # three lease lengths
        while time.monotonic() < deadline:
            assert watcher.try_acquire() is not None
            time.sleep(0.05)
    finally:
        done.set()
        holder.join(30)
    with TableLease(OutputConfig(uri=uri, lease_seconds=0.4)).acquire() as after:
        assert after.record.generation == 1


def test_a_dead_holder_with_a_clock_far_ahead_is_taken_over_once_it_stops_changing(tmp_path, monkeypatch):
    cfg = OutputConfig(uri=str(tmp_path / "db"), lease_seconds=0.3)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # the holder's clock: an hour ahead
    dead = TableLease(cfg).acquire()
    _crash(dead)
    monkeypatch.setattr(time, "time", real)
    with pytest.raises(OutputBusy):
        TableLease(cfg).acquire()  # unexpired by this clock: refused at once without --wait
    started = time.monotonic()
    with TableLease(cfg).acquire(wait=True, poll_seconds=0.05) as successor:
        assert time.monotonic() - started >= 0.3  # watched for a lease length of its own clock
        assert successor.record.generation == 1
        with pytest.raises(LeaseLost):
            dead.check()


def test_without_wait_a_record_that_looks_expired_is_watched_then_taken_over(tmp_path):
    cfg = OutputConfig(uri=str(tmp_path / "db"), lease_seconds=0.3)
    dead = TableLease(cfg).acquire()
    _crash(dead)
    time.sleep(0.35)  # expired by its own (this) clock
    started = time.monotonic()
    with TableLease(cfg).acquire() as successor:
        assert 0.3 <= time.monotonic() - started < 5
        assert successor.record.generation == 1
