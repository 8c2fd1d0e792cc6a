"""The write path at scale: the driver's commit cost as the table grows, start-up over a large manifest,
and the real job on many tiny shards against the same images in a few large ones.

(a) `commit_path`: the driver's real commit path (`Committer` over `OutputTables`) fed `shards` simulated
    shards whose fragments are written beforehand, as workers would write them; the driver's seconds per
    shard (round time / shards in the round) early in the run vs at its end.
(b) `manifest_startup`: opening and fencing an alias whose manifest holds `shards` shards.
(c) `many_small_shards`: `icar index` on the same scene images as `small` shards and as `large` ones,
    alternated; the small-shard rate as a share of the large-shard rate.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import OutputConfig
from pipeline.write.commit import Committer, WrittenShard
from pipeline.write.manifest import DONE, ShardRecord
from pipeline.write.output import OutputTables
from pipeline.write.schema import REJECTED_SCHEMA

DIM = 128  # the embedded model's embedding width
ICAR = str(Path(sys.executable).with_name("icar"))


def _shard_rows(index: int, rows: int, schema: pa.Schema, rng: np.random.Generator) -> pa.Table:
    vectors = rng.standard_normal((rows, DIM)).astype(np.float32)
    name = f"{index:06d}.parquet"
    columns = {
        "id": [f"{name}/{i}" for i in range(rows)],
        "shard": [name] * rows,
        "key": [str(i) for i in range(rows)],
        "url": [f"https://example.com/{index}/{i}.jpg" for i in range(rows)],
        "caption": [f"caption {i}" for i in range(rows)],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
        "complexity": np.zeros(rows, np.float32),
        "route": ["full"] * rows,
        "exit_depth": np.full(rows, 12, np.int32),
        "tokens": np.full(rows, 65, np.int32),
        "gflops": np.ones(rows, np.float32),
        "model_id": ["bench"] * rows,
        "thumbnail": pa.nulls(rows, pa.binary()),
    }
    return pa.table(columns, schema=schema)


def _rejected_row(index: int) -> pa.Table:
    name = f"{index:06d}.parquet"
    row = {
        "id": f"{name}/x",
        "shard": name,
        "key": "x",
        "url": None,
        "caption": None,
        "status": "skipped",
        "reason": "source status 'failed_to_download'",
        "model_id": "bench",
    }
    return pa.Table.from_pylist([row], schema=REJECTED_SCHEMA)


def _commit_every_shard(
    tables: OutputTables, committer: Committer, shards: int, rows: int, log
) -> tuple[np.ndarray, np.ndarray]:
    """Write each simulated shard's fragments (and a rejected row) as a worker would, hand it to the
    driver's committer; (wall, CPU) seconds per shard, a round's time shared by the shards it committed."""
    from lance.fragment import write_fragments

    rng = np.random.default_rng(0)
    per_shard, cpu_per_shard = np.zeros(shards), np.zeros(shards)
    started, waiting = time.perf_counter(), []
    for index in range(shards):
        frags = write_fragments(_shard_rows(index, rows, tables.images.ds.schema, rng), tables.images.uri)
        record = ShardRecord(f"{index:06d}.parquet", "fp", DONE, rows_ok=rows, uri=f"/in/{index:06d}.parquet")
        rejected = write_fragments(_rejected_row(index), tables.rejected.uri)  # a failed download each
        waiting.append(index)
        t0, cpu0 = time.perf_counter(), time.process_time()
        committer.add(WrittenShard(record, frags, rejected))
        spent, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        if not committer.waiting:  # a round ran: its time is shared by the shards it committed
            per_shard[waiting] = spent / len(waiting)
            cpu_per_shard[waiting] = cpu / len(waiting)
            waiting = []
        if (index + 1) % max(shards // 10, 1) == 0:
            log(f"  [scale] {index + 1} shards committed, {time.perf_counter() - started:.0f} s")
    committer.flush()
    return per_shard, cpu_per_shard


def commit_path(
    workdir: Path, shards: int, rows: int, commit_shards: int, compact_fragments: int, log=print
) -> dict[str, Any]:
    """(a): seconds the driver spends per shard, by position in the run (module docstring)."""
    shutil.rmtree(workdir, ignore_errors=True)
    cfg = OutputConfig(
        uri=str(workdir / "db"),
        commit_shards=commit_shards,
        commit_seconds=1e9,  # rounds by count only: the measurement must not depend on the clock
        compact_fragments=compact_fragments,
        rows_per_fragment=rows * compact_fragments,
    )
    tables = OutputTables(cfg, "bench", DIM)
    committer = Committer(tables, tables.fence(), cfg)
    per_shard, cpu_per_shard = _commit_every_shard(tables, committer, shards, rows, log)
    windows = {"1001-2000": slice(1000, 2000), f"{shards - 999}-{shards}": slice(shards - 1000, shards)}
    ms = {name: float(per_shard[window].mean() * 1e3) for name, window in windows.items()}
    cpu_ms = {name: float(cpu_per_shard[window].mean() * 1e3) for name, window in windows.items()}
    early, late = ms.values()
    return {
        "shards": shards,
        "rows_per_shard": rows,
        "commit_shards": commit_shards,
        "compact_fragments": compact_fragments,
        "ms_per_shard": ms,
        "growth": late / early,
        # CPU seconds of this process (Lance's threads included): what other processes' load cannot inflate
        "cpu_ms_per_shard": cpu_ms,
        "cpu_growth": list(cpu_ms.values())[1] / list(cpu_ms.values())[0],
        "rounds": committer.stats.rounds,
        "compactions": committer.stats.compactions,
        "commits": committer.stats.commits,
        "seconds_committing": committer.stats.seconds,
        "rows": tables.images.ds.count_rows(),
        "images_fragments_at_end": tables.images.fragment_count(),
        "manifest_fragments_at_end": tables.manifest_log.fragment_count(),
        "per_shard_ms_by_thousand": [
            float(per_shard[i : i + 1000].mean() * 1e3) for i in range(0, shards, 1000)
        ],
    }


def manifest_startup(workdir: Path, shards: int, per_commit: int = 5000) -> dict[str, Any]:
    """(b): seconds to open, fence and read an alias whose manifest records `shards` done shards."""
    shutil.rmtree(workdir, ignore_errors=True)
    cfg = OutputConfig(uri=str(workdir / "db"))
    tables = OutputTables(cfg, "bench", DIM)
    manifest = tables.fence()
    for start in range(0, shards, per_commit):
        manifest.record(
            [
                ShardRecord(f"{i:07d}.parquet", "fp", DONE, 10, uri=f"/in/{i:07d}.parquet")
                for i in range(start, min(start + per_commit, shards))
            ]
        )
    t0 = time.perf_counter()
    reopened = OutputTables(cfg, "bench", DIM)
    state = reopened.fence()
    done = state.committed()
    seconds = time.perf_counter() - t0
    return {"shards": shards, "done": len(done), "open_fence_read_seconds": seconds}


def many_small_shards(
    workdir: Path, images: int, small: int, large: int, pairs: int, log=print
) -> dict[str, Any]:
    """(c): `icar index` images/s on `small`-image shards as a share of the rate on `large`-image shards
    (the same scene images, runs alternated, each in its own process with its own Ray)."""
    from icar_lab.scenes.shards import write_corpus

    corpora = {}
    for size in (large, small):
        corpora[size] = workdir / f"shards-of-{size}"
        shutil.rmtree(corpora[size], ignore_errors=True)
        write_corpus(corpora[size], seed=3, split="bench", num_images=images, shard_size=size)
    rates: dict[int, list[float]] = {large: [], small: []}
    for pair in range(pairs):
        for size in (large, small):
            db = workdir / f"db-{size}-{pair}"
            shutil.rmtree(db, ignore_errors=True)
            t0 = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pipeline.cli",
                    "index",
                    "--input",
                    str(corpora[size]),
                    "--output",
                    str(db),
                    "--set",
                    "ray.num_cpus=2",
                ],
                check=True,
                capture_output=True,
            )
            seconds = time.perf_counter() - t0
            rates[size].append(images / seconds)
            log(f"  [scale] {images} images in shards of {size}: {seconds:.1f} s, {images / seconds:.1f}/s")
    share = [s / b for s, b in zip(rates[small], rates[large], strict=True)]
    return {
        "images": images,
        "shard_sizes": [large, small],
        "images_per_second": {str(k): v for k, v in rates.items()},
        "share_per_pair": share,
        "share": float(np.median(share)),
        "note": "process wall time, Ray start-up and model load included, runs alternated",
    }


def routed_vs_full(workdir: Path, images: int, shard_size: int, pairs: int, log=print) -> dict[str, Any]:
    """(e): `icar index` end to end with the shipped routes against the same job at full depth, on the same
    scene images, runs alternated, each a process of its own (Ray start-up and model loads included)."""
    from icar_lab.scenes.shards import write_corpus

    corpus = workdir / "corpus"
    shutil.rmtree(workdir, ignore_errors=True)
    write_corpus(corpus, seed=4, split="bench", num_images=images, shard_size=shard_size)
    plans = {"routed": [], "full depth": ["--set", 'router.routes=[{"name": "full"}]']}
    seconds: dict[str, list[float]] = {name: [] for name in plans}
    for pair in range(pairs):
        for name, flags in plans.items():
            db = workdir / f"db-{pair}-{name.replace(' ', '-')}"
            t0 = time.perf_counter()
            run = [
                ICAR,
                "index",
                "--input",
                str(corpus),
                "--output",
                str(db),
                "--set",
                "ray.num_cpus=2",
                *flags,
            ]
            subprocess.run(run, check=True, capture_output=True)
            seconds[name].append(time.perf_counter() - t0)
            shutil.rmtree(db, ignore_errors=True)
            log(f"  [scale] {name}: {images} images in {seconds[name][-1]:.1f} s")
    ratios = [f / r for f, r in zip(seconds["full depth"], seconds["routed"], strict=True)]
    return {
        "images": images,
        "shards": -(-images // shard_size),
        "seconds": seconds,
        "speedup_per_pair": ratios,
        "speedup": float(np.median(ratios)),
        "note": "process wall time, Ray start-up and model loads included, runs alternated",
    }


S3_KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}  # moto's throwaway keys
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "RAY_AUTH_MODE": "disabled",  # a throwaway local cluster; real clusters keep token auth
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_s3() -> Iterator[dict[str, str]]:
    """A local S3 server (moto) with an `icar` bucket, for as long as the block runs: Lance's storage
    options for it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **S3_KEYS)
        s3.create_bucket(Bucket="icar")
        yield {"aws_endpoint": endpoint, "allow_http": "true", **S3_KEYS, "aws_region": "us-east-1"}
    finally:
        server.stop()


@contextmanager
def two_ray_nodes(workdir: Path, env: dict[str, str]) -> Iterator[str]:
    """A Ray head and a worker node (`ray start`, separate temp dirs, one CPU each) for as long as the
    block runs: the head's address."""
    ray = str(Path(sys.executable).with_name("ray"))
    gcs = _free_port()
    nodes = [
        [ray, "start", "--head", f"--port={gcs}", "--num-cpus=1", "--include-dashboard=false",
         f"--temp-dir={workdir / 'head'}", f"--ray-client-server-port={_free_port()}"],
        [ray, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1", f"--temp-dir={workdir / 'worker'}"],
    ]  # fmt: skip
    try:
        for node in nodes:
            subprocess.run(node, check=True, capture_output=True, env=env)
        yield f"127.0.0.1:{gcs}"
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env)


def _driver_received(run: subprocess.CompletedProcess) -> tuple[str, float | None]:
    """What the run's summary says the driver received per row, as text and in bytes (None: not said)."""
    per_row = [line for line in run.stdout.splitlines() + run.stderr.splitlines() if "bytes/row" in line]
    if not per_row:
        return "not reported", None
    driver = per_row[-1].split("received ")[-1]
    return driver, float(driver.split()[0])


def two_nodes_on_s3(workdir: Path, images: int, shard_size: int, log=print) -> dict[str, Any]:
    """(d): a head and a worker node index into moto's S3 server; every id once, and the bytes the driver
    received per row (from the run's summary)."""
    import lancedb

    from icar_lab.scenes.shards import write_corpus

    shutil.rmtree(workdir, ignore_errors=True)
    corpus = workdir / "corpus"
    write_corpus(corpus, seed=5, split="bench", num_images=images, shard_size=shard_size)
    env = os.environ | S3_ENV
    with moto_s3() as options, two_ray_nodes(workdir, env) as address:
        index = [sys.executable, "-m", "pipeline.cli", "index", "--input", str(corpus)]
        index += ["--output", "s3://icar/lance", "--set", f"ray.address={address}"]
        index += ["--set", f"output.storage_options={json.dumps(options)}"]
        t0 = time.perf_counter()
        run = subprocess.run(index, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - t0
        if run.returncode != 0:
            raise RuntimeError(f"two-node run failed: {run.stderr[-3000:]}")
        table = lancedb.connect("s3://icar/lance", storage_options=options).open_table("images")
        ids = table.to_arrow()["id"].to_pylist()
    driver, bytes_per_row = _driver_received(run)
    log(f"  [scale] two nodes on S3: {len(ids)} rows, {len(set(ids))} distinct ids, driver {driver}")
    return {
        "images": images,
        "shards": -(-images // shard_size),
        "rows": len(ids),
        "distinct_ids": len(set(ids)),
        "every_id_once": len(ids) == len(set(ids)) == images,
        "driver_received": driver,
        "driver_bytes_per_row": bytes_per_row,
        "seconds": seconds,
    }


# The projection's inputs that are not measured here: each one is printed as an ASSUMPTION.
COLLECTIONS = {"LAION-400M": 400_000_000, "LAION-5B": 5_850_000_000}
ROWS_PER_SHARD = 10_000  # img2dataset's default shard size
GPUS_PER_NODE = 8
NODE_COUNTS = (8, 64)
IMAGES_PER_GPU_SECOND = 312.0 * 3  # ViT-L-14 per A100 (clip-retrieval) times the ~3x the routes give here
REQUESTS_PER_COMMIT = 4  # read the version hint, PUT the manifest (conditional), PUT the transaction, hint
BYTES_PER_ROW = 768 * 2 + 4_000  # float16 ViT-L-14 vector + a 128-px WebP thumbnail
MULTIPART_BYTES = 5 * 2**20


def project_writes(commit: dict[str, Any], bytes_per_part: float | None) -> dict[str, Any]:
    """LAION-400M and LAION-5B on N GPU nodes: what the write path costs the driver and the object store,
    from the measured per-shard commit cost (a) and driver bytes per part (d)."""
    ms_per_shard = list(commit["ms_per_shard"].values())[-1]
    commits_per_round = commit["commits"] / commit["rounds"]
    fragment_bytes = ROWS_PER_SHARD * BYTES_PER_ROW
    requests_per_shard = 2 * (-(-fragment_bytes // MULTIPART_BYTES) + 2)  # images + rejected file, multipart
    rows = []
    for name, images in COLLECTIONS.items():
        shards = -(-images // ROWS_PER_SHARD)
        for nodes in NODE_COUNTS:
            images_per_second = nodes * GPUS_PER_NODE * IMAGES_PER_GPU_SECOND
            shards_per_second = images_per_second / ROWS_PER_SHARD
            rounds_per_second = shards_per_second / commit["commit_shards"]
            rows.append(
                {
                    "collection": name,
                    "nodes": nodes,
                    "shards": shards,
                    "hours": images / images_per_second / 3600,
                    "shards_per_second": shards_per_second,
                    "commits_per_second": rounds_per_second * commits_per_round,
                    "driver_busy_share": shards_per_second * ms_per_shard / 1e3,
                    "driver_bytes_per_second": shards_per_second * (bytes_per_part or 0.0),
                    "manifest_states": shards,
                    "s3_requests_per_second": rounds_per_second * commits_per_round * REQUESTS_PER_COMMIT
                    + shards_per_second * requests_per_shard,
                }
            )
    return {
        "measured": {
            "driver_ms_per_shard": ms_per_shard,
            "commits_per_round": commits_per_round,
            "driver_bytes_per_part": bytes_per_part,
        },
        "assumptions": [
            f"ASSUMPTION: shards of {ROWS_PER_SHARD:,} images (img2dataset's default), one row group each",
            f"ASSUMPTION: {GPUS_PER_NODE} GPUs per node at {IMAGES_PER_GPU_SECOND:.0f} images/s each "
            "(ViT-L-14 "
            "312 images/s per A100 at full depth, clip-retrieval's figure, times the ~3x the shipped routes "
            "give on this machine's CPU), encoder-bound, scaling linearly",
            "ASSUMPTION: the driver's cost per shard measured with 20-row shards holds for 10,000-row shards "
            "(it commits metadata: one fragment per part either way)",
            f"ASSUMPTION: {REQUESTS_PER_COMMIT} object-store requests per Lance commit; fragment files of "
            f"{BYTES_PER_ROW:,} bytes per row, written in {MULTIPART_BYTES >> 20} MiB multipart parts",
        ],
        "rows": rows,
    }


def _optional_lines(result: dict[str, Any]) -> list[str]:
    """(c), (d) and (e), where the run measured them."""
    lines = []
    if c := result.get("many_small_shards"):
        small, large = c["shard_sizes"][1], c["shard_sizes"][0]
        rates = c["images_per_second"]
        lines.append(
            f"- (c) `icar index` on {c['images']:,} images: shards of {small} at "
            f"{', '.join(f'{r:.1f}' for r in rates[str(small)])} images/s vs shards of {large} at "
            f"{', '.join(f'{r:.1f}' for r in rates[str(large)])}: **{c['share']:.0%}** (median of alternated "
            f"pairs; {c['note']})"
        )
    if d := result.get("two_nodes_on_s3"):
        lines.append(
            f"- (d) two Ray nodes -> moto S3, {d['images']:,} images in {d['shards']} shards: "
            f"{d['rows']} rows, {d['distinct_ids']} distinct ids (every id once: {d['every_id_once']}); "
            f"driver received {d['driver_received']}; {d['seconds']:.1f} s"
        )
    if e := result.get("routed_vs_full"):
        secs = e["seconds"]
        lines.append(
            f"- (e) `icar index` end to end on {e['images']:,} images in {e['shards']} shards: "
            f"shipped routes "
            f"{', '.join(f'{x:.0f}' for x in secs['routed'])} s vs full depth "
            f"{', '.join(f'{x:.0f}' for x in secs['full depth'])} s: **{e['speedup']:.2f}x** ({e['note']})"
        )
    return lines


def _projection_lines(p: dict[str, Any]) -> list[str]:
    return [
        "",
        "## Projection: the write path for LAION on N GPU nodes",
        "",
        "Computed from (a) and (d); the rest are assumptions:",
        "",
        *[f"- {a}" for a in p["assumptions"]],
        "",
        "| collection | GPU nodes | shards | hours | shards/s | Lance commits/s | driver busy | driver in | "
        "manifest states | S3 requests/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {r['collection']} | {r['nodes']} | {r['shards']:,} | {r['hours']:.1f} | "
            f"{r['shards_per_second']:.1f} "
            f"| {r['commits_per_second']:.2f} | {r['driver_busy_share']:.2%} | "
            f"{r['driver_bytes_per_second'] / 1e3:.1f} kB/s | {r['manifest_states']:,} | "
            f"{r['s3_requests_per_second']:.0f} |"
            for r in p["rows"]
        ],
    ]


def markdown(result: dict[str, Any]) -> str:
    """scale.json as the report `make bench-scale` writes and the README shows."""
    a, b = result["commit_path"], result["manifest_startup"]
    early, late = a["ms_per_shard"].items()
    lines = [
        f"# Write path at scale ({result['utc']}, {result['machine']})",
        "",
        f"- (a) commit path, {a['shards']:,} shards of {a['rows_per_shard']} rows, "
        f"{a['commit_shards']} shards per round, compaction every {a['compact_fragments']} fragments: "
        f"driver ms per shard {early[1]:.2f} "
        f"(shards {early[0]}) -> {late[1]:.2f} (shards {late[0]}), growth **{a['growth']:.2f}x** "
        f"(driver CPU ms per shard {' -> '.join(f'{v:.2f}' for v in a['cpu_ms_per_shard'].values())}, "
        f"{a['cpu_growth']:.2f}x); "
        f"{a['rounds']} rounds, {a['commits']} Lance commits, {a['compactions']} compactions, "
        f"{a['seconds_committing']:.1f} s committing in all",
        f"- (b) open + fence + read a manifest of {b['shards']:,} shards: "
        f"{b['open_fence_read_seconds']:.2f} s",
        *_optional_lines(result),
        *_projection_lines(result["projection"]),
    ]
    return "\n".join(lines) + "\n"
