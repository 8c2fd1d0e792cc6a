"""One writer per table: the lease on local disk and on a real S3 API (moto's server), raced for real."""

from __future__ import annotations

import multiprocessing
import os
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
        assert again.record.generation == 0  # released: the next job starts afresh


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


def test_on_s3_exactly_one_of_many_racing_jobs_gets_the_table_and_expiry_works(s3_server):
    import boto3

    bucket = f"lease-{uuid4().hex[:8]}"
    boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    options = {
        "aws_endpoint": s3_server,
        "aws_access_key_id": KEY,
        "aws_secret_access_key": SECRET,
        "aws_region": REGION,
        "allow_http": "true",
    }
    cfg = OutputConfig(uri=f"s3://{bucket}/index", storage_options=options, lease_seconds=2.0)
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
