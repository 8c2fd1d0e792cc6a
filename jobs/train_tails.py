"""Tune tails for token paths of a frozen open_clip model: the last blocks, final LayerNorm and projection,
trained on the tokens each merge schedule leaves (dual path: caption InfoNCE + distillation to full depth).

    python jobs/train_tails.py --paths '[{"merge": "tome", "merge_keep": 0.65, "merge_floor": 8}]' \
        --out results/training/icar-tiny-vit.tails.safetensors

Reads the model's heads file (default: the shipped one), adds one tail per path (replacing a tail the file
already has for that path) and writes the result to --out with a JSON summary beside it: exit heads and
tails in one file, stamped with the model's fingerprint. Routes with `tuned: true` use it via
model.heads=<that file>; calibration and the frontier measure every tuned path the heads carry.
"""

from __future__ import annotations

import argparse
import json

import torch

from icar_lab.catalogue import route
from icar_lab.outputs import output_path
from icar_lab.training.tails import TailSettings, train_tails
from pipeline.config import ConfigError, ModelConfig
from pipeline.encode.heads import ExitHeads
from pipeline.encode.model import load_model, resolve_heads


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="icar-tiny-vit", help="open_clip model name")
    parser.add_argument("--pretrained", default=None, help="tag or checkpoint (default: the embedded one)")
    parser.add_argument("--heads", default=None, help="heads file to add to (default: the model's own)")
    parser.add_argument("--paths", required=True, help="JSON list of merge-only token paths")
    parser.add_argument("--tail-blocks", type=int, default=TailSettings.tail_blocks)
    parser.add_argument("--images", type=int, default=TailSettings.images)
    parser.add_argument("--epochs", type=int, default=TailSettings.epochs)
    parser.add_argument(
        "--distill-weight",
        type=float,
        default=TailSettings.distill_weight,
        help="weight of the distillation to full depth against the caption InfoNCE",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        out = output_path(args.out)
        model_cfg = ModelConfig(name=args.model, pretrained=args.pretrained, heads=args.heads)
        routes = [route(tuned=True, **path) for path in json.loads(args.paths)]
    except (ConfigError, ValueError) as exc:
        raise SystemExit(f"train_tails: {exc}") from None

    torch.set_num_threads(args.threads)
    loaded = load_model(model_cfg)
    heads_path = resolve_heads(model_cfg)
    visual = loaded.model.visual
    heads = ExitHeads.load(heads_path, visual) if heads_path else ExitHeads(visual, [])
    settings = TailSettings(
        tail_blocks=args.tail_blocks,
        images=args.images,
        epochs=args.epochs,
        seed=args.seed,
        distill_weight=args.distill_weight,
    )
    summaries = train_tails(loaded, heads, routes, settings)
    model_id = ModelConfig(name=args.model, pretrained=args.pretrained).model_id
    heads.save(out, model_id)
    summary = {"command_args": vars(args), "model_id": model_id, "heads_in": heads_path, "tails": summaries}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({s["route"]: s["train_cosine_to_full"] for s in summaries}))


if __name__ == "__main__":
    main()
