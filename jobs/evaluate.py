"""Held-out retrieval quality of a model (default: the trained embedded one AND a random-init baseline).

    python jobs/evaluate.py                                  # trained embedded vs random init, 2000 scenes
    python jobs/evaluate.py --model-pretrained ckpt.safetensors --count 500
    python jobs/evaluate.py --random-init                    # the random-init baseline only
    python jobs/evaluate.py --table-config my-index.yaml     # score a table `icar index --config` wrote

Writes <out>/quality.json and <out>/quality.md (table mode: table_quality.*) and prints the markdown.
Recall counts a hit whenever a retrieved item has the query's scene key (the facts its caption states).
The random-init model has the same config, so "trained minus random" is what training bought.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from icar_lab.heldout import load_heldout
from icar_lab.quality import (
    QualityReport,
    evaluate_encoder,
    evaluate_table,
    reports_markdown,
)
from icar_lab.scenes.splits import TEST
from pipeline.config import EMBEDDED_MODEL, ConfigError, ModelConfig, RouteSpec, load_config
from pipeline.encode.model import load_model
from pipeline.encode.routed import RoutedEncoder


def _write(out_dir: Path, stem: str, payload: dict, markdown: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown + "\n")
    print(f"\nwrote {out_dir / stem}.json and .md", file=sys.stderr)


def run_models(args: argparse.Namespace) -> int:
    cfg = ModelConfig(name=args.model_name, pretrained=args.model_pretrained)
    started = time.perf_counter()
    heldout = load_heldout(args.split, args.count, args.image_size, args.seed, args.cache_dir or None)
    print(f"{len(heldout)} held-out scenes ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    runs: list[tuple[str, str | bool | None]] = []
    if not args.random_init:
        runs.append((f"trained ({cfg.model_id})", True))
    if args.random_init or not args.no_baseline:
        runs.append((f"random init ({cfg.name})", False))
    reports: list[QualityReport] = []
    for name, pretrained in runs:
        torch.manual_seed(args.seed)  # the random-init baseline is the same weights on every run
        loaded = load_model(cfg, pretrained=pretrained)
        if loaded.image_size != args.image_size:
            raise SystemExit(
                f"model {cfg.name} takes {loaded.image_size}px images; pass --image-size {loaded.image_size}"
            )
        encoder = RoutedEncoder(loaded, [RouteSpec(name="full")])
        report = evaluate_encoder(encoder, heldout, batch_size=args.batch_size, name=name)
        report.extra["weights"] = "random" if pretrained is False else (args.model_pretrained or "embedded")
        reports.append(report)
        print(f"evaluated {name}", file=sys.stderr)
    markdown = "\n\n".join(
        [
            f"## Held-out retrieval quality ({len(heldout)} scenes, split {args.split!r}, seed {args.seed})",
            reports_markdown(reports),
            *[r.to_markdown() for r in reports],
        ]
    )
    payload = {
        "heldout": {"seed": args.seed, "split": args.split, "count": len(heldout), "size": args.image_size},
        "reports": [r.to_dict() for r in reports],
    }
    print(markdown)
    _write(Path(args.out), "quality", payload, markdown)
    return 0


def run_table(args: argparse.Namespace) -> int:
    cfg = load_config(args.table_config, args.overrides)
    report = evaluate_table(cfg, args.shards or None, name=f"{cfg.output.uri}/{cfg.output.table}")
    markdown = "\n\n".join(
        [f"## Quality of table {cfg.output.table!r} at {cfg.output.uri}", report.to_markdown()]
    )
    print(markdown)
    _write(Path(args.out), "table_quality", {"reports": [report.to_dict()]}, markdown)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-name", default=EMBEDDED_MODEL, help="open_clip model name")
    parser.add_argument(
        "--model-pretrained", default=None, help="checkpoint path or open_clip tag; default: embedded"
    )
    parser.add_argument(
        "--random-init", action="store_true", help="evaluate only a randomly initialised model"
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the random-init baseline in the default run"
    )
    parser.add_argument("--count", type=int, default=2000, help="held-out scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default=TEST, help="scene stream (lab/icar_lab/scenes/splits.py)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument(
        "--cache-dir", default=".demo/cache", help="held-out .npz cache directory; '' to disable"
    )
    parser.add_argument("--out", default="results/quality", help="directory for the JSON and markdown")
    parser.add_argument("--table-config", help="score the LanceDB table this index config writes")
    parser.add_argument("--shards", nargs="+", help="corpus shards of the table (default: input.paths)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run_table(args) if args.table_config else run_models(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
