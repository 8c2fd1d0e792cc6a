"""The quality-versus-compute frontier of a model on held-out scenes: every fixed route of the frontier's
catalogue selection plus a calibrated router, timed by the shared harness against open_clip's
`encode_image` and scored by the quality harness against full depth.

Each point carries its key (a route's spec key; the router's router key), which is how the bench later
matches its own points to this quality, never by name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from icar_lab.catalogue import FULL_KEY, frontier_routes, router_key, spec_key
from icar_lab.embed import embed_images, embed_routes, embed_texts
from icar_lab.quality import evaluate_embeddings
from icar_lab.sample import CaptionedSample
from icar_lab.speed import EncoderCase, measure_encoder, route_images
from pipeline.config import RouterConfig, RouteSpec
from pipeline.encode.routed import RoutedEncoder


def point_embeddings(
    probe: RoutedEncoder, routes: list[RouteSpec], router: RouterConfig, sample: CaptionedSample
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Every image's embedding per point key (each fixed route, and the router's mix), and the router's
    route id per image."""
    fixed = RoutedEncoder(probe.loaded, routes, probe.vit.heads)
    embedded = embed_routes(fixed, sample.images)
    embeddings = {spec_key(r): emb for r, (emb, _) in zip(routes, embedded, strict=True)}
    route_ids = route_images(router, sample.images, sample.bytes_per_pixel)
    embeddings[router_key(router)] = embed_images(probe, sample.images, route_ids)[0]
    return embeddings, route_ids


def attach_point_quality(
    points: list[dict[str, Any]],
    embeddings: dict[str, torch.Tensor],
    text: torch.Tensor,
    sample: CaptionedSample,
) -> None:
    """Each point's retrieval quality and its distance from full depth; encode_image's point (no key)
    gets the full route's: the adaptive forward at full depth reproduces it."""
    full = embeddings[FULL_KEY]
    for p in points:
        report = evaluate_embeddings(
            embeddings[p["key"] or FULL_KEY], text, sample, reference=full, name=p["name"]
        )
        p |= {
            "t2i_R@10": report.t2i[10],
            "i2t_R@10": report.i2t[10],
            "mean_cosine_to_full": report.overall.ref_cosine,
            "neighbour_overlap": report.overall.neighbour_overlap,
            "report": report.to_dict(),
        }


def measure_frontier(
    probe: RoutedEncoder,
    model_name: str,
    router: RouterConfig,
    sample: CaptionedSample,
    exits: list[int] | None = None,
    timing_images: int = 512,
    batch_size: int = 64,
    rounds: int = 3,
) -> dict[str, Any]:
    """Speed (on the first `timing_images`) and quality (on all of `sample`) of every frontier point.

    `probe` is the model with its heads, serving `router.routes`; `exits` default to every depth the
    heads serve."""
    loaded, heads = probe.loaded, probe.vit.heads
    exits = (heads.depths if heads is not None else []) if exits is None else exits
    routes = frontier_routes(exits, heads)
    timed = slice(0, min(timing_images, len(sample)))
    case = EncoderCase(
        model_name=model_name,
        loaded=loaded,
        heads=heads,
        heads_note="trained" if heads is not None else "none",
        images=sample.images[timed],
        bytes_per_pixel=sample.bytes_per_pixel[timed],
        batch_size=batch_size,
        routes=routes,
        router=router,
    )
    result = measure_encoder(case, rounds)
    embeddings, route_ids = point_embeddings(probe, routes, router, sample)
    attach_point_quality(result["points"], embeddings, embed_texts(loaded, sample.captions), sample)
    result["routed_share"] = {r.name: float((route_ids == j).mean()) for j, r in enumerate(router.routes)}
    result["router"] = router.model_dump(exclude_defaults=True)
    result["quality_images"] = len(sample)
    result["split"] = sample.split
    return result


def frontier_markdown(result: dict[str, Any]) -> str:
    """One row per point, then the router's share of images per route."""
    lines = [
        "| point | ms/img | speedup vs encode_image (min-max) | GFLOPs/img | t2i R@10 | mean cos to full |",
        "|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        s = p["speedup"]
        lines.append(
            f"| {p['name']} | {p['ms_per_image']:.2f} | {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f}) "
            f"| {p['gflops_per_image']:.3f} | {p['t2i_R@10']:.4f} | {p['mean_cosine_to_full']:.4f} |"
        )
    share = ", ".join(f"{k} {v:.0%}" for k, v in result["routed_share"].items())
    return "\n".join(lines) + f"\n\nrouted share: {share}\n"
