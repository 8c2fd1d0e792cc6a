"""Train exit heads for a frozen open_clip model (dual path: caption InfoNCE + distillation to full depth).

    python jobs/train_heads.py --depths 4 6 8 10 --images 8000 --seed 0 \
        --reduced-routes '[{"name": "tome4", "merge": "tome", "merge_r": 4}]'

Writes the heads (stamped with the base model's fingerprint) and a JSON summary next to them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pipeline.config import ModelConfig, RouteSpec
from pipeline.encode.model import MODELS_DIR, load_model
from pipeline.training.heads import HeadSettings, train_heads


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
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(MODELS_DIR / "icar-tiny-vit.heads.safetensors"))
    args = parser.parse_args()

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
    )
    heads, report = train_heads(loaded, settings)
    out = Path(args.out)
    heads.save(out, model_cfg.model_id)
    summary = {"command_args": vars(args), "model_id": model_cfg.model_id, **report}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(report["train_cosine_to_full"]))


if __name__ == "__main__":
    main()
