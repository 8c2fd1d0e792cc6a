"""Dual-path training of the exit heads, with the backbone frozen (default) or fine-tuned.

Loss per exit depth = InfoNCE(exit embedding, caption embedding)            (caption-level quality)
                    + distill_weight * (1 - cos(exit embedding, full-depth embedding))  (instance-level)
Frozen: the backbone runs once per image; its CLS tokens at every exit depth are cached, so the heads
train for many epochs in seconds. Fine-tuned: the vision tower trains with the heads (a much smaller
learning rate), and full depth joins the loss, distilled toward the original model's embeddings, so the
final embedding stays in the text tower's space; the result is a new model whose checkpoint must be
saved with the heads. Heads see the tokens of every route they serve (plain and reduced), so they stay
calibrated when an exit is combined with merging or pruning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from icar_lab.scenes.splits import HEADS
from icar_lab.training.loop import Fitting, fit
from icar_lab.training.targets import Targets, dual_path_loss, load_targets, mean_cosine, normalized_pixels
from pipeline.config import RouteSpec
from pipeline.encode.adaptive import AdaptiveViT
from pipeline.encode.heads import ExitHeads, model_fingerprint
from pipeline.encode.model import LoadedModel


@dataclass
class HeadSettings:
    depths: list[int] = field(default_factory=lambda: [4, 6, 8, 10])
    images: int = 8000
    seed: int = 0
    split: str = HEADS
    epochs: int = 30
    batch_size: int = 512
    lr: float = 2e-3
    distill_weight: float = 4.0
    reduced_routes: list[RouteSpec] = field(default_factory=list)  # extra token paths the heads must serve
    finetune_backbone: bool = False  # also train the vision tower: a new model, saved beside the heads
    backbone_lr: float = 1e-5


def _token_paths(settings: HeadSettings) -> list[RouteSpec]:
    return [RouteSpec(name="plain"), *settings.reduced_routes]


def exit_tokens(vit: AdaptiveViT, pixels: torch.Tensor, route: RouteSpec, depths: list[int]) -> torch.Tensor:
    """[B, len(depths), C]: the token each exit in `depths` (ascending) reads under `route`, in one pass
    through the deepest of them."""
    groups, done, pooled = vit.stem(pixels), 0, []
    for depth in depths:
        groups = vit.run_blocks(groups, done, depth, route)
        pooled.append(vit.pool(groups, depth, route))
        done = depth
    return torch.stack(pooled, dim=1)


def train_heads(loaded: LoadedModel, settings: HeadSettings, log=print) -> tuple[ExitHeads, dict]:
    """Train exit heads at `settings.depths` on the first `settings.images` scenes of `settings.split`;
    with `finetune_backbone`, `loaded.model.visual` changes too (and the heads are stamped with the
    fine-tuned tower's fingerprint)."""
    t = load_targets(loaded, settings.split, settings.images, settings.seed, log)
    heads = ExitHeads(loaded.model.visual, settings.depths)
    return heads, fit_heads(loaded, heads, settings, t, log)


def fit_heads(
    loaded: LoadedModel,
    heads: ExitHeads,
    settings: HeadSettings,
    t: Targets,
    log=print,
    fitting: Fitting | None = None,
) -> dict:
    """Fit `heads` (on the model's device) to `t`: their training history and each exit's train-set
    mean cosine to full depth."""
    fitting = fitting or Fitting()
    torch.manual_seed(settings.seed)
    visual = loaded.model.visual
    vit = AdaptiveViT(visual, heads)
    paths = _token_paths(settings)
    # frozen: the exit tokens never change, so compute them once; fine-tuned: every step, with gradients
    depths = settings.depths + [vit.depth] if settings.finetune_backbone else settings.depths
    cached = None if settings.finetune_backbone else _cache_exit_tokens(loaded, vit, t, paths, depths)
    optimizer, trainee = _optimizer(heads, visual, settings)
    scale = loaded.model.logit_scale.exp().detach()
    heads.train()

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        loss = torch.zeros((), device=t.full.device)
        pixels = None if cached else normalized_pixels(loaded, t, rows)
        for p, route in enumerate(paths):
            tokens = cached[p][rows] if cached else exit_tokens(vit, pixels, route, depths)
            for j, depth in enumerate(depths):
                emb = F.normalize(vit.project(tokens[:, j], depth, route), dim=-1)
                loss = loss + dual_path_loss(emb, t, rows, scale, settings.distill_weight)
        return loss

    keeper = fitting.keeper(trainee, lambda held: _mean(exit_cosines(loaded, vit, held, settings.depths)))
    history = fit(
        loss_of, len(t), settings.epochs, settings.batch_size, optimizer, log, "heads ", keeper,
        fitting.precision,
    )  # fmt: skip
    heads.eval()
    if settings.finetune_backbone:
        visual.requires_grad_(False)
        heads.fingerprint = model_fingerprint(visual)  # the heads belong to the tower they were tuned with
    agreement = exit_cosines(loaded, vit, t, [*settings.depths, vit.depth])
    log(f"train-set mean cosine to the original full depth, per exit: {agreement}")
    return {"history": history, "train_cosine_to_full": agreement}


def _optimizer(
    heads: ExitHeads, visual: nn.Module, settings: HeadSettings
) -> tuple[torch.optim.Optimizer, nn.Module]:
    """AdamW over the heads (and, fine-tuning, the tower at its own smaller rate), and what it trains."""
    groups = [{"params": heads.parameters(), "lr": settings.lr}]
    if not settings.finetune_backbone:
        return torch.optim.AdamW(groups, weight_decay=0.01), heads
    visual.requires_grad_(True)
    groups.append({"params": visual.parameters(), "lr": settings.backbone_lr})
    return torch.optim.AdamW(groups, weight_decay=0.01), nn.ModuleList([heads, visual])


def _mean(values: dict) -> float:
    return sum(values.values()) / len(values)


def exit_cosines(loaded: LoadedModel, vit: AdaptiveViT, t: Targets, depths: list[int]) -> dict[int, float]:
    """Per exit depth (ascending), the plain path's mean cosine to the full-depth targets of `t`."""
    plain = RouteSpec(name="plain")
    tokens = _cache_exit_tokens(loaded, vit, t, [plain], depths)[0]

    def embed(j: int, depth: int):
        return lambda rows: F.normalize(vit.project(tokens[rows, j], depth, plain), dim=-1)

    return {depth: mean_cosine(embed(j, depth), t) for j, depth in enumerate(depths)}


@torch.inference_mode()
def _cache_exit_tokens(
    loaded: LoadedModel, vit: AdaptiveViT, t: Targets, paths: list[RouteSpec], depths: list[int]
) -> list[torch.Tensor]:
    """Per token path, [N, len(depths), width]: the token each exit reads."""
    return [
        torch.cat([exit_tokens(vit, normalized_pixels(loaded, t, r), route, depths) for r in t.rows(256)])
        for route in paths
    ]
