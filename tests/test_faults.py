"""Faults injected into real processes: an encoder that crashes on one row, one killed between writing its
fragments and the driver committing them, a worker node lost mid-run, S3 down and flaky, a commit whose
answer S3 loses, the driver SIGKILLed at commit points test_distributed.py does not reach, a reindex
killed mid-removal, a stalled writer whose table is taken over; and what the driver receives for a
100k-row shard. Each ends with every input id exactly once (or a run that exits non-zero naming what
failed, then a rerun that does) and the table readable.

The processes under test get their faults from tests/faults.py: encoder crashes through a Ray worker
setup hook (runtime_env), the driver kills by patching the committer in the driver, S3 faults from a
proxy in front of moto, the stall by SIGSTOP. The pipeline itself has no test hooks.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from uuid import uuid4

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import free_port, index_config, lance_s3_options, lance_table
from faults import CRASH_KEY_ENV, CRASH_LOG_ENV, WRITTEN_KEY_ENV, WRITTEN_MARKER_ENV, FaultProxy
from PIL import Image
from processes import assert_exactly_once, processes, session_pids, session_process

from pipeline.job import run_index
from pipeline.reindex import run_reindex

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
BIN = Path(sys.prefix) / "bin"
KEY = SECRET = "testing"
REGION = "us-east-1"
# the job's settings in every test, for the CLI (--set) and for run_index (index_config) alike
SETTINGS = ("encoder.batch_size=8", "ray.decode_batch_size=4", 'router.routes=[{"name": "full"}]')


# --- inputs ----------------------------------------------------------------------------------------------


def _png(rng: np.random.Generator, side: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_shard(
    path: Path, keys: list[str], row_group: int, seed: int, skip: Callable[[int], bool] = lambda i: False
) -> list[str]:
    """An img2dataset-style shard of 8x8 PNGs; the rows `skip(i)` picks failed to download (no image: a
    `skipped` row of the rejected table). Returns the row ids the pipeline must write."""
    rng = np.random.default_rng(seed)
    skipped = [skip(i) for i in range(len(keys))]
    table = pa.table(
        {
            "key": keys,
            "url": [f"https://example.com/{k}.png" for k in keys],
            "caption": [f"caption {seed} of {k}" for k in keys],
            "png": pa.array([None if s else _png(rng) for s in skipped], pa.binary()),
            "status": ["failed_to_download" if s else "success" for s in skipped],
            "error_message": ["HTTP 404" if s else None for s in skipped],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group)
    return [f"{path.name}/{k}" for k in keys]


def write_shards(directory: Path, shards: int, rows: int, row_group: int, skip_every: int = 0) -> list[str]:
    ids = []
    for s in range(shards):
        keys = [f"s{s}-{i:03d}" for i in range(rows)]
        skip = (lambda i: i % skip_every == skip_every - 1) if skip_every else (lambda i: False)
        ids += write_shard(directory / f"{s:05d}.parquet", keys, row_group, seed=s, skip=skip)
    return ids


# --- the job as a process of its own ---------------------------------------------------------------------


@contextlib.contextmanager
def _ray_tmp() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="icar-f-", dir="/tmp")  # short: Ray's socket paths are length-limited
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _env(ray_tmp: str, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **extra}


def _icar(command: str, *args: str, prelude: str = "") -> list[str]:
    """The CLI (`icar COMMAND --set SETTINGS... ARGS`), after `prelude` ran in the same process."""
    code = "; ".join(filter(None, ("import sys", prelude, "from pipeline.cli import main; sys.exit(main())")))
    return [sys.executable, "-c", code, command, *[a for s in SETTINGS for a in ("--set", s)], *args]


def _wait_for(
    what: str, condition: Callable[[], bool], proc: subprocess.Popen, log: Path, poll: float = 0.05
) -> None:
    deadline = time.monotonic() + 240
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the process exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within 240 s:\n{log.read_text()[-3000:]}")
        time.sleep(poll)


def _statuses(db: str, **storage: str) -> list[str]:
    """The shards' states in the manifest now, one per shard (none while it does not exist yet)."""
    with contextlib.suppress(ValueError, FileNotFoundError, OSError):
        connection = lancedb.connect(
            db, read_consistency_interval=timedelta(0), storage_options=storage or None
        )
        log = connection.open_table("images_manifest").to_arrow().sort_by("seq").to_pylist()
        return list({(r["dataset"], r["shard"]): r["status"] for r in log}.values())
    return []


def _check_table(
    db: str, expected: list[str], shards: int, removed: tuple[str, ...] = (), **storage: str
) -> None:
    """Every id exactly once, every shard `done` (but the `removed` ones: the manifest log keeps their
    state until it is compacted), and the table answers a vector query."""
    images = lance_table(db, "images", **storage)
    assert_exactly_once(images.column("id").to_pylist(), expected)
    manifest = lance_table(db, "images_manifest", **storage).to_pylist()
    states = {m["shard"]: m["status"] for m in manifest}
    assert {name: states.pop(name, None) for name in removed} == dict.fromkeys(removed, "removed"), manifest
    assert sorted(states.values()) == ["done"] * shards, manifest
    table = lancedb.connect(db, storage_options=storage or None).open_table("images")
    hits = table.search(images.column("vector")[0].values.to_numpy()).limit(3).to_list()
    assert len(hits) == 3


# --- 1. a row that kills its encoder, every time ---------------------------------------------------------


def test_a_row_that_kills_its_encoder_fails_its_shard_only_and_the_rerun_indexes_it(ray_local, tmp_path):
    """A deterministic crash (SIGKILL of the actor process on one row, as a decoder segfault would) is
    retried encoder.max_restarts times, then its shard fails; the others commit, exit 1, rerun heals."""
    corpus, db, log, crashes = (
        tmp_path / "in",
        str(tmp_path / "db"),
        tmp_path / "cli.log",
        tmp_path / "crashes",
    )
    expected = write_shards(corpus, shards=3, rows=8, row_group=4)
    hook = {"runtime_env": {"worker_process_setup_hook": "faults.crash_encoder_on_key"}}
    with _ray_tmp() as ray_tmp:
        env = _env(
            ray_tmp,
            RAY_JOB_CONFIG_JSON_ENV_VAR=json.dumps(hook),  # what `ray job submit` passes a driver
            **{CRASH_KEY_ENV: "s1-005", CRASH_LOG_ENV: str(crashes)},
        )
        cmd = _icar("index", "--input", str(corpus), "--output", db, "--set", "encoder.max_restarts=1")
        with session_process(cmd, log, env) as proc:
            code = proc.wait(timeout=400)
    out = log.read_text()
    assert code == 1, out[-5000:]
    assert len(crashes.read_text().split()) == 2, out[-5000:]  # the first try and one retry, no more
    assert "shards: 3 found, 0 already indexed, 2 committed, 1 failed" in out, out[-5000:]
    assert f"FAILED shard {corpus}/00001.parquet" in out and "encoder actor died 2 times" in out
    manifest = {Path(m["shard"]).name: m for m in lance_table(db, "images_manifest").to_pylist()}
    assert {name: m["status"] for name, m in manifest.items()} == {
        "00000.parquet": "done",
        "00001.parquet": "failed",
        "00002.parquet": "done",
    }
    assert "4 of its 8 rows never came back" in manifest["00001.parquet"]["error"]
    # none of the failed shard's rows is visible, though its other row group came back
    ids = lance_table(db, "images").column("id").to_pylist()
    assert_exactly_once(ids, [i for i in expected if not i.startswith("00001.parquet/")])

    # the next night, the decoder fixed (here: no hook), retries the failed shard only
    summary = run_index(index_config([str(corpus)], db, *SETTINGS))
    assert (summary.shards_already_done, summary.shards_committed, summary.shards_failed) == (2, 1, 0)
    _check_table(db, expected, shards=3)


# --- 1b. a stream that stops, or ends with rows missing ----------------------------------------------------


class _BrokenStream:
    """Stands in for the Ray Data stream: no batch, then `error` (or a plain end, rows never sent)."""

    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def iter_batches(self, **_: object) -> Iterator[dict]:
        if self.error is not None:
            raise self.error
        yield from ()


@pytest.mark.parametrize("error", [RuntimeError("executor gone"), None], ids=["stopped", "rows-lost"])
def test_shards_a_stream_left_incomplete_are_failed_not_the_job(ray_local, tmp_path, monkeypatch, error):
    """Whatever ends the stream early (Ray Data giving up, rows it dropped), the job finishes: the shards
    without all their rows are `failed` with the reason, none is `done`, and the run's summary says so."""
    from pipeline import job

    corpus, db = tmp_path / "in", str(tmp_path / "db")
    write_shards(corpus, shards=2, rows=4, row_group=2)
    monkeypatch.setattr(job, "stream", lambda *args: _BrokenStream(error))
    summary = run_index(index_config([str(corpus)], db, *SETTINGS))
    assert (summary.shards_committed, summary.shards_failed) == (0, 2)
    why = "the stream stopped (RuntimeError: executor gone)" if error else "Ray Data dropped a batch"
    for uri, reason in summary.failed_shards.items():
        assert reason.startswith(f"{uri}: 4 of its 4 rows never came back from Ray: {why}"), reason
    manifest = lance_table(db, "images_manifest").to_pylist()
    assert [(m["status"], m["error"]) for m in manifest] == [
        ("failed", summary.failed_shards[m["uri"]]) for m in manifest
    ]
    assert lance_table(db, "images").num_rows == 0


# --- 1c. an encoder killed between writing its fragments and the driver committing them ------------------


def _referenced(dataset: str, **storage: str) -> set[str]:
    """The data files (names under `data/`) some version of a Lance dataset references."""
    import lance

    options = storage or None
    latest = lance.dataset(dataset, storage_options=options)
    return {
        data.path
        for version in latest.versions()
        for fragment in lance.dataset(
            dataset, version=version["version"], storage_options=options
        ).get_fragments()
        for data in fragment.data_files()
    }


def test_an_encoder_killed_after_writing_its_fragments_leaves_orphans_that_the_rerun_removes(
    ray_local, tmp_path
):
    """The encoder actor writes a row group's fragment files, then is SIGKILLed before the driver hears of
    them (once: a marker file). Ray restarts it and retries the batch, which writes the rows again: the
    run ends 0 with every id once, the dead try's files in the table's folder but in no version. The next
    run removes them (`OutputTables.remove_orphans`) and every id is still there, once."""
    corpus, db, log, marker = tmp_path / "in", str(tmp_path / "db"), tmp_path / "cli.log", tmp_path / "killed"
    expected = write_shards(corpus, shards=3, rows=8, row_group=4)
    hook = {"runtime_env": {"worker_process_setup_hook": "faults.kill_encoder_after_write"}}
    with _ray_tmp() as ray_tmp:
        env = _env(
            ray_tmp,
            RAY_JOB_CONFIG_JSON_ENV_VAR=json.dumps(hook),
            **{WRITTEN_KEY_ENV: "s1-005", WRITTEN_MARKER_ENV: str(marker)},
        )
        with session_process(_icar("index", "--input", str(corpus), "--output", db), log, env) as proc:
            code = proc.wait(timeout=400)
    out = log.read_text()
    assert code == 0, out[-5000:]
    assert marker.exists(), f"no encoder was killed after writing: {out[-3000:]}"
    orphans = json.loads(marker.read_text())["images"]
    data = Path(db) / "images.lance" / "data"
    assert orphans and all((data / name).is_file() for name in orphans), (orphans, sorted(os.listdir(data)))
    assert not set(orphans) & _referenced(f"{db}/images.lance")
    _check_table(db, expected, shards=3)

    summary = run_index(index_config([str(corpus)], db, *SETTINGS))
    assert (summary.shards_already_done, summary.shards_committed) == (3, 0)
    assert not [name for name in orphans if (data / name).exists()]
    _check_table(db, expected, shards=3)


# --- 2a. a worker node lost mid-run -----------------------------------------------------------------------


@contextlib.contextmanager
def _ray_node(env: dict[str, str], log: Path, *args: str) -> Iterator[subprocess.Popen]:
    """`ray start --block` with 1 CPU and ports of its own (two nodes share this machine)."""
    ports = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port")
    ports += ("runtime-env-agent-port",)
    cmd = [str(BIN / "ray"), "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", *args]
    cmd += [f"--{p}={free_port()}" for p in ports] + ["--disable-usage-stats"]
    with session_process(cmd, log, env) as proc:
        yield proc


def test_a_worker_node_lost_mid_run_then_rerun_on_the_cluster_leaves_every_id_once(tmp_path):
    """Two nodes of 1 CPU, one encoder actor on each; the worker node's raylet is SIGKILLed while its
    actor encodes, and a replacement node joins (as Kubernetes replaces a pod). The run ends 0 with every
    id once, or 1 naming the shards it could not finish; a rerun on the cluster ends with every id once."""
    corpus, db, logs = tmp_path / "in", str(tmp_path / "db"), tmp_path
    expected = write_shards(corpus, shards=6, rows=16, row_group=4)
    gcs = free_port()
    head_args = [
        "--head",
        f"--port={gcs}",
        "--include-dashboard=false",
        f"--dashboard-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
    ]
    with _ray_tmp() as ray_tmp:
        # a lost node is declared dead within ~2 s instead of ~30 s
        health = {
            "RAY_health_check_initial_delay_ms": "0",
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_timeout_ms": "500",
            "RAY_health_check_failure_threshold": "3",
        }
        env = _env(ray_tmp, RAY_AUTH_MODE="disabled", **health)
        join = f"--address=127.0.0.1:{gcs}"
        with (
            _ray_node(env, logs / "head.log", *head_args) as head,
            _ray_node(env, logs / "worker.log", join) as worker,
        ):
            for node, log in ((head, logs / "head.log"), (worker, logs / "worker.log")):
                _wait_for("the node up", lambda log=log: "Ray runtime started" in log.read_text(), node, log)
            cmd = _icar(
                "index", "--input", str(corpus), "--output", db, "--set", f"ray.address=127.0.0.1:{gcs}"
            )
            cmd += ["--set", "output.commit_shards=1"]  # a round per shard: shards are done while others run
            with session_process(cmd, logs / "cli.log", env) as job:
                # an encoder actor works on the worker node and a shard is done: kill the node's raylet
                _wait_for(
                    "an actor on the worker node and a shard done",
                    lambda: session_pids(worker.pid, "MapWorker") and "done" in _statuses(db),
                    job,
                    logs / "cli.log",
                )
                (raylet,) = session_pids(worker.pid, "raylet/raylet")
                os.kill(raylet, signal.SIGKILL)
                at_kill = _statuses(db)
                with _ray_node(env, logs / "replacement.log", join):
                    code = job.wait(timeout=400)
                    out = (logs / "cli.log").read_text()
                    assert at_kill.count("done") < 6, "the run had finished before the node was lost"
                    assert code in (0, 1), out[-5000:]
                    if code == 1:
                        assert "FAILED shard" in out, out[-5000:]
                    else:
                        _check_table(db, expected, shards=6)
                    with session_process(cmd, logs / "rerun.log", env) as rerun:
                        assert rerun.wait(timeout=300) == 0, (logs / "rerun.log").read_text()[-5000:]
    _check_table(db, expected, shards=6)


# --- 2b. S3 down, flaky, or losing a commit's answer ------------------------------------------------------


class _Moto:
    """moto's S3 on a fixed port, stopped (listening socket closed: connection refused) and started again
    with its buckets intact (moto keeps them in this process's memory, not in the server)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.server._server.server_close()  # stop() alone leaves the socket listening, unanswered


CREDENTIALS = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": REGION}


def _s3_client(moto: _Moto):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=moto.endpoint,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name=REGION,
    )


def _bucket(moto: _Moto) -> str:
    bucket = f"faults-{uuid4().hex[:8]}"
    _s3_client(moto).create_bucket(Bucket=bucket)
    return bucket


def test_s3_down_during_a_commit_is_retried_and_the_run_ends_0_with_every_id_once(tmp_path):
    """Output on S3 behind the proxy (input local). S3 goes away for 4 s, starting just before the first
    transaction file PUT of the run's round, i.e. inside a commit (one round, once every shard is written:
    the workers, which write to S3 too, are idle). The driver retries that commit
    (output.commit_attempts, with backoff) and the run ends 0 with every id once: no rerun."""
    moto = _Moto()
    moto.start()
    corpus, log = tmp_path / "in", tmp_path / "cli.log"
    expected = write_shards(corpus, shards=8, rows=8, row_group=4)
    db, direct = f"s3://{_bucket(moto)}/lance", lance_s3_options(moto.endpoint)
    outage: list[float] = []  # when S3 went down, when it came back
    restarts: list[threading.Timer] = []

    def down_for_4_seconds() -> None:
        moto.stop()
        outage.append(time.monotonic())
        restarts.append(threading.Timer(4, lambda: (moto.start(), outage.append(time.monotonic()))))
        restarts[0].start()

    try:
        with FaultProxy(moto.endpoint) as proxy, _ray_tmp() as ray_tmp:
            storage = f"output.storage_options={json.dumps(lance_s3_options(proxy.endpoint))}"
            cmd = _icar("index", "--input", str(corpus), "--output", db, "--set", storage)
            cmd += ["--set", "output.commit_seconds=600"]  # one round (output.commit_shards=64), at the end
            with session_process(cmd, log, _env(ray_tmp, **CREDENTIALS)) as job:
                # the tables are open and fenced once the shards are listed: the next commit is the round
                _wait_for("the shards listed", lambda: "8 to do" in log.read_text(), job, log, poll=0.2)
                proxy.on_next_put(down_for_4_seconds, path=r"\.lance/_transactions/")
                code = job.wait(timeout=400)
            for restart in restarts:
                restart.join()
        out = log.read_text()
        assert len(outage) == 2, f"no commit after the shards were listed: {out[-3000:]}"
        assert proxy.counts["upstream down"] > 0, proxy.counts
        assert code == 0, out[-5000:]
        retries = re.findall(r"commit failed \(try (\d) of 5\), retrying in ([\d.]+) s", out)
        assert retries and retries[0] == ("1", "1.0"), out[-5000:]
        assert "shards: 8 found, 0 already indexed, 8 committed, 0 failed" in out, out[-5000:]
        _check_table(db, expected, shards=8, **direct)
    finally:
        moto.stop()


def test_s3_down_mid_run_and_flaky_requests_then_rerun_leaves_every_id_once(ray_local, tmp_path):
    """Input and output on S3 behind a proxy that answers 10% of requests 500/503 and delays 10% by 0.3 s;
    mid-run S3 goes away for 4 s. The run ends 0 with every id once, or non-zero naming the failure; a
    rerun with S3 healthy ends with every id once."""
    moto = _Moto()
    moto.start()
    bucket, client = _bucket(moto), _s3_client(moto)
    ids = write_shards(tmp_path / "in", shards=4, rows=12, row_group=4, skip_every=5)
    skipped = [i for n, i in enumerate(ids) if n % 12 % 5 == 4]  # rows 4 and 9 of each shard
    expected = [i for i in ids if i not in skipped]
    for path in sorted((tmp_path / "in").glob("*.parquet")):
        client.upload_file(str(path), bucket, f"in/{path.name}")
    db, log = f"s3://{bucket}/lance", tmp_path / "cli.log"
    try:
        with (
            FaultProxy(moto.endpoint, fail=0.1, delay=0.1, pause=0.3, seed=5) as proxy,
            _ray_tmp() as ray_tmp,
        ):
            storage = [
                f"input.storage_options={json.dumps({'endpoint_url': proxy.endpoint})}",
                f"output.storage_options={json.dumps(lance_s3_options(proxy.endpoint))}",
            ]
            cmd = _icar("index", "--input", f"s3://{bucket}/in/*.parquet", "--output", db)
            cmd += [a for s in storage for a in ("--set", s)]
            with session_process(cmd, log, _env(ray_tmp, **CREDENTIALS)) as job:
                direct = lance_s3_options(moto.endpoint)
                _wait_for("a shard done", lambda: "done" in _statuses(db, **direct), job, log, poll=0.5)
                moto.stop()
                down = proxy.counts["upstream down"]
                time.sleep(4)
                moto.start()
                code = job.wait(timeout=400)
            out = log.read_text()
            assert proxy.counts["fail"] and proxy.counts["delay"], proxy.counts
            assert proxy.counts["upstream down"] > down, (
                f"S3 was down while the job made no request: {proxy.counts}"
            )
        if code == 0:
            _check_table(db, expected, shards=4, **direct)
        else:  # whatever gave up names itself: a failed shard, or the error that stopped the job
            assert re.search(r"^(FAILED shard|[\w.]*(Error|Exception): )", out, re.MULTILINE), out[-5000:]

        cfg = index_config([f"s3://{bucket}/in/*.parquet"], db, *SETTINGS)
        cfg.input.storage_options = {"endpoint_url": moto.endpoint, "key": KEY, "secret": SECRET}
        cfg.output.storage_options = direct
        summary = run_index(cfg)
        assert summary.shards_failed == 0
        _check_table(db, expected, shards=4, **direct)
        rejected = lance_table(db, "images_rejected", **direct).column("id").to_pylist()
        assert_exactly_once(rejected, skipped)
    finally:
        moto.stop()


@pytest.mark.parametrize("unreachable", [False, True], ids=["answer-lost", "answer-lost-then-unreachable"])
def test_a_commit_whose_answer_s3_lost_is_found_landed_and_never_appended_twice(tmp_path, unreachable):
    """Output on S3 behind the proxy, one shard per round. Once a shard is done, the next PUT of an images
    table version (a round's Append) reaches S3 and its answer is replaced by a 503: the commit landed,
    the job cannot know it. Lance's own retry of the PUT meets the version already there and recognises
    it as its own; `unreachable` refuses that retry and Lance's checks until Lance gives up ("commit
    result ... is unknown"), so the job's commit retry must find the Append landed (`FencedTable._landed`)
    rather than append the fragments again. Either way the run ends 0 with every id once."""
    import lance

    moto = _Moto()
    moto.start()
    corpus, log = tmp_path / "in", tmp_path / "cli.log"
    expected = write_shards(corpus, shards=6, rows=8, row_group=4)
    db, direct = f"s3://{_bucket(moto)}/lance", lance_s3_options(moto.endpoint)
    try:
        with FaultProxy(moto.endpoint) as proxy, _ray_tmp() as ray_tmp:
            storage = f"output.storage_options={json.dumps(lance_s3_options(proxy.endpoint))}"
            cmd = _icar("index", "--input", str(corpus), "--output", db, "--set", storage)
            cmd += ["--set", "output.commit_shards=1"]
            with session_process(cmd, log, _env(ray_tmp, **CREDENTIALS)) as job:
                _wait_for("a shard done", lambda: "done" in _statuses(db, **direct), job, log, poll=0.2)
                proxy.lose_next_answer(r"/images\.lance/_versions/\d+\.manifest", refuse_after=unreachable)
                if unreachable:  # until Lance gives up the commit and the job's retry takes over
                    _wait_for(
                        "the commit given up",
                        lambda: "commit failed (try 1 of 5)" in log.read_text(),
                        job,
                        log,
                    )
                    proxy.stop_refusing()
                code = job.wait(timeout=400)
        out = log.read_text()
        assert len(proxy.lost) == 1, f"no images version written after the first round: {out[-3000:]}"
        assert code == 0, out[-5000:]
        if unreachable:
            assert proxy.counts["refused after the lost answer"] > 0, proxy.counts
            assert re.search(r"commit failed \(try 1 of 5\).*is unknown", out), out[-5000:]
        # the lost answer was an Append's (V2 version names count down from u64::MAX)
        version = 2**64 - 1 - int(re.search(r"/(\d+)\.manifest", proxy.lost[0]).group(1))
        images = lance.dataset(f"{db}/images.lance", storage_options=direct)
        assert type(images.read_transaction(version).operation).__name__ == "Append"
        _check_table(db, expected, shards=6, **direct)
    finally:
        moto.stop()


# --- 2c. the driver SIGKILLed at the commit points test_distributed.py does not reach -----------------------


@pytest.mark.parametrize(("point", "nth"), [("writing", 2), ("rejected", 2), ("images", 2), ("optimize", 1)])
def test_driver_killed_at_a_commit_point_then_rerun_leaves_every_id_once(ray_local, tmp_path, point, nth):
    """test_distributed kills after `done` rounds (a poll of the tables catches the driver there) and
    right after a round's embeddings. Here, one shard per round (output.commit_shards=1), at the points
    in between: the second shard `writing` with none of its rows in, with its rejected rows in but not
    its embeddings (test_distributed's corpus has no rejected rows), with both in and still `writing`
    (appending them again would duplicate), and in the end-of-run compaction. Both tables keep every id
    exactly once after the rerun."""
    corpus, db, log = tmp_path / "in", str(tmp_path / "db"), tmp_path / "cli.log"
    expected = write_shards(corpus, shards=2, rows=6, row_group=3, skip_every=3)
    kill = f"import faults; faults.kill_driver_at({point!r}, {nth})"
    cmd = _icar(
        "index", "--input", str(corpus), "--output", db, "--set", "output.commit_shards=1", prelude=kill
    )
    with _ray_tmp() as ray_tmp:
        with session_process(cmd, log, _env(ray_tmp)) as proc:
            assert proc.wait(timeout=300) == -signal.SIGKILL, log.read_text()[-5000:]
    skipped = [i for n, i in enumerate(expected) if n % 6 % 3 == 2]
    ok = [i for i in expected if i not in skipped]
    images, rejected = (lance_table(db, name) for name in ("images", "images_rejected"))
    if point == "optimize":
        assert _statuses(db) == ["done"] * 2
        assert_exactly_once(images.column("id").to_pylist(), ok)
    else:  # the second shard is `writing`, with what the point says of its rows in
        assert sorted(_statuses(db)) == ["done", "writing"]
        writing = lance_table(db, "images_manifest").filter(pa.compute.field("status") == "writing")
        shard = writing.column("shard")[0].as_py()
        written = {"writing": (0, 0), "rejected": (2, 0), "images": (2, 4)}[point]  # 6 rows, 2 rejected
        assert (
            rejected.filter(pa.compute.field("shard") == shard).num_rows,
            images.filter(pa.compute.field("shard") == shard).num_rows,
        ) == written

    summary = run_index(index_config([str(corpus)], db, *SETTINGS))
    assert summary.shards_failed == 0
    assert summary.shards_already_done == (2 if point == "optimize" else 1)
    _check_table(db, ok, shards=2)
    assert_exactly_once(lance_table(db, "images_rejected").column("id").to_pylist(), skipped)


# --- 2e. a shard deleted and another rewritten between two nightly runs, the second killed mid-removal ------


def test_reindex_killed_while_removing_a_deleted_shard_then_rerun_leaves_the_new_input_once(
    ray_local, tmp_path
):
    """test_reindex covers a deleted, a shrunk and a new shard between two uninterrupted nights. Here the
    rewritten shard keeps some keys (recaptioned), loses some and gains some, and the second night is
    SIGKILLed between deleting the removed shard's embeddings and its rejected and manifest rows."""
    corpus, db, log = tmp_path / "in", str(tmp_path / "db"), tmp_path / "cli.log"
    write_shards(corpus, shards=3, rows=8, row_group=4, skip_every=4)
    cfg = index_config([str(corpus)], db, *SETTINGS)
    assert run_index(cfg).shards_committed == 3

    (corpus / "00002.parquet").unlink()
    keys = [f"s1-{i:03d}" for i in range(4, 12)]  # s1-000..003 gone, 004..007 kept, 008..011 new
    rewritten = write_shard(corpus / "00001.parquet", keys, 4, seed=101, skip=lambda i: i % 4 == 3)
    kill = "import faults; faults.kill_driver_at('remove')"
    with _ray_tmp() as ray_tmp:
        with session_process(
            _icar("reindex", "--input", str(corpus), "--output", db, prelude=kill), log, _env(ray_tmp)
        ) as proc:
            assert proc.wait(timeout=300) == -signal.SIGKILL, log.read_text()[-5000:]
    removed = "00002.parquet"  # the shard's name: its identity, wherever the input is
    assert lance_table(db, "images").filter(pa.compute.field("shard") == removed).num_rows == 0
    assert lance_table(db, "images_rejected").filter(pa.compute.field("shard") == removed).num_rows == 2

    report = run_reindex(cfg)
    assert report.shards_removed == [removed] and report.summary["shards_committed"] == 1
    ids = [f"00000.parquet/s0-{i:03d}" for i in range(8)] + rewritten
    skipped = {i for n, i in enumerate(ids) if n % 4 == 3}
    _check_table(db, [i for i in ids if i not in skipped], shards=2, removed=(removed,))
    assert_exactly_once(lance_table(db, "images_rejected").column("id").to_pylist(), sorted(skipped))
    captions = {r["id"]: r["caption"] for r in lance_table(db, "images").to_pylist()}
    assert captions["00001.parquet/s1-004"] == "caption 101 of s1-004"  # the rewritten row, not the old one


# --- 2f. a writer stalled past its lease, its table taken over, then resumed -------------------------------


def _session_tree(sid: int) -> set[int]:
    """Live processes of session `sid` and their descendants (a Ray job's driver starts a session)."""
    table = processes()
    tree = {pid for pid, (state, _, session) in table.items() if session == sid and state not in "ZX"}
    while grown := {p for p, (state, ppid, _) in table.items() if ppid in tree and state not in "ZX"} - tree:
        tree |= grown
    return tree


def _signal_session(sid: int, sig: signal.Signals) -> None:
    """`sig` to the session leader first, then to everything else the session runs."""
    for pid in sorted(_session_tree(sid), key=lambda pid: pid != sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _state(pid: int) -> str:
    """A process's state letter (`T`: stopped), `X` once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "X"
    return stat[stat.rindex(")") + 2]


def _lease_lock_free(db: str, table: str = "images") -> bool:
    """Nobody holds the lease's lock file (a stopped holder caught in a renewal would hold it forever)."""
    import fcntl

    lock = Path(db) / "_leases" / f"{table}.lock"
    if not lock.exists():
        return True
    with open(lock, "rb") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
    return True


def _stall(sid: int, db: str) -> None:
    """SIGSTOP every process of the session (driver and Ray alike), outside any lease renewal."""
    deadline = time.monotonic() + 60
    while True:
        _signal_session(sid, signal.SIGSTOP)
        while running := [p for p in _session_tree(sid) if _state(p) not in "TtZX"]:
            for pid in running:  # started while the others were being stopped, or not stopped yet
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            time.sleep(0.05)
        if _lease_lock_free(db):
            return
        assert time.monotonic() < deadline, "the stalled job holds the lease lock every time"
        _signal_session(sid, signal.SIGCONT)
        time.sleep(0.1)


def test_a_stalled_writer_whose_table_was_taken_over_commits_nothing_more_and_exits_naming_the_lost_lease(
    ray_local, tmp_path
):
    """`icar index` (output.lease_seconds=3, a shard per round) is frozen whole (SIGSTOP) once its first
    round is done, as a VM pause or a long GC would. A second run watches its record stay unchanged for
    the lease, takes the table over, fences it and indexes the rest. Resumed, the first run finds its
    lease gone and its commits refused: it exits 3 naming the lost lease or table, having added nothing;
    every id is in the table exactly once."""
    corpus, db, log = tmp_path / "in", str(tmp_path / "db"), tmp_path / "stale.log"
    shards = 12
    expected = write_shards(corpus, shards=shards, rows=16, row_group=4)
    lease = ("output.lease_seconds=3", "output.commit_shards=1")
    cmd = _icar("index", "--input", str(corpus), "--output", db, *[a for s in lease for a in ("--set", s)])
    with _ray_tmp() as ray_tmp, session_process(cmd, log, _env(ray_tmp)) as stale:
        _wait_for("a shard done", lambda: "done" in _statuses(db), stale, log)
        _stall(stale.pid, db)
        try:
            at_stall = _statuses(db)  # final for the stalled run: none of its commits can land from now on
            assert at_stall.count("done") < shards, "the first run had finished before it was stalled"
            time.sleep(4)  # its record's `expires` passes: a run started now watches it, then takes over
            summary = run_index(index_config([str(corpus)], db, *SETTINGS, *lease))
        finally:
            _signal_session(stale.pid, signal.SIGCONT)
        code = stale.wait(timeout=300)
    out = log.read_text()
    assert code == 3, out[-5000:]
    lost = r"^icar: lost (the lease on table 'images'|table \S*/images\w*\.lance)"  # LeaseLost, either
    assert re.search(lost, out, re.MULTILINE), out[-3000:]
    assert (summary.shards_already_done, summary.shards_committed, summary.shards_failed) == (
        at_stall.count("done"),
        shards - at_stall.count("done"),
        0,
    )
    _check_table(db, expected, shards=shards)


# --- 3. the driver receives no rows: many small shards and one of 100k rows ------------------------------

BIG_ROWS, ROW_GROUP = 100_000, 5_000
SMALL_SHARDS, SMALL_ROWS = 30, 10
OK_EVERY = 1000  # one row in 1000 has an image: every row is written (most as rejected), few are encoded
# What the driver may receive per row on this corpus: part metadata (fragment lists, counts, timings: about
# a kilobyte per part, 50 parts) comes to under 1 byte per row. A row itself is 60+ bytes of id, key, url
# and caption (a rejected row; an embedding adds 1 KiB): receiving the rows would be far past this.
MAX_DRIVER_BYTES_PER_ROW = 8
MEASURED_DRIVER = """
import json, resource, sys
from pipeline.config import load_config
from pipeline.job import run_index

s = run_index(load_config(None, sys.argv[1:]))
peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
print("RESULT", json.dumps({
    "driver_bytes": s.driver_bytes, "commit_rounds": s.commit_rounds,
    "commit_seconds": round(s.commit_seconds, 1), "committed": s.shards_committed, "failed": s.shards_failed,
    "ok": s.rows_ok, "skipped": s.rows_skipped, "seconds": round(s.seconds, 1), "peak_rss_mib": peak_rss,
}))
"""


def test_the_driver_receives_part_metadata_not_rows_with_many_small_shards_and_a_100k_row_shard(
    tmp_path, record_property
):
    """The workers write the rows; the driver gets a few hundred bytes per part (fragment metadata,
    counts, timings), so what it receives, and holds, does not grow with the rows of a shard. Its bytes
    per row and peak RSS are reported (`-s`, or the junit property)."""
    corpus, db = tmp_path / "in", str(tmp_path / "db")
    big = [f"b-{i:06d}" for i in range(BIG_ROWS)]
    write_shard(corpus / "big.parquet", big, ROW_GROUP, seed=1, skip=lambda i: i % OK_EVERY != 0)
    for s in range(SMALL_SHARDS):
        keys = [f"s{s}-{i}" for i in range(SMALL_ROWS)]
        write_shard(corpus / f"small-{s:03d}.parquet", keys, SMALL_ROWS, seed=s, skip=lambda i: i % 2 == 1)
    settings = [
        f"input.paths={json.dumps([str(corpus)])}",
        f"output.uri={db}",
        'router.routes=[{"name": "full"}]',
        "ray.num_cpus=2",
    ]
    log = tmp_path / "run.log"
    cmd = [sys.executable, "-c", MEASURED_DRIVER, *settings]
    with _ray_tmp() as ray_tmp, session_process(cmd, log, _env(ray_tmp)) as proc:
        assert proc.wait(timeout=600) == 0, log.read_text()[-5000:]
    (line,) = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    total = BIG_ROWS + SMALL_SHARDS * SMALL_ROWS
    result["driver_bytes_per_row"] = round(result["driver_bytes"] / total, 3)
    print(f"\ndriver: {result}")
    record_property("driver", result)
    assert (result["committed"], result["failed"], result["ok"] + result["skipped"]) == (
        SMALL_SHARDS + 1,
        0,
        total,
    )
    assert 0 < result["driver_bytes"] <= MAX_DRIVER_BYTES_PER_ROW * total
    assert lance_table(db, "images").num_rows + lance_table(db, "images_rejected").num_rows == total
