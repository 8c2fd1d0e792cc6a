"""Train exit heads for a frozen open_clip model (dual path: caption InfoNCE + distillation to full depth).

    python jobs/train_heads.py --depths 4 6 8 10 --images 8000 --seed 0 \
        --reduced-routes '[{"name": "tome4", "merge": "tome", "merge_r": 4}]' \
        --out results/training/icar-tiny-vit.heads.safetensors

Writes the heads (stamped with the base model's fingerprint) and a JSON summary next to them; use them
with model.heads=<that file> (or `icar calibrate --heads`). The shipped heads in pipeline/models/ are
read-only package data, replaced only by a deliberate copy.
With --finetune-backbone the vision tower trains too (lr --backbone-lr; full depth joins the loss,
distilled toward the original model): the tuned checkpoint is written to --backbone-out and the heads are
stamped for it, so use both together (model.pretrained = that checkpoint, model.heads = these heads).
Fine-tuning runs the backbone every step, so use far fewer epochs than the frozen default.
"""

from __future__ import annotations

import argparse
import json

import torch

from icar_lab.outputs import output_path
from icar_lab.training.clip import save_checkpoint
from icar_lab.training.heads import HeadSettings, train_heads
from pipeline.config import ConfigError, ModelConfig, RouteSpec
from pipeline.encode.model import load_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="icar-tiny-vit", help="open_clip model name")
    parser.add_argument("--pretrained", default=None, help="tag or checkpoint (default: the embedded one)")
    parser.add_argument("--depths", type=int, nargs="+", default=HeadSettings().depths)
    parser.add_argument("--images", type=int, default=HeadSettings.images)
    parser.add_argument("--epochs", type=int, default=HeadSettings.epochs)
    parser.add_argument("--distill-weight", type=float, default=HeadSettings.distill_weight)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reduced-routes", default="[]", help="JSON list of RouteSpec dicts")
    parser.add_argument("--finetune-backbone", action="store_true", help="train the vision tower too")
    parser.add_argument("--backbone-lr", type=float, default=HeadSettings.backbone_lr)
    parser.add_argument("--backbone-out", default=None, help="default: <out>.backbone.safetensors")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/training/icar-tiny-vit.heads.safetensors")
    args = parser.parse_args()
    try:
        out = output_path(args.out)
        backbone = output_path(args.backbone_out or out.with_suffix(".backbone.safetensors"))
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None

    torch.set_num_threads(args.threads)
    model_cfg = ModelConfig(name=args.model, pretrained=args.pretrained)
    loaded = load_model(model_cfg)
    settings = HeadSettings(
        depths=args.depths,
        images=args.images,
        seed=args.seed,
        epochs=args.epochs,
        distill_weight=args.distill_weight,
        reduced_routes=[RouteSpec(**r) for r in json.loads(args.reduced_routes)],
        finetune_backbone=args.finetune_backbone,
        backbone_lr=args.backbone_lr,
    )
    heads, report = train_heads(loaded, settings)
    if args.finetune_backbone:
        save_checkpoint(loaded.model, backbone, torch.float32)  # exact: the heads' fingerprint is of these
        model_cfg = ModelConfig(name=args.model, pretrained=str(backbone))
        print(f"fine-tuned checkpoint: {backbone}")
    heads.save(out, model_cfg.model_id)
    summary = {"command_args": vars(args), "model_id": model_cfg.model_id, **report}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(report["train_cosine_to_full"]))


if __name__ == "__main__":
    main()
