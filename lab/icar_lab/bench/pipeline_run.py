"""Pipeline efficiency: the whole Ray job (`run_index`) against the bound the machine's cores allow.

On a CPU-only box decoding and encoding share the cores, so the job can at best run at
    bound = cores / (prepare CPU s/image + encode CPU s/image),
both costs measured alone on one core, on the same images, exactly as the job prepares and encodes them.
The job's rate is reported as a share of that bound. Three rates are kept apart, because on a small
corpus they differ a lot:
- Ray start-up, timed on its own when this module starts Ray;
- end to end: rows / `run_index` seconds (shard listing, actor start-up and model load, pipeline fill);
- steady state: the extra rows / the extra seconds of a run on twice the images, which cancels start-up
  and the drain at the end whatever the task sizes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from icar_lab.scenes.shards import write_corpus
from icar_lab.timing import alternate
from pipeline.cluster import init_ray
from pipeline.config import IndexConfig, load_config
from pipeline.encode.model import model_preprocess
from pipeline.encode.routed import RoutedEncoder
from pipeline.job import run_index
from pipeline.prepare import OK, prepare_unit, work_unit
from pipeline.read import inspect_shard, list_shards
from pipeline.stream import encoder_actors
from pipeline.summary import RunSummary


def steady_rate(short: RunSummary, long: RunSummary) -> tuple[float | None, str]:
    """Rows/s of the work a longer run did beyond a shorter one: start-up (actors, model loads) and the
    drain at the end cost both runs alike and cancel, however the job bundles its tasks."""
    rows, seconds = long.rows_ok - short.rows_ok, long.seconds - short.seconds
    if rows <= 0 or seconds <= 0:
        return None, f"{rows} more rows in {seconds:.1f} s more: no steady-state rate"
    return rows / seconds, (
        f"{rows} more rows in {seconds:.1f} s more (a run of {long.rows_ok} images against one of "
        f"{short.rows_ok}: start-up and drain cancel)"
    )


def bench_config(paths: list[str], output: Path, routed_config: Path | None, num_cpus: int) -> IndexConfig:
    """The default job (the embedded model and its shipped routes), or `routed_config`, on the shards."""
    overrides = [
        f"input.paths={json.dumps(paths)}",
        f"output.uri={output}",
        f"ray.num_cpus={num_cpus}",
    ]
    return load_config(routed_config, overrides)


def prepare_alone(cfg: IndexConfig) -> tuple[float, np.ndarray, np.ndarray]:
    """Read, decode, score and route every corpus row group exactly as the job does, on this thread.

    Returns the CPU seconds per image and the prepared images with their route ids."""
    preprocess = model_preprocess(cfg.model)
    cfg_dict = cfg.model_dump()
    images, routes, rows, cpu = [], [], 0, 0.0
    for shard in list_shards(cfg.input):
        plan = inspect_shard(shard, cfg.input)
        for row_group in range(plan.row_groups):
            unit = {k: np.asarray([v]) for k, v in work_unit(plan, row_group).items()}
            started = time.thread_time()
            chunks = list(prepare_unit(unit, cfg_dict, preprocess))
            cpu += time.thread_time() - started
            for chunk in chunks:
                ok = chunk["outcome"] == OK
                images.append(chunk["image"][ok])
                routes.append(chunk["route"][ok])
                rows += len(ok)
    return cpu / max(rows, 1), np.concatenate(images), np.concatenate(routes)


def encode_alone(cfg: IndexConfig, images: np.ndarray, route_ids: np.ndarray, rounds: int) -> float:
    """CPU seconds per image of the job's encoder on one thread, in the job's batch size (median round)."""
    encoder = RoutedEncoder.from_config(cfg.model, cfg.router.routes)
    size = cfg.encoder.batch_size
    batches = [(images[i : i + size], route_ids[i : i + size]) for i in range(0, len(images), size)]
    saved = torch.get_num_threads()
    cpu: list[float] = []

    def run() -> None:
        started = time.thread_time()
        for pixels, ids in batches:
            encoder.encode(pixels, ids)
        cpu.append(time.thread_time() - started)

    torch.set_num_threads(1)
    try:
        alternate({"encode": run}, rounds)
    finally:
        torch.set_num_threads(saved)
    return float(np.median(cpu[1:])) / len(images)  # cpu[0] is the warm-up call


@dataclass
class JobRuns:
    """What the Ray runs gave: the first run's summary, the steady-state rate, Ray's start-up."""

    summary: RunSummary
    steady: float | None
    steady_note: str
    ray_start_s: float | None  # None: Ray was already running
    actors: int


def run_jobs(cfg: IndexConfig, again: IndexConfig, double: IndexConfig) -> JobRuns:
    """`cfg` once on a fresh Ray (Ray Data's own actors start in this run only: the end-to-end rate), then
    `again` and `double` (twice the images), both on the warm Ray: their difference is the steady state."""
    ray_start_s = None
    started_here = not ray.is_initialized()
    if started_here:
        t0 = time.perf_counter()
        init_ray(cfg)
        ray_start_s = time.perf_counter() - t0
    try:
        actors = encoder_actors(cfg)
        summary = run_index(cfg)
        steady, steady_note = steady_rate(run_index(again), run_index(double))
    finally:
        if started_here:
            ray.shutdown()
    return JobRuns(summary, steady, steady_note, ray_start_s, actors)


def measure_pipeline(
    workdir: Path,
    images: int,
    shard_size: int,
    routed_config: Path | None,
    num_cpus: int = 2,
    encoder_images: int = 512,
    rounds: int = 3,
    log=print,
) -> dict[str, Any]:
    """Index a generated scene corpus with local Ray; again, and twice as many images (the difference of
    those two, both started on a warm Ray, is the steady state); then measure the bound on its images."""
    corpus = workdir / "corpus"
    write_corpus(corpus, seed=1, split="bench", num_images=2 * images, shard_size=shard_size)
    shards = sorted(str(p) for p in corpus.glob("*.parquet"))
    cfg = bench_config(shards[: len(shards) // 2], workdir / "lancedb", routed_config, num_cpus)
    again = bench_config(shards[: len(shards) // 2], workdir / "lancedb-again", routed_config, num_cpus)
    double = bench_config(shards, workdir / "lancedb-double", routed_config, num_cpus)
    runs = run_jobs(cfg, again, double)
    summary = runs.summary
    log(f"  [pipeline] {summary.rows_ok} rows in {summary.seconds:.1f} s; steady {runs.steady_note}")
    prepare_cpu, pixels, route_ids = prepare_alone(cfg)
    encode_cpu = encode_alone(cfg, pixels[:encoder_images], route_ids[:encoder_images], rounds)
    bound = num_cpus / (prepare_cpu + encode_cpu)
    busy = {k[2:]: v for k, v in summary.stage_seconds.items()} | {"commit": summary.commit_seconds}
    return {
        "images": images,
        "shards": summary.shards_committed,
        "num_cpus": num_cpus,
        "config": str(routed_config) if routed_config else "defaults (shipped routes)",
        "encoder": {
            "actors": runs.actors,
            "cpus_per_actor": cfg.encoder.cpus_per_actor,
            "batch_size": cfg.encoder.batch_size,
        },
        "routes": dict(summary.routes),
        "ray_start_s": runs.ray_start_s,
        "run_seconds": summary.seconds,
        "end_to_end_images_per_second": summary.images_per_second,
        "steady_images_per_second": runs.steady,
        "steady_note": runs.steady_note,
        "reported_rate": "steady" if runs.steady else "end_to_end",
        "cpu_ms_per_image": {"prepare": 1e3 * prepare_cpu, "encode": 1e3 * encode_cpu},
        "bound_images_per_second": bound,
        "share_of_bound": (runs.steady or summary.images_per_second) / bound,
        # inside the job, summed over all workers
        "busy_ms_per_image": {k: 1e3 * v / max(summary.rows_ok, 1) for k, v in busy.items()},
    }
