"""The encoder speed harness, shared by calibration, the frontier and the bench: open_clip `encode_image`
at full depth against the adaptive encoder on each route (and a calibrated router), timed alternately in
one process on the same images and threads. Each point carries its route's spec key, so callers match
points to routes and quality by spec, never by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import open_clip
import torch

from icar_lab.catalogue import FULL_KEY, router_key, spec_key
from icar_lab.timing import alternate, paired_speedup, throughput
from pipeline.config import RouterConfig, RouteSpec
from pipeline.encode.flops import full_depth_gflops
from pipeline.encode.heads import ExitHeads
from pipeline.encode.model import LoadedModel, normalize_uint8
from pipeline.encode.routed import RoutedEncoder
from pipeline.route import assign_routes
from pipeline.score import complexity_features, load_scorer

BASELINE = "open_clip encode_image"
ROUTED = "routed"


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

    @classmethod
    def of_encoder(
        cls,
        encoder: RoutedEncoder,
        model_name: str,
        images: np.ndarray,
        batch_size: int,
        routes: list[RouteSpec] | None = None,
    ) -> EncoderCase:
        """`routes` (default: all of `encoder`'s) with its weights and heads, timed on `images` without a
        router (so no router features are needed)."""
        return cls(
            model_name=model_name,
            loaded=encoder.loaded,
            heads=encoder.vit.heads,
            heads_note="",
            images=images,
            bytes_per_pixel=np.zeros(len(images), np.float32),
            batch_size=batch_size,
            routes=encoder.routes if routes is None else routes,
        )


def route_images(router: RouterConfig, images: np.ndarray, bytes_per_pixel: np.ndarray) -> np.ndarray:
    """Route id per image, as the job's prepare stage assigns it."""
    return assign_routes(load_scorer(router.scorer)(complexity_features(images, bytes_per_pixel)), router)


def _batches(array: np.ndarray, size: int) -> list[np.ndarray]:
    return [array[i : i + size] for i in range(0, len(array), size)]


def _runner(encoder: RoutedEncoder, batches: list[np.ndarray], ids: list[np.ndarray]) -> Callable[[], list]:
    """One timed call: every batch through `encoder` with its route ids."""
    return lambda: [encoder.encode(b, r) for b, r in zip(batches, ids, strict=True)]


@dataclass
class Candidates:
    """What the harness times: per name, one call over every image, its point's key and route spec."""

    calls: dict[str, Callable[[], object]]
    keys: dict[str, str | None]
    specs: dict[str, dict | None]
    route_share: dict[str, float]  # the router's share of the images per route ({} without a router)


def candidates(case: EncoderCase, batches: list[np.ndarray]) -> Candidates:
    """open_clip's encode_image, each fixed route, and the case's router when it has one."""
    loaded = case.loaded

    def baseline() -> None:
        with torch.inference_mode():
            for b in batches:
                loaded.model.encode_image(normalize_uint8(torch.from_numpy(b), loaded.mean, loaded.std))

    found = Candidates({BASELINE: baseline}, {BASELINE: None}, {}, {})
    fixed = RoutedEncoder(loaded, case.routes, case.heads)
    for i, route in enumerate(case.routes):
        found.calls[route.name] = _runner(fixed, batches, [np.full(len(b), i, np.int32) for b in batches])
        found.keys[route.name] = spec_key(route)
        found.specs[route.name] = route.model_dump(exclude_defaults=True)
    if case.router is not None:
        routed = RoutedEncoder(loaded, case.router.routes, case.heads)
        all_ids = route_images(case.router, case.images, case.bytes_per_pixel)  # cost: bench/router.py
        found.calls[ROUTED] = _runner(routed, batches, _batches(all_ids, case.batch_size))
        found.keys[ROUTED] = router_key(case.router)
        found.route_share = {r.name: float((all_ids == j).mean()) for j, r in enumerate(case.router.routes)}
    return found


def warm_up(case: EncoderCase, calls: dict[str, Callable[[], object]], warmup: int) -> dict[str, float]:
    """Run every candidate `warmup` times (at least once), by hand: the pass also yields each one's
    GFLOPs/image from the encoder's own accounting (encode_image's from the model config)."""
    gflops = {BASELINE: full_depth_gflops(open_clip.get_model_config(case.model_name))}
    for _ in range(max(1, warmup)):
        for name, fn in calls.items():
            out = fn()
            if name != BASELINE:
                gflops[name] = float(np.concatenate([o.gflops for o in out]).mean())
    return gflops


def measure_encoder(case: EncoderCase, rounds: int, warmup: int = 1) -> dict[str, Any]:
    """Per point: images/s (median, min, max over rounds), speedup vs encode_image and vs the adaptive
    forward's own full-depth route (same-round ratios), GFLOPs/image from the encoder's own accounting."""
    n = len(case.images)
    names = [r.name for r in case.routes]
    if len(set(names) | {BASELINE, ROUTED}) != len(names) + 2:
        raise ValueError(f"route names must be unique and not {BASELINE!r} or {ROUTED!r}: {names}")
    timed = candidates(case, _batches(case.images, case.batch_size))
    gflops = warm_up(case, timed.calls, warmup)
    seconds = alternate(timed.calls, rounds, warmup=0)
    full = next((r.name for r in case.routes if spec_key(r) == FULL_KEY), None)
    points = []
    for name, times in seconds.items():
        speed = throughput(times, n)
        points.append(
            {
                "name": name,
                "kind": "baseline" if name == BASELINE else ROUTED if name == ROUTED else "fixed",
                "key": timed.keys[name],
                "route": timed.specs.get(name),
                "images_per_second": speed,
                "ms_per_image": 1e3 / speed["median"],
                "seconds_per_round": times,  # all `n` images, one entry per alternating round
                "speedup": paired_speedup(seconds[BASELINE], times),
                "speedup_vs_full_route": paired_speedup(seconds[full], times) if full else None,
                "gflops_per_image": gflops[name],
            }
        )
    return {
        "model": case.model_name,
        "weights": case.weights,
        "heads": case.heads_note,
        "images": n,
        "batch_size": case.batch_size,
        "image_size": case.loaded.image_size,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "routed_share": timed.route_share,
        "points": points,
    }
