"""How much per-image routing could ever buy: the oracle against the best static route, and a router.

    python jobs/headroom.py --split test --images 2000 --out results/headroom
    python jobs/headroom.py --split calib --config results/routes.yaml --out /tmp/headroom-calib
    python jobs/headroom.py --split test --images 6000 --gallery-size 2000   # 3x the queries at R@10 of 2,000

Measures every catalogue route (each token path at each exit the heads serve, and at full depth) on the
split's scenes, timed against open_clip `encode_image` in alternating rounds; then, at the quality floor:
the fastest single route treating every image alike, the fastest route whose images pick their own merge
schedule inside the ViT (an in-ViT split), the per-image oracle (each image on the cheapest route keeping
its cosine to full depth >= tau), and the router of --config (default: the embedded model's shipped one),
each with its quality per complexity level; then times the routes those plans use again, in fresh rounds
on other scenes, so that the gains reported are not the ones the selection's timing noise flattered.
Writes <out>/headroom-<split>.json, .md and .png (headroom-<split>-<images>.* for another number of
scenes than the default 2,000).

Report on `test`; choose on `calib` (lab/icar_lab/scenes/splits.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from icar_lab import plots
from icar_lab.catalogue import calibration_routes, unique
from icar_lab.headroom import headroom_markdown, measure_headroom
from icar_lab.heldout import load_heldout
from icar_lab.outputs import output_path
from icar_lab.scenes.splits import TEST
from icar_lab.targets import QualityFloor
from pipeline.config import load_config
from pipeline.encode.routed import RoutedEncoder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split", default=TEST, help="scene stream (default: test, the reporting split)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--timing-images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--retime-rounds",
        type=int,
        default=15,
        help="time the plans' routes again in this many fresh rounds on the last --timing-images scenes "
        "(0: skip): the gains the selection's own timing could not flatter",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--exits", type=int, nargs="*", help="exit depths (default: every depth of the heads)"
    )
    parser.add_argument("--config", help="config with the model and router (default: embedded, shipped)")
    parser.add_argument(
        "--gallery-size", type=int, help="each caption searches a random gallery of this many scenes"
    )
    parser.add_argument("--cache-dir", help="where rendered scene sets are cached")
    parser.add_argument("--out", default="results/headroom")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(args.config)
    probe = RoutedEncoder.from_config(cfg.model, cfg.router.routes)
    heads = probe.vit.heads
    exits = (heads.depths if heads is not None else []) if args.exits is None else args.exits
    routes = unique([*calibration_routes(exits, heads), *cfg.router.routes])
    encoder = RoutedEncoder(probe.loaded, routes, heads)
    heldout = load_heldout(args.split, args.images, probe.loaded.image_size, cache_dir=args.cache_dir)
    report = measure_headroom(
        encoder, cfg.model.name, heldout, QualityFloor(), cfg.router, args.timing_images, args.batch_size,
        args.rounds, args.gallery_size, args.retime_rounds,
    )  # fmt: skip
    report["args"] = vars(args)
    sized = "" if args.images == parser.get_default("images") else f"-{args.images}"
    out = output_path(Path(args.out) / f"headroom-{args.split}{sized}.json")
    out.write_text(json.dumps(report, indent=2, default=float))
    markdown = headroom_markdown(report)
    out.with_suffix(".md").write_text(markdown)
    plots.headroom(report, out.with_suffix(".png"), f"{cfg.model.name} on {args.split}")
    print(markdown)


if __name__ == "__main__":
    main()
