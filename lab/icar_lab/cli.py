"""The lab's commands for `icar` (registered through the `icar.commands` entry point)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from icar_lab.targets import ComputeBudget, QualityFloor, Target
from pipeline.config import EMBEDDED_MODEL, ConfigError, IndexConfig, ModelConfig  # loaded by `icar` already

if TYPE_CHECKING:
    from icar_lab.calibrate import Calibration
    from icar_lab.sample import CaptionedSample
    from pipeline.encode.routed import RoutedEncoder

MIN_IMAGES = 20  # two halves of at least 10 images: R@10 needs a gallery of 10
CALIBRATE = """Calibrate a router for any open_clip ViT on any captioned sample.

    icar calibrate --input <captioned parquet shards> --out routes.yaml \\
        [--model ViT-B-32 --pretrained <open_clip tag or checkpoint> --heads <exit heads>] \\
        [--images 2000 [--gallery-size 500]] \
        [--min-cosine 0.985 --min-recall-ratio 0.99 --confidence 0.95 | --max-gflops 0.3]

Reads the first --images usable rows (img2dataset-style shards, decoded as `icar index` decodes them),
measures every catalogue route (each token path at each exit the heads serve, and at full depth), and
writes a config with `model:` and `router:` sections; `icar index --config routes.yaml --input <shards>`
indexes with it. Quality is text->image R@10 and mean cosine to full depth: images with identical
captions count as the same target (a `scene_key` column, when every row has one, is used instead).
The R@10 floor is judged by a bootstrap lower bound on what a new sample of the same size would show
(--confidence), so the router keeps its quality on images it was not calibrated on. R@10 depends on how
many images a caption searches: --gallery-size judges it in random galleries of that size (the size your
claim is about), so a sample several times larger brings more queries and a tighter bound.
A router that routes (a ladder of routes and score thresholds) is searched on a random half of the
sample and ships only if the other half, which it never saw, confirms it and it beats the best single
route on the whole sample.
Scene shards of the reserved `test` split are refused.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `icar calibrate`. Heavy imports happen inside the handler, so `icar --help` stays fast."""
    p = subparsers.add_parser(
        "calibrate",
        help="measure routes on a captioned sample, write the best router as a config",
        description=CALIBRATE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _calibrate_arguments(p)
    p.set_defaults(func=cmd_calibrate)


def _calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, help="captioned parquet shards: paths, globs, dirs")
    p.add_argument("--out", required=True, help="routes YAML to write (model: and router: sections)")
    p.add_argument("--report", help="JSON report path (default: <out>.report.json)")
    p.add_argument("--model", help="open_clip model name (default: the --config's model, else icar-tiny-vit)")
    p.add_argument("--pretrained", help="open_clip tag or checkpoint path (required for non-embedded models)")
    p.add_argument("--heads", help="exit-heads file trained for this model (default: its shipped heads)")
    p.add_argument(
        "--exits", type=int, nargs="*", help="exit depths to try (default: every depth the heads serve)"
    )
    p.add_argument("--images", type=int, default=2000, help="sample size: the first N usable rows")
    p.add_argument(
        "--min-cosine", type=float, default=QualityFloor.min_cosine, help="floor: mean cosine to full depth"
    )
    p.add_argument(
        "--min-recall-ratio", type=float, default=QualityFloor.min_recall_ratio, help="floor: R@10 / full's"
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=QualityFloor.confidence,
        help="judge the R@10 ratio by its lower prediction bound at this level (0: the point estimate)",
    )
    p.add_argument(
        "--max-gflops", type=float, help="instead of a floor: the most faithful router within GFLOPs/image"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--timing-images", type=int, default=512, help="images each route is timed on")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (medians kept)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--gallery-size",
        type=int,
        help="judge R@10 with each caption searching a random gallery of this many sample images "
        "(default: the whole sample); a sample several times this size narrows the R@10 bound",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the fit/test split and the galleries")
    p.add_argument("--config", help="index config whose input column mapping and decode settings to use")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override a field of that config, e.g. --set input.caption_column=TEXT",
    )  # fmt: skip


def run_calibrate(argv: list[str]) -> int:
    """`icar calibrate` with `argv`, exactly as the command line runs it (`icar tune` calibrates so)."""
    parser = argparse.ArgumentParser(prog="icar calibrate")
    _calibrate_arguments(parser)
    return cmd_calibrate(parser.parse_args(argv))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _model(args: argparse.Namespace, configured: ModelConfig) -> ModelConfig:
    """The model to calibrate: the flags, else the config's; local paths made absolute for the YAML."""
    from icar_lab.routes_file import absolute_if_local

    if args.model or args.pretrained or args.heads:
        name = args.model or EMBEDDED_MODEL
        model = ModelConfig(name=name, pretrained=args.pretrained, heads=args.heads)
    else:
        model = configured
    if model.name != EMBEDDED_MODEL and model.pretrained is None:
        raise ConfigError(f"--pretrained is required for {model.name}: random weights cannot be calibrated")
    return ModelConfig(
        name=model.name, pretrained=absolute_if_local(model.pretrained), heads=absolute_if_local(model.heads)
    )


def _encoder(model: ModelConfig, exits: list[int] | None) -> RoutedEncoder:
    """The model with its heads, serving every catalogue route at the requested exits."""
    from icar_lab.catalogue import calibration_routes
    from pipeline.encode.heads import ExitHeads
    from pipeline.encode.model import load_model, resolve_heads
    from pipeline.encode.routed import RoutedEncoder

    try:
        loaded = load_model(model)
        heads_path = resolve_heads(model)
        heads = ExitHeads.load(heads_path, loaded.model.visual) if heads_path else None
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # unknown name, bad checkpoint, heads
        raise ConfigError(f"cannot load model {model.model_id}: {exc}") from None
    depths = heads.depths if heads is not None else []
    exits = depths if exits is None else exits
    if set(exits) - set(depths):
        served = f"heads at {depths}" if depths else "no exit heads: pass --heads or --exits with no depths"
        raise ConfigError(f"--exits {exits}: {model.name} has {served}")
    return RoutedEncoder(loaded, calibration_routes(exits, heads), heads)


def _target(args: argparse.Namespace) -> Target:
    if args.max_gflops is not None:
        return ComputeBudget(args.max_gflops)
    return QualityFloor(args.min_cosine, args.min_recall_ratio, args.confidence)


def _sample(cfg: IndexConfig, image_size: int, images: int) -> CaptionedSample:
    """The first `images` usable rows of the input shards; a ConfigError below MIN_IMAGES."""
    from icar_lab.sample import read_captioned

    sample = read_captioned(cfg.input.paths, image_size, images, cfg.input, cfg.decode)
    if len(sample) < MIN_IMAGES:
        raise ConfigError(
            f"{len(sample)} usable captioned images in {cfg.input.paths} (skipped: {sample.skipped}); "
            f"calibration needs at least {MIN_IMAGES}"
        )
    _log(f"{len(sample)} images, match key: {sample.key_source} ({len(set(sample.keys))} distinct)")
    return sample


def _run(args: argparse.Namespace, cfg: IndexConfig, model: ModelConfig, target: Target) -> Calibration:
    """Calibrate with the flags' torch threads (the caller's thread count restored after)."""
    import torch

    from icar_lab.calibrate import CalibrationSettings, calibrate

    saved_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        encoder = _encoder(model, args.exits)
        sample = _sample(cfg, encoder.loaded.image_size, args.images)
        settings = CalibrationSettings(
            batch_size=args.batch_size,
            timing_images=args.timing_images,
            rounds=args.rounds,
            seed=args.seed,
            gallery_size=args.gallery_size,
        )
        return calibrate(encoder, model.name, sample, target, settings, log=_log)
    finally:
        torch.set_num_threads(saved_threads)


def _summary(result: Calibration) -> str:
    """The chosen router and its quality and cost where it was judged."""
    plan, q = result.plan, result.plan.quality
    if len(plan.routes) > 1:
        chosen = (
            f"{result.winner} scorer; routes {[r.name for r in plan.routes]} at thresholds {plan.thresholds}"
        )
        judged = "the held-back half"
    else:
        chosen, judged = f"one route, {plan.routes[0].name}", "the whole sample"
    bound = f" (lower bound {q.recall_ratio_lower:.3f})" if q.recall_ratio_lower is not None else ""
    return (
        f"{chosen}; on {judged}: mean cosine {q.mean_cosine:.4f}, R@10 ratio {q.recall_ratio:.3f}{bound}, "
        f"{q.gflops_per_image:.3f} GFLOPs/image, {1e3 * q.seconds_per_image:.2f} ms/image"
    )


def cmd_calibrate(args: argparse.Namespace) -> int:
    from icar_lab.calibrate import CalibrationError
    from icar_lab.outputs import output_path
    from icar_lab.routes_file import write_calibration
    from pipeline.cli import config_from_args

    cfg = config_from_args(args)
    if args.gallery_size is not None and args.gallery_size < MIN_IMAGES:
        raise ConfigError(f"--gallery-size {args.gallery_size}: each gallery needs {MIN_IMAGES} images")
    model = _model(args, cfg.model)
    for path in (args.out, args.report):  # refuse a path inside the package now, not after the work
        if path:
            output_path(path)
    try:
        result = _run(args, cfg, model, _target(args))
    except CalibrationError as exc:
        print(f"icar calibrate: {exc}", file=sys.stderr)
        return 1
    options = {k: v for k, v in vars(args).items() if k != "func"}
    written = write_calibration(result, model, args.out, args.report, options)
    print(_summary(result))
    print("\n".join(f"wrote {kind}: {path}" for kind, path in written.items()))
    return 0
