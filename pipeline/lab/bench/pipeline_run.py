"""Pipeline efficiency: the whole Ray job (`run_index`) against the encoder alone on the same images.

Three rates are kept apart, because on a small corpus they differ a lot:
- Ray start-up (`ray.init`), timed on its own when this module starts Ray;
- end to end: rows / `run_index` seconds (shard listing, actor start-up and model load, pipeline fill);
- steady state: rows committed between the first and the last shard commit / the time between them,
  which excludes start-up and the first shard's fill.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from pipeline.config import IndexConfig, load_config
from pipeline.decode import decode_image
from pipeline.encode.heads import ExitHeads
from pipeline.encode.model import load_model, resolve_heads
from pipeline.encode.routed import RoutedEncoder
from pipeline.job import RunSummary, run_index
from pipeline.lab.scenes.shards import write_corpus
from pipeline.lab.timing import alternate, throughput
from pipeline.route import assign_routes
from pipeline.score import complexity_features, load_scorer

_PROGRESS = re.compile(r"\| (\d+) images in")
MIN_STEADY_COMMITS = 4
MIN_STEADY_SPAN_S = 1.0


def steady_rate(commits: list[tuple[float, int]]) -> tuple[float | None, str]:
    """Rows/s from the first to the last shard commit (start-up and the first shard's fill excluded).

    Given only when enough shards commit over enough time; a burst of commits at the end of a tiny run
    would divide by noise."""
    if len(commits) < MIN_STEADY_COMMITS:
        return None, f"{len(commits)} shard commits: too few for a steady-state rate"
    (t_first, n_first), (t_last, n_last) = commits[0], commits[-1]
    if t_last - t_first < MIN_STEADY_SPAN_S:
        return None, f"shard commits span only {t_last - t_first:.2f} s: too bursty for a rate"
    return (n_last - n_first) / (t_last - t_first), (
        f"{n_last - n_first} rows committed after the first shard in the {t_last - t_first:.1f} s from "
        f"first to last of {len(commits)} shard commits"
    )


def bench_config(corpus: Path, output: Path, routed_config: Path | None, num_cpus: int) -> IndexConfig:
    """The demo's configuration (calibrated router if present) pointed at the bench corpus."""
    overrides = [
        f"input.paths={json.dumps([str(corpus)])}",
        f"output.uri={output}",
        f"ray.num_cpus={num_cpus}",
    ]
    return load_config(routed_config if routed_config and routed_config.exists() else None, overrides)


def stage_breakdown(summary: RunSummary, cfg: IndexConfig, num_cpus: int) -> dict[str, Any]:
    """Busy seconds per stage, grouped by the resource that runs them; the bottleneck is the resource
    with the lowest capacity (slots / busy seconds per image: the rate it could sustain on its own).

    read/decode/score share the prepare tasks' CPUs, encode the actor pool, write the driver."""
    busy = {k[2:]: v for k, v in summary.stage_seconds.items()} | {"write": summary.write_seconds}
    prepare_slots = max(1.0, num_cpus - cfg.encoder.actors * cfg.encoder.cpus_per_actor)
    resources = {
        "prepare tasks (read+decode+score)": (("read", "decode", "score"), prepare_slots),
        "encoder actors (encode)": (("encode",), float(cfg.encoder.actors)),
        "driver (write)": (("write",), 1.0),
    }
    rows = max(summary.rows_ok, 1)
    wall = max(summary.seconds, 1e-9)
    table = {}
    for name, (stages, slots) in resources.items():
        seconds = sum(busy[s] for s in stages)
        table[name] = {
            "stages": list(stages),
            "slots": slots,
            "busy_s": seconds,
            "capacity_images_per_second": slots * rows / max(seconds, 1e-9),
            "busy_share_of_run": seconds / slots / wall,  # the run includes start-up, so this is low
        }
    limiting = min(table, key=lambda k: table[k]["capacity_images_per_second"])
    heaviest = max(table[limiting]["stages"], key=lambda s: busy[s])
    return {
        "busy_seconds": busy,
        "ms_per_image": {k: 1e3 * v / rows for k, v in busy.items()},
        "resources": table,
        "bottleneck": {
            "resource": limiting,
            "stage": heaviest,
            "capacity_images_per_second": table[limiting]["capacity_images_per_second"],
        },
    }


def corpus_pixels(corpus: Path, cfg: IndexConfig, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every corpus image decoded exactly as the job decodes it, and its route from the job's router."""
    images, bpp = [], []
    for path in sorted(corpus.glob("*.parquet")):
        for data in pq.read_table(path, columns=["jpg"]).column("jpg").to_pylist():
            pixels, (w, h) = decode_image(data, image_size, cfg.decode.max_pixels, cfg.decode.use_draft)
            images.append(pixels)
            bpp.append(len(data) / (w * h))
    stack, bytes_per_pixel = np.stack(images), np.asarray(bpp, np.float32)
    scores = load_scorer(cfg.router.scorer)(complexity_features(stack, bytes_per_pixel))
    return stack, assign_routes(scores, cfg.router)


def job_encoder(cfg: IndexConfig) -> RoutedEncoder:
    """The encoder an actor of this job holds (same model, heads and routes)."""
    heads_path = resolve_heads(cfg.model)
    loaded = load_model(cfg.model)
    heads = ExitHeads.load(heads_path, loaded.model.visual) if heads_path else None
    return RoutedEncoder(loaded, cfg.router.routes, heads)


def encoder_alone(
    encoder: RoutedEncoder,
    batch_size: int,
    images: np.ndarray,
    route_ids: np.ndarray,
    thread_counts: list[int],
    rounds: int,
) -> dict[str, Any]:
    """The job's encoder outside Ray on the job's batch size, at each thread count, timed alternately."""
    size = batch_size
    batches = [(images[i : i + size], route_ids[i : i + size]) for i in range(0, len(images), size)]
    saved = torch.get_num_threads()

    def at(threads: int):
        def run() -> None:
            torch.set_num_threads(threads)
            for pixels, ids in batches:
                encoder.encode(pixels, ids)

        return run

    try:
        seconds = alternate({f"{t} threads": at(t) for t in thread_counts}, rounds)
    finally:
        torch.set_num_threads(saved)
    return {name: throughput(s, len(images)) for name, s in seconds.items()}


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
    """Index a generated scene corpus with local Ray, then time the encoder alone on its images."""
    corpus = workdir / "corpus"
    write_corpus(corpus, seed=1, split="bench", num_images=images, shard_size=shard_size)
    cfg = bench_config(corpus, workdir / "lancedb", routed_config, num_cpus)

    ray_start_s = None
    started_here = not ray.is_initialized()
    if started_here:
        t0 = time.perf_counter()
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
        ray_start_s = time.perf_counter() - t0
    commits: list[tuple[float, int]] = []

    def progress(message: str) -> None:
        match = _PROGRESS.search(message)
        if match:
            commits.append((time.perf_counter(), int(match.group(1))))
        log(f"  [pipeline] {message}")

    try:
        summary = run_index(cfg, log=progress)
    finally:
        if started_here:
            ray.shutdown()
    steady, steady_note = steady_rate(commits)

    threads = cfg.encoder.torch_threads or max(1, int(cfg.encoder.cpus_per_actor))
    encoder = job_encoder(cfg)
    pixels, route_ids = corpus_pixels(corpus, cfg, encoder.loaded.image_size)
    n = encoder_images
    counts = sorted({threads, num_cpus})
    alone = encoder_alone(encoder, cfg.encoder.batch_size, pixels[:n], route_ids[:n], counts, rounds)
    machine_budget = alone[f"{num_cpus} threads"]["median"]
    reported = steady or summary.images_per_second
    return {
        "images": images,
        "shards": summary.shards_committed,
        "num_cpus": num_cpus,
        "config": str(routed_config) if routed_config and routed_config.exists() else "defaults (full route)",
        "encoder": {
            "actors": cfg.encoder.actors,
            "cpus_per_actor": cfg.encoder.cpus_per_actor,
            "threads": threads,
        },
        "routes": dict(summary.routes),
        "ray_start_s": ray_start_s,
        "run_seconds": summary.seconds,
        "end_to_end_images_per_second": summary.images_per_second,
        "steady_images_per_second": steady,
        "steady_note": steady_note,
        "reported_rate": "steady" if steady else "end_to_end",
        "encoder_alone_images_per_second": alone,
        "fraction_of_encoder": reported / machine_budget,
        "fraction_of_encoder_at_actor_threads": reported / alone[f"{threads} threads"]["median"],
        "stages": stage_breakdown(summary, cfg, num_cpus),
    }
