"""Pipeline efficiency: the whole Ray job (`run_index`) against the bound the machine's cores allow.

On a CPU-only box decoding and encoding share the cores, so the job can at best run at
    bound = cores / (prepare CPU s/image + encode CPU s/image),
both costs measured alone on one core, on the same images, exactly as the job prepares and encodes them.
The job's rate is reported as a share of that bound. Three rates are kept apart, because on a small
corpus they differ a lot:
- Ray start-up, timed on its own when this module starts Ray;
- end to end: rows / `run_index` seconds (shard listing, actor start-up and model load, pipeline fill);
- steady state: rows committed between the first and the last shard commit / the time between them,
  which excludes start-up and the first shard's fill.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from pipeline.cluster import init_ray
from pipeline.config import IndexConfig, load_config
from pipeline.encode.model import model_preprocess
from pipeline.encode.routed import RoutedEncoder
from pipeline.job import run_index
from pipeline.lab.scenes.shards import write_corpus
from pipeline.lab.timing import alternate
from pipeline.prepare import OK, prepare_unit, work_unit
from pipeline.read import inspect_shard, list_shards
from pipeline.stream import encoder_actors

MIN_STEADY_COMMITS = 4
MIN_STEADY_SPAN_S = 1.0


def steady_rate(commits: list[tuple[float, int]]) -> tuple[float | None, str]:
    """Rows/s from the first to the last shard written (start-up and the first shard's fill excluded).

    Given only when enough shards commit over enough time; a burst of commits at the end of a tiny run
    would divide by noise."""
    if len(commits) < MIN_STEADY_COMMITS:
        return None, f"{len(commits)} shards written: too few for a steady-state rate"
    (t_first, n_first), (t_last, n_last) = commits[0], commits[-1]
    if t_last - t_first < MIN_STEADY_SPAN_S:
        return None, f"shards written span only {t_last - t_first:.2f} s: too bursty for a rate"
    return (n_last - n_first) / (t_last - t_first), (
        f"{n_last - n_first} rows written after the first shard in the {t_last - t_first:.1f} s from "
        f"first to last of {len(commits)} shards written"
    )


def bench_config(corpus: Path, output: Path, routed_config: Path | None, num_cpus: int) -> IndexConfig:
    """The default job (the embedded model and its shipped routes), or `routed_config`, on the corpus."""
    overrides = [
        f"input.paths={json.dumps([str(corpus)])}",
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
    """Index a generated scene corpus with local Ray, then measure the bound on the same images."""
    corpus = workdir / "corpus"
    write_corpus(corpus, seed=1, split="bench", num_images=images, shard_size=shard_size)
    cfg = bench_config(corpus, workdir / "lancedb", routed_config, num_cpus)

    ray_start_s = None
    started_here = not ray.is_initialized()
    if started_here:
        t0 = time.perf_counter()
        init_ray(cfg)
        ray_start_s = time.perf_counter() - t0
    try:
        actors = encoder_actors(cfg)
        summary = run_index(cfg)
    finally:
        if started_here:
            ray.shutdown()
    steady, steady_note = steady_rate(summary.written)
    log(f"  [pipeline] {summary.rows_ok} rows in {summary.seconds:.1f} s; steady {steady_note}")

    prepare_cpu, pixels, route_ids = prepare_alone(cfg)
    encode_cpu = encode_alone(cfg, pixels[:encoder_images], route_ids[:encoder_images], rounds)
    bound = num_cpus / (prepare_cpu + encode_cpu)
    reported = steady or summary.images_per_second
    rows = max(summary.rows_ok, 1)
    busy = {k[2:]: v for k, v in summary.stage_seconds.items()} | {"commit": summary.commit_seconds}
    return {
        "images": images,
        "shards": summary.shards_committed,
        "num_cpus": num_cpus,
        "config": str(routed_config) if routed_config else "defaults (shipped routes)",
        "encoder": {
            "actors": actors,
            "cpus_per_actor": cfg.encoder.cpus_per_actor,
            "batch_size": cfg.encoder.batch_size,
        },
        "routes": dict(summary.routes),
        "ray_start_s": ray_start_s,
        "run_seconds": summary.seconds,
        "end_to_end_images_per_second": summary.images_per_second,
        "steady_images_per_second": steady,
        "steady_note": steady_note,
        "reported_rate": "steady" if steady else "end_to_end",
        "cpu_ms_per_image": {"prepare": 1e3 * prepare_cpu, "encode": 1e3 * encode_cpu},
        "bound_images_per_second": bound,
        "share_of_bound": reported / bound,
        "busy_ms_per_image": {k: 1e3 * v / rows for k, v in busy.items()},  # inside the job, all workers
    }
