"""Check the quality floor's R@10 bound out of sample: bound on one half of a scene set, ratio on the other.

    python jobs/bound_coverage.py --split calib-bimodal --images 2000
    python jobs/bound_coverage.py --split calib --images 2000
    python jobs/bound_coverage.py --split test-bimodal --images 2000     # and --split test

Embeds the split's scenes on every catalogue route at full depth (or at --exits) with the embedded
model, then halves the set by scene key --splits times (lab/icar_lab/bound_coverage.py). Prints the
share of (split, route) pairs whose other-half ratio stays at or above the bound, for the prediction
bound calibration uses and for the plain confidence bound, and each route's ratio and bound on the whole
sample (what calibration would judge it by), and writes <out>/bound-coverage-<split>.json.
Quality only: nothing is timed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from icar_lab.bound_coverage import bound_coverage
from icar_lab.catalogue import FULL_KEY, calibration_routes, spec_key
from icar_lab.embed import embed_routes, embed_texts
from icar_lab.heldout import load_heldout
from icar_lab.outputs import output_path
from icar_lab.router_search import RouteMeasurement
from icar_lab.targets import QualityFloor
from pipeline.config import load_config
from pipeline.encode.routed import RoutedEncoder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--split",
        default="calib-bimodal",
        help="scene stream; on a test stream it checks the bound where nothing was designed or chosen",
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--exits", type=int, nargs="*", default=[], help="exit depths (default: none)")
    parser.add_argument("--splits", type=int, default=30, help="random halvings by scene key")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", help="where rendered scene sets are cached")
    parser.add_argument("--out", default="results/quality")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_config(None).model
    probe = RoutedEncoder.from_config(model, [])
    encoder = RoutedEncoder(probe.loaded, calibration_routes(args.exits, probe.vit.heads), probe.vit.heads)
    heldout = load_heldout(args.split, args.images, probe.loaded.image_size, cache_dir=args.cache_dir)
    embedded = embed_routes(encoder, heldout.images, batch_size=64)
    full = next(emb for r, (emb, _) in zip(encoder.routes, embedded, strict=True) if spec_key(r) == FULL_KEY)
    measurements = [
        RouteMeasurement(route, emb, gflops, 0.0)
        for route, (emb, gflops) in zip(encoder.routes, embedded, strict=True)
        if spec_key(route) != FULL_KEY  # full depth's bound is 1 and always holds
    ]
    text = embed_texts(encoder.loaded, heldout.captions)
    report = bound_coverage(
        measurements, full, text, heldout.keys, QualityFloor.confidence, args.splits
    )
    report |= {"split": args.split, "images": len(heldout), "args": vars(args)}
    out = output_path(Path(args.out) / f"bound-coverage-{args.split}.json")
    out.write_text(json.dumps(report, indent=2))
    for route in report["whole_sample"]:
        ratio, bound = route["ratio"], route["prediction"]
        print(f"  {route['route']:42s} R@10 ratio {ratio:.4f}, prediction bound {bound:.4f}")
    print(
        f"{args.split}, {len(heldout)} scenes, {report['pairs']} (split, route) pairs: the other half's "
        f"R@10 ratio >= the {report['confidence']:.0%} prediction bound in "
        f"{report['prediction_bound_coverage']:.1%}, >= the plain confidence bound in "
        f"{report['confidence_bound_coverage']:.1%}; mean prediction margin "
        f"{report['mean_prediction_margin']:.4f}; sd of the half-to-half difference "
        f"{report['sd_of_half_to_half_ratio_difference']:.4f}\nwrote {out}"
    )


if __name__ == "__main__":
    main()
