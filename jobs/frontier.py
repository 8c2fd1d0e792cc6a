"""The quality-versus-compute frontier of a model on held-out scenes, in one command.

    python jobs/frontier.py --images 2000 --timing-images 512 --rounds 3 --out results
    python jobs/frontier.py --config results/routes.yaml     # a router from `icar calibrate --out`

Points: open_clip encode_image; full depth; every plain exit; ToMe at several constant r and front-loaded
schedules (tome-keep70-floor16: 70% of tokens kept per block down to 16); energy budgets at several tau;
the router of --config (default: the embedded model's shipped pipeline/models/icar-tiny-vit.routes.yaml).
Writes <out>/frontier.json (what `jobs/bench.py --frontier` reads), frontier.md and frontier.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from icar_lab import plots
from icar_lab.frontier import frontier_markdown, measure_frontier
from icar_lab.heldout import load_heldout
from icar_lab.outputs import output_path
from icar_lab.scenes.splits import TEST
from pipeline.config import load_config
from pipeline.encode.routed import RoutedEncoder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000, help="held-out scenes scored for quality")
    parser.add_argument("--timing-images", type=int, default=512, help="of those, the ones timed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--exits", type=int, nargs="*", help="plain exits (default: every depth of the heads)"
    )
    parser.add_argument("--config", help="config with the model and router (default: embedded, shipped)")
    parser.add_argument("--out", default="results", help="directory for frontier.json, .md and .png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(args.config)
    out = output_path(Path(args.out) / "frontier.json").parent
    probe = RoutedEncoder.from_config(cfg.model, cfg.router.routes)
    heldout = load_heldout(TEST, args.images, probe.loaded.image_size)
    result = measure_frontier(
        probe,
        cfg.model.name,
        cfg.router,
        heldout,
        args.exits,
        args.timing_images,
        args.batch_size,
        args.rounds,
    )
    result["args"] = vars(args)
    (out / "frontier.json").write_text(json.dumps(result, indent=2, default=float))
    markdown = frontier_markdown(result)
    (out / "frontier.md").write_text(markdown)
    plots.frontier(result["points"], out / "frontier.png", f"{cfg.model.name} held-out frontier")
    print(markdown)


if __name__ == "__main__":
    main()
