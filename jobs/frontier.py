"""The quality-versus-compute frontier of the embedded model on its held-out set, in one command.

    python jobs/frontier.py --images 2000 --timing-images 512 --rounds 3

Points: open_clip full depth; every fixed exit; ToMe at several constant r and front-loaded schedules
(tome-keep70-floor16: 70% of tokens kept per block down to 16); energy budgets at several tau; the
calibrated router (pipeline/configs/routed.yaml). Quality from the harness (R@10, mean cosine to full);
speed measured alternately against open_clip's encode_image on the same images and threads.
Writes results/frontier.json, results/frontier.md and results/frontier.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pipeline.config import RouteSpec, load_config
from pipeline.encode.model import normalize_uint8
from pipeline.encode.routed import RoutedEncoder
from pipeline.lab.calibrate import MERGE_SCHEDULES, schedule_route
from pipeline.lab.heldout import load_heldout
from pipeline.lab.quality import embed_texts, evaluate_embeddings
from pipeline.lab.timing import alternate, throughput
from pipeline.route import assign_routes
from pipeline.score import complexity_features, load_scorer

ROUTED_CONFIG = Path(__file__).resolve().parent.parent / "pipeline" / "models" / "icar-tiny-vit.routes.yaml"


def fixed_routes(depth: int, exits: list[int]) -> list[RouteSpec]:
    routes = [RouteSpec(name="full")]
    routes += [RouteSpec(name=f"exit{d}", exit_depth=d) for d in exits]
    routes += [RouteSpec(name=f"tome{r}", merge="tome", merge_r=r) for r in (2, 4, 6, 8)]
    routes += [schedule_route("tome", keep, floor) for keep, floor in MERGE_SCHEDULES]
    taus = (0.98, 0.99, 0.995, 0.999)
    routes += [RouteSpec(name=f"energy{t * 100:g}", energy_tau=t, prune_after=2) for t in taus]
    return routes


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [
        ("ms_per_image", "t2i_R@10", "ms / image (measured)"),
        ("gflops_per_image", "t2i_R@10", "GFLOPs / image"),
        ("ms_per_image", "mean_cosine_to_full", "ms / image (measured)"),
    ]
    for ax, (x, y, label) in zip(axes, panels, strict=True):
        for p in points:
            marker = "*" if p["kind"] == "routed" else "o" if p["kind"] == "fixed" else "s"
            ax.scatter(p[x], p[y], marker=marker, s=90 if marker == "*" else 40)
            ax.annotate(p["name"], (p[x], p[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=label, ylabel=y)
        ax.grid(alpha=0.3)
    fig.suptitle(
        "icar-tiny-vit held-out frontier (stars: calibrated routers; square: open_clip encode_image)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--timing-images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--exits", type=int, nargs="+", default=[4, 6, 8, 10])
    parser.add_argument("--routed-config", default=str(ROUTED_CONFIG))
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    routed = load_config(args.routed_config)
    router = routed.router
    probe = RoutedEncoder.from_config(routed.model, router.routes)
    loaded, heads = probe.loaded, probe.vit.heads
    fixed = fixed_routes(probe.vit.depth, args.exits)
    fixed_encoder = RoutedEncoder(loaded, fixed, heads)
    heldout = load_heldout(0, args.images, loaded.image_size)
    text = embed_texts(loaded, heldout.captions)
    scores = load_scorer(router.scorer)(complexity_features(heldout.images, heldout.bytes_per_pixel))
    route_ids = assign_routes(scores, router)

    def encode_all(encoder: RoutedEncoder, ids: np.ndarray):
        out = [encoder.encode(heldout.images[i : i + 256], ids[i : i + 256]) for i in range(0, len(ids), 256)]
        return torch.from_numpy(np.concatenate([o.vectors for o in out])), np.concatenate(
            [o.gflops for o in out]
        )

    n = len(heldout)
    full_emb, _ = encode_all(fixed_encoder, np.zeros(n, np.int32))
    candidates, results = {}, {}
    batches = [heldout.images[i : i + args.batch_size] for i in range(0, args.timing_images, args.batch_size)]
    timed_ids = route_ids[: args.timing_images]

    def baseline():
        with torch.inference_mode():
            for b in batches:
                loaded.model.encode_image(normalize_uint8(torch.from_numpy(b), loaded.mean, loaded.std))

    candidates["open_clip encode_image"] = baseline
    for i, route in enumerate(fixed):
        emb, gflops = encode_all(fixed_encoder, np.full(n, i, np.int32))
        results[route.name] = ("fixed", emb, gflops)
        candidates[route.name] = lambda i=i: [
            fixed_encoder.encode(b, np.full(len(b), i, np.int32)) for b in batches
        ]
    emb, gflops = encode_all(probe, route_ids)
    results["routed"] = ("routed", emb, gflops)
    offsets = range(0, args.timing_images, args.batch_size)
    candidates["routed"] = lambda: [
        probe.encode(b, timed_ids[o : o + len(b)]) for b, o in zip(batches, offsets, strict=True)
    ]

    timing = alternate(candidates, args.rounds)
    base = throughput(timing["open_clip encode_image"], args.timing_images)
    points = [
        {
            "name": "open_clip encode_image",
            "kind": "baseline",
            "ms_per_image": 1e3 / base["median"],
            "images_per_second": base,
            "speedup": 1.0,
        }
    ]
    base_report = evaluate_embeddings(full_emb, text, heldout, reference=full_emb, name="full")
    points[0] |= {
        "t2i_R@10": base_report.t2i[10],
        "mean_cosine_to_full": 1.0,
        "gflops_per_image": float(results["full"][2].mean()),
    }
    for name, (kind, emb, gflops) in results.items():
        report = evaluate_embeddings(emb, text, heldout, reference=full_emb, name=name)
        speed = throughput(timing[name], args.timing_images)
        points.append(
            {
                "name": name,
                "kind": kind,
                "ms_per_image": 1e3 / speed["median"],
                "images_per_second": speed,
                "speedup": speed["median"] / base["median"],
                "gflops_per_image": float(gflops.mean()),
                "t2i_R@10": report.t2i[10],
                "i2t_R@10": report.i2t[10],
                "mean_cosine_to_full": report.overall.ref_cosine,
                "neighbour_overlap": report.overall.neighbour_overlap,
                "report": report.to_dict(),
            }
        )
    share = {r.name: float((route_ids == i).mean()) for i, r in enumerate(router.routes)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "args": vars(args),
        "threads": torch.get_num_threads(),
        "routed_share": share,
        "points": points,
    }
    (out / "frontier.json").write_text(json.dumps(summary, indent=2, default=float))
    lines = [
        "| point | ms/img | speedup vs encode_image | GFLOPs/img | t2i R@10 | mean cos to full |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p['name']} | {p['ms_per_image']:.2f} | {p['speedup']:.2f}x | {p['gflops_per_image']:.3f} "
            f"| {p['t2i_R@10']:.4f} | {p['mean_cosine_to_full']:.4f} |"
        )
    (out / "frontier.md").write_text("\n".join(lines) + f"\n\nrouted share: {share}\n")
    plot(points, out / "frontier.png")
    print("\n".join(lines))
    print(f"routed share: {share}")


if __name__ == "__main__":
    main()
