"""The job as it really runs: S3 in and out (moto), a SIGKILLed CLI rerun to exactly once, ray job submit."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from datetime import timedelta
from pathlib import Path
from uuid import uuid4

import lancedb
import pyarrow.parquet as pq
import pytest
import ray
from conftest import free_port, index_config, input_ids, lance_s3_options, lance_table
from processes import assert_exactly_once, kill_session, session_pids, session_process

from pipeline.job import run_index
from pipeline.query import Searcher
from pipeline.read import inspect_shard, list_shards, read_chunks

KEY = SECRET = "testing"  # moto accepts any credentials; the ones s3_server also puts in the env
REGION = "us-east-1"
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.prefix) / "bin"  # the venv's: python, ray
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION")


# --- 1. S3 in, S3 out ------------------------------------------------------------------------------------


@ray.remote
def _rows_read_without_env_credentials(plan, input_cfg) -> int:
    """Read a shard in a Ray worker with the AWS env vars removed: only storage_options can authenticate."""
    saved = {k: os.environ.pop(k) for k in AWS_ENV if k in os.environ}
    try:
        return sum(t.num_rows for rg in range(plan.row_groups) for t in read_chunks(plan, rg, input_cfg, 64))
    finally:
        os.environ.update(saved)


@pytest.mark.slow
def test_s3_input_and_lancedb_output_then_rerun_skips_by_etag(ray_local, s3_server, scene_shards, tmp_path):
    import boto3
    import s3fs

    bucket = f"icar-{uuid4().hex[:8]}"
    client = boto3.client(
        "s3", endpoint_url=s3_server, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name=REGION
    )
    client.create_bucket(Bucket=bucket)
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, key=KEY, secret=SECRET, skip_instance_cache=True)
    for path in sorted(scene_shards.glob("*.parquet")):
        fs.put_file(str(path), f"{bucket}/scenes/{path.name}")

    input_options = {"endpoint_url": s3_server, "key": KEY, "secret": SECRET}
    lance_options = lance_s3_options(s3_server)
    cfg = index_config([f"s3://{bucket}/scenes/*.parquet"], f"s3://{bucket}/lance")
    cfg.input.storage_options = input_options
    cfg.output.storage_options = lance_options

    # The Ray workers get the credentials from the config, not from the environment of the test process.
    plan = inspect_shard(list_shards(cfg.input)[0], cfg.input)
    assert plan.error is None and plan.shard.uri == f"s3://{bucket}/scenes/00000.parquet"
    probe = cfg.input.model_copy(update={"storage_options": input_options | {"skip_instance_cache": True}})
    assert ray.get(_rows_read_without_env_credentials.remote(plan, probe)) == 24

    summary = run_index(cfg)
    assert (summary.shards_committed, summary.shards_failed, summary.rows_ok) == (3, 0, 72)

    expected = input_ids(scene_shards)
    assert_exactly_once(
        lance_table(cfg.output.uri, "images", **lance_options).column("id").to_pylist(), expected
    )
    assert fs.ls(f"{bucket}/lance")  # the tables really are objects in the bucket
    manifest = lance_table(cfg.output.uri, "images_manifest", **lance_options).to_pylist()
    etags = {}
    for path in sorted(scene_shards.glob("*.parquet")):
        head = client.head_object(Bucket=bucket, Key=f"scenes/{path.name}")
        etags[f"s3://{bucket}/scenes/{path.name}"] = f"{head['ContentLength']}:{head['ETag'].strip(chr(34))}"
    assert {m["uri"]: (m["status"], m["rows_ok"], m["fingerprint"]) for m in manifest} == {
        uri: ("done", 24, fingerprint) for uri, fingerprint in etags.items()
    }

    again = run_index(cfg)
    assert (again.shards_already_done, again.shards_committed, again.rows_ok) == (3, 0, 0)
    assert lance_table(cfg.output.uri, "images", **lance_options).num_rows == len(expected)

    # Rewrite one shard with 4 rows fewer: a new ETag, so this rerun in the same process redoes that shard
    # only, and the dropped rows leave the table with it.
    changed = tmp_path / "00001.parquet"
    pq.write_table(pq.read_table(scene_shards / "00001.parquet").slice(0, 20), changed)
    fs.put_file(str(changed), f"{bucket}/scenes/00001.parquet")
    third = run_index(cfg)
    assert (third.shards_already_done, third.shards_committed, third.rows_ok) == (2, 1, 20)
    dropped = {f"00001.parquet/{k}" for k in pq.read_table(scene_shards / "00001.parquet").column("key")[20:]}
    expected = [i for i in expected if i not in dropped]
    assert_exactly_once(
        lance_table(cfg.output.uri, "images", **lance_options).column("id").to_pylist(), expected
    )


# --- 2. SIGKILL the CLI mid-run, rerun, every row exactly once --------------------------------------------

CORPUS_SHARDS, CORPUS_ROWS = 8, 8
# ViT-B-32 (random weights) encodes slowly enough on CPU that shards commit seconds apart, leaving a wide
# window to kill in; the kill/rerun protocol does not depend on the model.
KILL_RUN_SETTINGS = ("model.name=ViT-B-32", "encoder.batch_size=4", "ray.decode_batch_size=2")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    from icar_lab.scenes.shards import write_corpus

    out = tmp_path_factory.mktemp("small")
    write_corpus(
        out, seed=11, split="fixture", num_images=CORPUS_SHARDS * CORPUS_ROWS, shard_size=CORPUS_ROWS
    )
    return out


def _statuses(manifest) -> Counter:
    """How many shards are in each state (the manifest is a log: a shard's state is its latest row)."""
    log = manifest.to_arrow().sort_by("seq").to_pylist()
    return Counter({(r["dataset"], r["shard"]): r["status"] for r in log}.values())


@contextlib.contextmanager
def _cli_index(corpus: Path, db: str, log: Path, *settings: str, prelude: str = ""):
    """The real CLI in its own session and Ray temp dir (short: Ray's socket paths have a length limit),
    after `prelude` ran in its process (tests/ is on its path: `import faults`)."""
    ray_tmp = tempfile.mkdtemp(prefix="icar-ray-", dir="/tmp")
    code = "; ".join(
        filter(None, ("import sys", prelude, "from pipeline.cli import main", "sys.exit(main())"))
    )
    cmd = [sys.executable, "-c", code, "index", "--input", str(corpus), "--output", db]
    for setting in ("ray.num_cpus=2", *KILL_RUN_SETTINGS, *settings):
        cmd += ["--set", setting]
    path = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    try:
        with session_process(cmd, log, env) as proc:
            yield proc
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _kill_when(proc: subprocess.Popen, db: str, log: Path, condition) -> Counter:
    """Poll the manifest; when `condition` holds, freeze the driver (the only writer), confirm, SIGKILL.

    Freezing first makes the check exact: the state read while stopped is the state the kill leaves.
    Returns the manifest's status counts at the kill.
    """
    connection = lancedb.connect(db, read_consistency_interval=timedelta(0))
    manifest = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the CLI exited ({proc.returncode}) before the kill:\n{log.read_text()[-3000:]}")
        if manifest is None:
            with contextlib.suppress(ValueError, FileNotFoundError):
                manifest = connection.open_table("images_manifest")
        if manifest is not None and condition(connection, _statuses(manifest)):
            os.kill(proc.pid, signal.SIGSTOP)
            status = _statuses(manifest)
            if condition(connection, status):
                kill_session(proc.pid)
                return status
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.002)
    pytest.fail(f"no kill point within the deadline:\n{log.read_text()[-3000:]}")


def _some_done(connection, status: Counter) -> bool:
    return 1 <= status["done"] < CORPUS_SHARDS


ROUNDS = "output.commit_shards=2"  # 8 shards commit in rounds of 2: a run has rounds behind and ahead


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["after-rounds", "round-embeddings-committed"])
def test_sigkilled_cli_rerun_indexes_every_row_exactly_once(ray_local, small_corpus, tmp_path, kill):
    """The CLI SIGKILLed (driver and Ray alike) between rounds, caught by a poll of the manifest; or by
    the driver itself right after the second round's embeddings were committed, its shards still `writing`
    (tests/faults.py `kill_driver_at`). The rerun skips the `done` shards, replaces the `writing` ones and
    indexes the rest: every row exactly once."""
    db, log = str(tmp_path / "db"), tmp_path / "cli.log"
    if kill == "after-rounds":
        with _cli_index(small_corpus, db, log, ROUNDS) as proc:
            at_kill = _kill_when(proc, db, log, _some_done)
            assert proc.wait(timeout=30) == -signal.SIGKILL
    else:
        prelude = "import faults; faults.kill_driver_at('images', 2)"
        with _cli_index(small_corpus, db, log, ROUNDS, prelude=prelude) as proc:
            assert proc.wait(timeout=400) == -signal.SIGKILL, log.read_text()[-5000:]
        manifest = lance_table(db, "images_manifest")
        at_kill = Counter(manifest.column("status").to_pylist())
        writing = [m["shard"] for m in manifest.to_pylist() if m["status"] == "writing"]
        assert at_kill["done"] >= 1 and writing, at_kill
        images = Counter(lance_table(db, "images").column("shard").to_pylist())
        assert {shard: images[shard] for shard in writing} == dict.fromkeys(writing, CORPUS_ROWS)
    assert not session_pids(proc.pid)
    done = at_kill["done"]

    cfg = index_config([str(small_corpus)], db, *KILL_RUN_SETTINGS, ROUNDS)
    summary = run_index(cfg)
    assert (summary.shards_already_done, summary.shards_committed) == (done, CORPUS_SHARDS - done)
    assert summary.rows_ok == CORPUS_ROWS * (CORPUS_SHARDS - done)

    expected = input_ids(small_corpus)
    images = lance_table(db, "images")
    assert_exactly_once(images.column("id").to_pylist(), expected)
    assert images.num_rows == len(expected) == CORPUS_SHARDS * CORPUS_ROWS
    manifest = lance_table(db, "images_manifest").to_pylist()
    assert sorted((Path(m["shard"]).name, m["status"], m["rows_ok"]) for m in manifest) == [
        (f"{i:05d}.parquet", "done", CORPUS_ROWS) for i in range(CORPUS_SHARDS)
    ]


@pytest.mark.slow
def test_two_cli_runs_started_together_write_every_row_once(small_corpus, tmp_path):
    """A nightly run overlapping a manual one: one writes, the other exits 3 naming the writer."""
    db = str(tmp_path / "db")
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    with _cli_index(small_corpus, db, logs[0]) as first, _cli_index(small_corpus, db, logs[1]) as second:
        codes = [first.wait(timeout=600), second.wait(timeout=600)]
    assert sorted(codes) == [0, 3], [log.read_text()[-2000:] for log in logs]
    loser = logs[codes.index(3)].read_text()
    assert "is being written by job" in loser and "--wait" in loser
    expected = input_ids(small_corpus)
    assert_exactly_once(lance_table(db, "images").column("id").to_pylist(), expected)
    manifest = lance_table(db, "images_manifest").to_pylist()
    assert sorted(m["status"] for m in manifest) == ["done"] * CORPUS_SHARDS


# --- 3. ray job submit to a real head node ---------------------------------------------------------------


@contextlib.contextmanager
def _ray_head(env: dict[str, str]):
    """`ray start --head --block` in its own session; torn down by killing exactly that session.

    Not `ray stop --force`: it kills every Ray process on the machine by name, including the session's
    `ray_local` and anyone else's Ray.
    """
    gcs, dashboard, agent, client = (free_port() for _ in range(4))
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
        "--disable-usage-stats",
    ]  # fmt: skip
    log = Path(env["RAY_TMPDIR"]) / "head.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"ray start exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"dashboard not up:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{address}/api/version", timeout=5) as response:
                    if response.status == 200:
                        break
            time.sleep(1)
        yield address
    finally:
        kill_session(proc.pid)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_ray_job_submit_runs_the_job_on_a_cluster_with_the_venv_python(scene_shards, tmp_path):
    db = str(tmp_path / "db")
    ray_tmp = tempfile.mkdtemp(prefix="icar-ray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    # A test-only cluster without token auth (Ray 2.60 enables it by default). The job driver runs with the
    # raylet's environment, so the venv's bin/ first on PATH is what makes `python` the venv's python.
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_TMPDIR": ray_tmp,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    try:
        with _ray_head(env) as address:
            index = shlex.join(
                ["python", "jobs/index.py", "--input", str(scene_shards), "--output", db]
                + ["--set", "encoder.batch_size=16", "--set", "ray.decode_batch_size=8"]
                # the GPU plan (decode tasks apart from the encoder actor) on a logical GPU; no CUDA
                # here, so the actor encodes on its CPU
                + ["--set", "encoder.gpus_per_actor=1"]
            )
            check = "python -c 'import sys; print(\"job python prefix:\", sys.prefix)'"
            runtime_env = {"excludes": [".venv", ".git", "results", ".demo"]}
            submit = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
                 "--runtime-env-json", json.dumps(runtime_env), "--", "sh", "-c", f"{check} && {index}"],
                env=env, capture_output=True, text=True, timeout=400,
            )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0, output[-5000:]
    assert "succeeded" in output and f"job python prefix: {sys.prefix}" in output, output[-5000:]
    assert "shards: 3 found, 0 already indexed, 3 committed, 0 failed" in output

    cfg = index_config([str(scene_shards)], db)
    searcher = Searcher.open(cfg)
    searcher.check_model()
    ids = searcher.table.to_arrow().column("id").to_pylist()
    assert_exactly_once(ids, input_ids(scene_shards))
    row = pq.read_table(scene_shards / "00001.parquet", columns=["key", "caption"]).to_pylist()[0]
    hits = searcher.search(searcher.embed_text([row["caption"]]), k=5, where="id LIKE '00001.parquet/%'")
    assert len(hits) == 5 and all(h["id"].startswith("00001.parquet/") for h in hits)
    manifest = lance_table(db, "images_manifest").to_pylist()
    assert sorted((Path(m["shard"]).name, m["status"], m["rows_ok"]) for m in manifest) == [
        (f"{i:05d}.parquet", "done", 24) for i in range(3)
    ]
