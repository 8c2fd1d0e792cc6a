"""`icar tune` (registered through the `icar.commands` entry point, like `icar calibrate`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from icar_lab.catalogue import SHIPPED_TAIL_SCHEDULES
from icar_lab.tune.request import HEADS_FILE, ROUTES_FILE, SUMMARY_FILE, TuneRequest
from pipeline.config import EMBEDDED_MODEL, ConfigError, IndexConfig

TUNE = """Distil exit heads and tuned tails for any allow-listed open_clip ViT on your own images.

    icar tune --model ViT-B-16 --pretrained <open_clip tag or checkpoint> --input <shards> --out DIR \\
        [--heads 4 6 8 10] [--schedules tome-keep70-floor8 ...] [--captioned <captioned shards>] \\
        [--images 8000] [--epochs N] [--resume]

Reads the first --images usable rows of the shards (decoded as `icar index` decodes them, at the model's
own preprocess; captions optional), holds out --heldout-share of them to choose each stage's epoch by,
and distils to the model's own full-depth embeddings: exit heads at --heads depths (dual path: plus
caption InfoNCE where rows have captions), then a tuned tail for each merge schedule. Runs as one Ray
worker (a GPU where the cluster has one, bf16 autocast); every epoch is checkpointed in DIR/checkpoints,
and --resume continues an interrupted tune from its last finished epoch. Writes DIR/heads.safetensors
and DIR/tune.json (history, held-out cosines, costs). With --captioned, then calibrates routes on that
sample as `icar calibrate` does and writes DIR/routes.yaml: `icar index --config DIR/routes.yaml`.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `icar tune`. Heavy imports happen inside the handler, so `icar --help` stays fast."""
    p = subparsers.add_parser(
        "tune",
        help="distil exit heads and tuned tails on your shards, calibrate routes for them",
        description=TUNE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="open_clip model name (a ViT the adaptive forward serves)")
    p.add_argument("--pretrained", help="open_clip tag or checkpoint path (required but for icar-tiny-vit)")
    p.add_argument("--input", nargs="+", required=True, help="parquet shards to learn on: paths, globs, dirs")
    p.add_argument("--out", required=True, help="directory for the heads, routes, summary and checkpoints")
    p.add_argument("--heads", type=int, nargs="+", help="exit depths (default: 1/3, 1/2, 2/3, 5/6 of depth)")
    p.add_argument(
        "--schedules", nargs="*", default=list(SHIPPED_TAIL_SCHEDULES),
        help="merge schedules to tune tails for, by route name (default: the embedded model's)",
    )  # fmt: skip
    p.add_argument("--captioned", nargs="+", help="captioned shards to calibrate routes on (kept apart)")
    p.add_argument("--calibration-images", type=int, default=2000, help="calibration sample size")
    p.add_argument(
        "--calibrate-args", default="", metavar="'FLAGS'",
        help="more `icar calibrate` flags, quoted: e.g. '--min-cosine 0.98 --rounds 5'",
    )  # fmt: skip
    p.add_argument("--images", type=int, default=TuneRequest.images, help="rows to learn on")
    p.add_argument("--epochs", type=int, help="epochs per stage (default: heads 30, tails 20)")
    p.add_argument("--tail-blocks", type=int, help="last blocks each tail tunes (default: half the tower)")
    p.add_argument("--heldout-share", type=float, default=TuneRequest.heldout_share)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus", type=int, default=1, help="CPUs (torch threads) of the training worker")
    p.add_argument("--resume", action="store_true", help="continue the tune whose checkpoints DIR holds")
    p.add_argument("--config", help="index config: input column mapping, decode settings, ray.address")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override a field of that config, e.g. --set input.caption_column=TEXT",
    )  # fmt: skip
    p.set_defaults(func=cmd_tune)


def tune_request(args: argparse.Namespace, cfg: IndexConfig) -> TuneRequest:
    """The request the flags make; local paths absolute, so the worker and the files written agree."""
    from icar_lab.routes_file import absolute_if_local

    if args.model != EMBEDDED_MODEL and args.pretrained is None:
        raise ConfigError(f"--pretrained is required for {args.model}: random weights have nothing to distil")
    return TuneRequest(
        model=args.model,
        pretrained=absolute_if_local(args.pretrained),
        inputs=cfg.input.paths,
        out=str(Path(args.out).expanduser().resolve()),
        depths=args.heads,
        schedules=args.schedules,
        images=args.images,
        epochs=args.epochs,
        tail_blocks=args.tail_blocks,
        heldout_share=args.heldout_share,
        seed=args.seed,
        input_cfg=cfg.input.model_dump(exclude={"paths"}),
        decode_cfg=cfg.decode.model_dump(),
        cpus=args.cpus,
        resume=args.resume,
    )


def _calibrate_argv(args: argparse.Namespace, request: TuneRequest) -> list[str]:
    """`icar calibrate`'s flags for the tuned heads on the captioned sample."""
    out = request.out_dir
    argv = ["--input", *args.captioned, "--out", str(out / ROUTES_FILE), "--model", request.model]
    argv += ["--heads", str(out / HEADS_FILE), "--images", str(args.calibration_images)]
    argv += ["--pretrained", request.pretrained] if request.pretrained else []
    argv += ["--config", args.config] if args.config else []
    return argv + [a for o in args.overrides for a in ("--set", o)] + shlex.split(args.calibrate_args)


def _cost_line(summary: dict) -> str:
    cost = summary["cost"]
    return (
        f"{cost['trainable_parameters']:,} trainable / {cost['frozen_parameters']:,} frozen parameters on "
        f"{cost['device']} ({summary['precision']}); {cost['wall_seconds_per_1000_images']:.1f} s and "
        f"{cost['peak_memory_mb_per_1000_images']:.0f} MB peak per 1,000 images"
    )


def cmd_tune(args: argparse.Namespace) -> int:
    from icar_lab.cli import run_calibrate
    from icar_lab.tune.worker import tune_on_ray
    from pipeline.cli import config_from_args
    from pipeline.cluster import init_ray

    cfg = config_from_args(args)
    request = tune_request(args, cfg)
    init_ray(cfg)
    summary = tune_on_ray(request)
    print(_cost_line(summary))
    print(json.dumps({"held_out_cosine": _held_out(summary)}))
    print(f"wrote heads: {summary['heads_file']}\nwrote summary: {request.out_dir / SUMMARY_FILE}")
    if not args.captioned:
        print(f"no --captioned sample: calibrate with icar calibrate --heads {summary['heads_file']} ...")
        return 0
    print("calibrating routes on the captioned sample", file=sys.stderr, flush=True)
    return run_calibrate(_calibrate_argv(args, request))


def _held_out(summary: dict) -> dict[str, float | None]:
    """Per stage, its chosen (best) held-out cosine to full depth."""
    return {
        stage: max((e.get("heldout_cosine", float("nan")) for e in report["history"]), default=None)
        for stage, report in summary["stages"].items()
    }
