"""Encoder speed: open_clip `encode_image` at full depth against the adaptive encoder at each operating
point, timed alternately (A B C … A B C …) in one process on the same images and threads, so background
load hits every candidate alike and the speed ratios stay meaningful on a shared machine."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from pipeline.config import RouterConfig, RouteSpec
from pipeline.encode.flops import full_depth_gflops
from pipeline.encode.heads import ExitHeads
from pipeline.encode.model import LoadedModel, normalize_uint8
from pipeline.encode.routed import RoutedEncoder
from pipeline.lab.calibrate import schedule_route
from pipeline.lab.timing import alternate, throughput
from pipeline.route import assign_routes
from pipeline.score import complexity_features, load_scorer

BASELINE = "open_clip encode_image"
FULL_ROUTE = "full"  # the adaptive forward at full depth: its ratio to BASELINE is implementation alone
EQUAL_QUALITY_R10_DROP = 0.01  # "equal quality": text->image R@10 at most 1 point (absolute) below full


_POINT_NAME = re.compile(
    r"^(?:(?P<full>full)|exit(?P<exit>\d+)|tome(?P<tome>\d+)|tome-keep(?P<keep>\d+)-floor(?P<floor>\d+)"
    r"|energy(?P<energy>[\d.]+))$"
)


def route_from_name(name: str) -> RouteSpec | None:
    """The fixed route behind a jobs/frontier.py point name (full, exit6, tome4, tome-keep70-floor16,
    energy99.5), else None."""
    match = _POINT_NAME.match(name)
    if match is None:
        return None
    if match["exit"]:
        return RouteSpec(name=name, exit_depth=int(match["exit"]))
    if match["tome"]:
        return RouteSpec(name=name, merge="tome", merge_r=int(match["tome"]))
    if match["keep"]:
        return schedule_route("tome", int(match["keep"]) / 100, int(match["floor"]))
    if match["energy"]:
        return RouteSpec(name=name, energy_tau=round(float(match["energy"]) / 100, 6), prune_after=2)
    return RouteSpec(name=name)


def fixed_routes(extra_names: list[str] | tuple[str, ...] = ()) -> list[RouteSpec]:
    """Default operating points plus any named ones (e.g. every fixed point of the frontier, so the
    equal-quality choice sees them all), ordered full, exits, ToMe, energy; names as jobs/frontier.py's."""
    names = {"full", "exit6", "exit8", "tome4", "tome-keep75-floor16", "energy90", *extra_names}
    routes = [r for r in map(route_from_name, names) if r is not None]
    kind = {"none": 1, "tome": 2}

    def order(r: RouteSpec) -> tuple:
        if r.exit_depth is None and r.merge == "none" and not r.prunes:
            return (0, 0.0)
        if r.prunes:
            return (3, r.energy_tau or 0.0)
        return (kind[r.merge], r.exit_depth or 0, r.merge_r, r.merge_keep or 0.0, r.merge_floor)

    return sorted(routes, key=order)


@dataclass
class EncoderCase:
    """One model to time: its weights, exit heads (and whether they are trained), images and routes."""

    model_name: str
    loaded: LoadedModel
    heads: ExitHeads | None
    heads_note: str
    images: np.ndarray  # uint8 [N, S, S, 3] at the model's resolution
    bytes_per_pixel: np.ndarray  # [N], for the router's features
    batch_size: int
    routes: list[RouteSpec]
    router: RouterConfig | None = None  # a calibrated router, timed as the "routed" point
    weights: str = "trained"


def frontier_quality(path: Path, heads_file: str | None) -> dict[str, Any]:
    """Quality per operating point from jobs/frontier.py's results (never recomputed here).

    Marked stale when the exit heads file is newer than the frontier, since exit quality then changed."""
    if not path.exists():
        return {"source": None, "points": {}, "note": f"{path} not found: quality unknown"}
    data = json.loads(path.read_text())
    points = {
        p["name"]: {"t2i_R@10": p.get("t2i_R@10"), "mean_cosine_to_full": p.get("mean_cosine_to_full")}
        for p in data.get("points", [])
    }
    stale = heads_file is not None and Path(heads_file).stat().st_mtime > path.stat().st_mtime
    note = "exit heads are newer than the frontier: exit quality may be stale" if stale else ""
    return {"source": str(path), "points": points, "stale": stale, "note": note}


def route_images(router: RouterConfig, images: np.ndarray, bytes_per_pixel: np.ndarray) -> np.ndarray:
    """Route id per image, as the job's prepare stage assigns it."""
    return assign_routes(load_scorer(router.scorer)(complexity_features(images, bytes_per_pixel)), router)


def _batches(images: np.ndarray, size: int) -> list[np.ndarray]:
    return [images[i : i + size] for i in range(0, len(images), size)]


def _paired(reference: list[float], times: list[float]) -> dict[str, float]:
    """Speedup from same-round pairs (reference seconds / candidate seconds): robust to load drift."""
    ratios = [r / t for r, t in zip(reference, times, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def _runner(encoder: RoutedEncoder, batches: list[np.ndarray], ids: list[np.ndarray]):
    """One timed call: every batch through `encoder` with its route ids."""
    return lambda: [encoder.encode(b, r) for b, r in zip(batches, ids, strict=True)]


def measure_encoder(case: EncoderCase, rounds: int, warmup: int = 1) -> dict[str, Any]:
    """images/s (median, min, max over rounds) per candidate, speedup vs encode_image, GFLOPs/image."""
    loaded, n = case.loaded, len(case.images)
    batches = _batches(case.images, case.batch_size)
    fixed = RoutedEncoder(loaded, case.routes, case.heads)

    def baseline() -> None:
        with torch.inference_mode():
            for b in batches:
                loaded.model.encode_image(normalize_uint8(torch.from_numpy(b), loaded.mean, loaded.std))

    candidates: dict[str, Callable[[], object]] = {BASELINE: baseline}
    for i, route in enumerate(case.routes):
        candidates[route.name] = _runner(fixed, batches, [np.full(len(b), i, np.int32) for b in batches])
    route_share: dict[str, float] = {}
    if case.router is not None:
        routed = RoutedEncoder(loaded, case.router.routes, case.heads)
        all_ids = route_images(case.router, case.images, case.bytes_per_pixel)  # cost: see router.py
        candidates["routed"] = _runner(routed, batches, _batches(all_ids, case.batch_size))
        route_share = {r.name: float((all_ids == j).mean()) for j, r in enumerate(case.router.routes)}

    # warm-up pass by hand: it also yields each candidate's GFLOPs from the encoder's own accounting
    gflops = {BASELINE: full_depth_gflops(open_clip.get_model_config(case.model_name))}
    for _ in range(max(1, warmup)):
        for name, fn in candidates.items():
            out = fn()
            if name != BASELINE:
                gflops[name] = float(np.concatenate([o.gflops for o in out]).mean())
    seconds = alternate(candidates, rounds, warmup=0)
    points = []
    for name, times in seconds.items():
        paired = _paired(seconds[BASELINE], times)
        own_full = _paired(seconds[FULL_ROUTE], times) if FULL_ROUTE in seconds else None
        speed = throughput(times, n)
        points.append(
            {
                "name": name,
                "kind": "baseline" if name == BASELINE else "routed" if name == "routed" else "fixed",
                "images_per_second": speed,
                "ms_per_image": 1e3 / speed["median"],
                "speedup": paired,
                "speedup_vs_full_route": own_full,
                "gflops_per_image": gflops[name],
            }
        )
    return {
        "model": case.model_name,
        "weights": case.weights,
        "heads": case.heads_note,
        "images": n,
        "batch_size": case.batch_size,
        "image_size": loaded.image_size,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "routed_share": route_share,
        "points": points,
    }


def attach_quality(result: dict[str, Any], quality: dict[str, Any]) -> None:
    """Copy frontier quality onto matching points; pick the fastest adaptive point at equal quality.

    `full` is not a candidate: it does no less work, only runs a different attention kernel."""
    result["quality_source"] = quality["source"]
    result["quality_note"] = quality["note"]
    known = quality["points"]
    base = known.get(BASELINE) or known.get("full")
    for p in result["points"]:
        q = known.get(p["name"]) or (base if p["name"] == BASELINE else None)
        p["t2i_R@10"] = q["t2i_R@10"] if q else None
        p["mean_cosine_to_full"] = q["mean_cosine_to_full"] if q else None
    if base is None or base.get("t2i_R@10") is None:
        result["equal_quality"] = None
        return
    floor = base["t2i_R@10"] - EQUAL_QUALITY_R10_DROP
    eligible = [
        p
        for p in result["points"]
        if p["name"] not in (BASELINE, FULL_ROUTE) and p["t2i_R@10"] is not None and p["t2i_R@10"] >= floor
    ]
    best = max(eligible, key=lambda p: p["speedup"]["median"], default=None)
    result["equal_quality"] = {
        "rule": f"t2i R@10 >= full's {base['t2i_R@10']:.4f} - {EQUAL_QUALITY_R10_DROP} (absolute)",
        "point": best["name"] if best else None,
        "speedup": best["speedup"] if best else None,
        "t2i_R@10": best["t2i_R@10"] if best else None,
    }
