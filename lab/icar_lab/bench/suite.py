"""The benchmark suite at a named size: builds each measurement's inputs, runs the measurements in
order, and hands the results to the report. Sizes are the only difference between tiny (tests), quick
and full; the code path is the same."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icar_lab.bench import encoder as enc
from icar_lab.bench import machine, pipeline_run, report, router, serve_load
from icar_lab.catalogue import bench_routes, router_key, spec_key, unique
from icar_lab.heldout import load_heldout
from icar_lab.scenes.splits import TEST
from icar_lab.speed import EncoderCase, measure_encoder, route_images
from pipeline.config import ModelConfig, RouterConfig, RouteSpec, load_config
from pipeline.encode.heads import ExitHeads
from pipeline.encode.model import load_model, resolve_heads
from pipeline.encode.routed import RoutedEncoder
from pipeline.score import load_scorer

SPEED_EXITS = [6, 8]  # exits timed on every model (untrained heads stand in where none are shipped)
UNTRAINED_HEADS = f"untrained ExitHeads(visual, {SPEED_EXITS}): exit points measure speed only, not quality"


@dataclass(frozen=True)
class Sizes:
    embedded_images: int
    embedded_batch: int
    rounds: int
    random_models: tuple[tuple[str, int, int], ...]  # (open_clip name, images, batch size)
    random_rounds: int
    matmul_size: int
    matmul_repeats: int
    pipeline_images: int
    shard_size: int
    pipeline_encoder_images: int
    router_images: int
    query_rows: int
    query_count: int
    flat_queries: int
    serve_clients: int
    serve_seconds: float


SIZES = {
    "tiny": Sizes(
        embedded_images=8, embedded_batch=8, rounds=1,
        random_models=(("ViT-B-32", 2, 2), ("ViT-B-16", 2, 2)), random_rounds=1,
        matmul_size=256, matmul_repeats=2,
        pipeline_images=48, shard_size=16, pipeline_encoder_images=16, router_images=8,
        query_rows=2000, query_count=20, flat_queries=2, serve_clients=2, serve_seconds=2,
    ),
    "quick": Sizes(
        embedded_images=64, embedded_batch=64, rounds=3,
        random_models=(("ViT-B-32", 16, 16), ("ViT-B-16", 4, 4)), random_rounds=2,
        matmul_size=2048, matmul_repeats=3,
        pipeline_images=1000, shard_size=100, pipeline_encoder_images=256, router_images=64,
        query_rows=100_000, query_count=100, flat_queries=3, serve_clients=4, serve_seconds=10,
    ),
    "full": Sizes(
        embedded_images=384, embedded_batch=64, rounds=5,
        random_models=(("ViT-B-32", 64, 32), ("ViT-B-16", 16, 16)), random_rounds=3,
        matmul_size=3072, matmul_repeats=5,
        pipeline_images=4000, shard_size=200, pipeline_encoder_images=512, router_images=384,
        query_rows=1_000_000, query_count=200, flat_queries=5, serve_clients=4, serve_seconds=30,
    ),
}  # fmt: skip


def embedded_case(sizes: Sizes, router_cfg: RouterConfig | None, extra: list[RouteSpec]) -> EncoderCase:
    """The embedded model with its shipped heads (untrained stand-ins if none) and calibrated router,
    at the bench's points plus `extra` (the frontier's), those the heads can serve."""
    cfg = ModelConfig()
    loaded = load_model(cfg)
    heads_path = resolve_heads(cfg)
    if heads_path:
        heads, note = ExitHeads.load(heads_path, loaded.model.visual), f"trained ({Path(heads_path).name})"
    else:
        heads, note = ExitHeads(loaded.model.visual, SPEED_EXITS), UNTRAINED_HEADS
    if router_cfg is not None:
        try:
            RoutedEncoder(loaded, router_cfg.routes, heads)
        except ValueError as exc:  # a route the available heads cannot serve
            note += f"; calibrated router skipped: {exc}"
            router_cfg = None
    heldout = load_heldout(TEST, sizes.embedded_images, loaded.image_size)  # the frontier's first scenes
    routes = unique([*bench_routes(SPEED_EXITS), *extra])
    served = [r for r in routes if r.exit_depth in (None, *heads.depths)]
    return EncoderCase(
        model_name=cfg.name,
        loaded=loaded,
        heads=heads,
        heads_note=note,
        images=heldout.images,
        bytes_per_pixel=heldout.bytes_per_pixel,
        batch_size=sizes.embedded_batch,
        routes=[r for r in served if not r.tuned or heads.tail(r) is not None],
        router=router_cfg,
    )


def random_case(name: str, images: int, batch: int, extra: list[RouteSpec]) -> EncoderCase:
    """A standard open_clip architecture with random weights, at the bench's points plus `extra` (the
    shipped routes: the same schedule on more tokens): speed only, no quality is claimed."""
    torch.manual_seed(0)
    loaded = load_model(ModelConfig(name=name), pretrained=False)
    heldout = load_heldout(TEST, images, loaded.image_size)
    return EncoderCase(
        model_name=name,
        loaded=loaded,
        heads=ExitHeads(loaded.model.visual, SPEED_EXITS),
        heads_note=UNTRAINED_HEADS,
        images=heldout.images,
        bytes_per_pixel=heldout.bytes_per_pixel,
        batch_size=batch,
        # a tuned route needs a trained tail; its untuned twin has the same FLOPs
        routes=unique([*bench_routes(SPEED_EXITS), *(r for r in extra if not (r.exit_depth or r.tuned))]),
        weights="random (open_clip.create_model, no pretrained tag)",
    )


def isolated_query(workdir: Path, sizes: Sizes) -> dict[str, Any]:
    """The query section in a fresh interpreter (see `query.main` for why), its JSON read back."""
    out = workdir / "query.json"
    command = [sys.executable, "-m", "icar_lab.bench.query", "--workdir", str(workdir)]
    command += ["--rows", str(sizes.query_rows), "--queries", str(sizes.query_count)]
    command += ["--flat-queries", str(sizes.flat_queries), "--out", str(out)]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def run_suite(
    mode: str,
    out_dir: Path,
    threads: int | None = None,
    routed_config: Path | None = None,
    frontier: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every section at `mode`'s size; write <UTC>.json, latest.json, latest.md and plots to out_dir.

    `routed_config`: a routes YAML (default: the embedded model's shipped router); `frontier`: the JSON of
    jobs/frontier.py that gives the embedded model's quality per point (none: speed only)."""
    saved_threads = torch.get_num_threads()
    try:
        return _run(
            SIZES[mode], mode, Path(out_dir), threads or os.cpu_count() or 1, routed_config, frontier, log
        )
    finally:
        torch.set_num_threads(saved_threads)  # callers (tests) keep their own thread count


def embedded_encoder(
    sizes: Sizes, shipped: RouterConfig, frontier: Path | None
) -> tuple[dict[str, Any], EncoderCase]:
    """The embedded model's speed per point, with the frontier's quality of each (section 1), and the case
    it was timed on."""
    quality = enc.frontier_quality(frontier, resolve_heads(ModelConfig()))
    case = embedded_case(sizes, shipped, quality["routes"])
    embedded = measure_encoder(case, sizes.rounds)
    if case.heads_note.startswith(UNTRAINED_HEADS):  # the frontier's exit quality belongs to trained heads
        stale = {spec_key(r) for r in case.routes if r.exit_depth}
        stale |= {router_key(case.router)} if case.router else set()
        quality["points"] = {k: v for k, v in quality["points"].items() if k not in stale}
    enc.attach_quality(embedded, quality)
    return embedded, case


def router_cost(case: EncoderCase, images: int) -> dict[str, Any]:
    """Section 4: the embedded case's router (the handcrafted scorer in front of full depth when it has
    none) against the encoder it feeds, on its first `images` images."""
    pixels, bpp = case.images[:images], case.bytes_per_pixel[:images]
    if case.router:
        job_encoder = RoutedEncoder(case.loaded, case.router.routes, case.heads)
        ids = route_images(case.router, pixels, bpp)
    else:
        job_encoder = RoutedEncoder(case.loaded, [RouteSpec(name="full")], case.heads)
        ids = np.zeros(len(pixels), np.int32)
    spec = case.router.scorer if case.router else "handcrafted"
    return router.measure_router(pixels, bpp, load_scorer(spec), job_encoder, ids) | {"scorer": spec}


class SectionClock:
    """Seconds per section, each counted from the end of the one before."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, section: str) -> None:
        now = time.perf_counter()
        self.seconds[section] = now - self._last
        self._last = now


def host(threads: int) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
    }


def _run(
    sizes: Sizes,
    mode: str,
    out_dir: Path,
    threads: int,
    routed_config: Path | None,
    frontier: Path | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The sections in the order they run (numbered as the report shows them), then the report."""
    torch.set_num_threads(threads)
    started, started_utc = time.perf_counter(), datetime.now(UTC)
    result: dict[str, Any] = {
        "mode": mode,
        "sizes": asdict(sizes),
        "started_utc": started_utc.isoformat(timespec="seconds"),
        "host": host(threads),
    }
    clock, shipped = SectionClock(), load_config(routed_config).router
    log("[1/6] encoder speed: embedded model")
    embedded, case = embedded_encoder(sizes, shipped, frontier)
    result["encoder"] = [embedded]
    for name, images, batch in sizes.random_models:
        log(f"[1/6] encoder speed: {name} (random weights)")
        model_case = random_case(name, images, batch, shipped.routes)
        result["encoder"].append(measure_encoder(model_case, sizes.random_rounds))
    clock.done("encoder")
    log("[2/6] machine limit: fp32 matmul peak")
    result["machine"] = machine.matmul_peak(sizes.matmul_size, sizes.matmul_repeats)
    machine.attach_achieved(result["encoder"], result["machine"]["peak_gflops"])
    clock.done("machine")
    log("[4/6] router cost")  # before the pipeline, while the embedded model and images are loaded
    result["router"] = router_cost(case, sizes.router_images)
    clock.done("router")
    with tempfile.TemporaryDirectory(prefix="icar-bench-") as tmp:
        _job_sections(result, sizes, Path(tmp), routed_config, threads, clock, log)
    result["host"]["load_average_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - started
    result["section_seconds"] = clock.seconds
    result["answers"] = report.answers(result)
    report.write(result, out_dir, started_utc)
    return result


def _job_sections(
    result: dict[str, Any],
    sizes: Sizes,
    tmp: Path,
    routed_config: Path | None,
    threads: int,
    clock: SectionClock,
    log: Callable[[str], None],
) -> None:
    """Sections 3, 6 and 5: the Ray job, serving the table it wrote, queries (own process)."""
    log("[3/6] pipeline efficiency: run_index on local Ray")
    result["pipeline"] = pipeline_run.measure_pipeline(
        tmp / "pipeline",
        sizes.pipeline_images,
        sizes.shard_size,
        routed_config,
        num_cpus=2,
        encoder_images=sizes.pipeline_encoder_images,
        rounds=max(1, sizes.rounds - 2),
        log=log,
    )
    torch.set_num_threads(threads)
    clock.done("pipeline")
    log(f"[6/6] serve: {sizes.serve_clients} clients x {sizes.serve_seconds:g} s, then the abuse cases")
    result["serve"] = serve_load.measure_serve(tmp / "pipeline", sizes.serve_clients, sizes.serve_seconds)
    clock.done("serve")
    log(f"[5/6] query: {sizes.query_rows:,} rows x 512-d, float32 and float16 (own process)")
    result["query"] = isolated_query(tmp / "query", sizes)
    clock.done("query")
