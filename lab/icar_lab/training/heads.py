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

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from icar_lab.heldout import load_heldout
from icar_lab.metrics import multi_positive_infonce
from icar_lab.scenes.splits import HEADS
from pipeline.config import RouteSpec
from pipeline.encode.adaptive import AdaptiveViT
from pipeline.encode.heads import ExitHeads, model_fingerprint
from pipeline.encode.model import LoadedModel, normalize_uint8


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


@dataclass
class Targets:
    """What every exit is pulled toward, computed once with the original (frozen) model."""

    images: np.ndarray  # uint8 [N, S, S, 3]
    full: torch.Tensor  # [N, D] original full-depth image embeddings
    text: torch.Tensor  # [N, D] caption embeddings
    key_ids: torch.Tensor  # [N] scene id: captions of equal scenes are all positives

    def rows(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Every row index, in order, in batches of `batch`."""
        return torch.arange(len(self.full)).split(batch)


def load_targets(loaded: LoadedModel, split: str, images: int, seed: int, log) -> Targets:
    """The first `images` scenes of `split`, their full-depth and caption embeddings."""
    sample = load_heldout(split, images, loaded.image_size, seed)
    model, full, text, started = loaded.model, [], [], time.time()
    with torch.inference_mode():
        for i in range(0, len(sample), 256):
            x = normalize_uint8(torch.from_numpy(sample.images[i : i + 256]), loaded.mean, loaded.std)
            full.append(model.encode_image(x, normalize=True))
            text.append(model.encode_text(loaded.tokenizer(sample.captions[i : i + 256]), normalize=True))
            log(f"targets {min(i + 256, len(sample))}/{len(sample)} images ({time.time() - started:.0f} s)")
    key_ids = torch.as_tensor(np.unique(np.asarray(sample.keys), return_inverse=True)[1])
    return Targets(sample.images, torch.cat(full), torch.cat(text), key_ids)


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


def dual_path_loss(emb: torch.Tensor, t: Targets, rows: torch.Tensor, scale: torch.Tensor, weight: float):
    """InfoNCE against the captions + distillation toward the original full-depth embedding."""
    contrastive = multi_positive_infonce(emb, t.text[rows], t.key_ids[rows], scale)
    return contrastive + weight * (1 - (emb * t.full[rows]).sum(-1)).mean()


def normalized_pixels(loaded: LoadedModel, t: Targets, rows: torch.Tensor) -> torch.Tensor:
    return normalize_uint8(torch.from_numpy(t.images[rows.numpy()]), loaded.mean, loaded.std)


def fit(
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    log: Callable[[str], None],
    label: str = "",
) -> list[dict]:
    """`epochs` passes over `n` rows in shuffled batches, one optimizer step per batch on `loss_of(rows)`,
    the learning rate cosine-annealed to zero: the mean loss per epoch."""
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * math.ceil(n / batch_size))
    history, started = [], time.time()
    for epoch in range(epochs):
        total = 0.0
        for rows in torch.randperm(n).split(batch_size):
            loss = loss_of(rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(rows)
        history.append({"epoch": epoch, "loss": total / n})
        log(f"{label}epoch {epoch}: loss {total / n:.4f} ({time.time() - started:.0f} s)")
    return history


def train_heads(loaded: LoadedModel, settings: HeadSettings, log=print) -> tuple[ExitHeads, dict]:
    """Train exit heads at `settings.depths`; with `finetune_backbone`, `loaded.model.visual` changes too
    (and the heads are stamped with the fine-tuned tower's fingerprint)."""
    torch.manual_seed(settings.seed)
    t = load_targets(loaded, settings.split, settings.images, settings.seed, log)
    visual = loaded.model.visual
    heads = ExitHeads(visual, settings.depths)
    vit = AdaptiveViT(visual, heads)
    paths = _token_paths(settings)
    # frozen: the exit tokens never change, so compute them once; fine-tuned: every step, with gradients
    depths = settings.depths + [vit.depth] if settings.finetune_backbone else settings.depths
    cached = None if settings.finetune_backbone else _cache_exit_tokens(loaded, vit, t, paths, depths)
    groups = [{"params": heads.parameters(), "lr": settings.lr}]
    if settings.finetune_backbone:
        visual.requires_grad_(True)
        groups.append({"params": visual.parameters(), "lr": settings.backbone_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    scale = loaded.model.logit_scale.exp().detach()
    heads.train()

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        loss = torch.zeros(())
        pixels = None if cached else normalized_pixels(loaded, t, rows)
        for p, route in enumerate(paths):
            tokens = cached[p][rows] if cached else exit_tokens(vit, pixels, route, depths)
            for j, depth in enumerate(depths):
                emb = F.normalize(vit.project(tokens[:, j], depth, route), dim=-1)
                loss = loss + dual_path_loss(emb, t, rows, scale, settings.distill_weight)
        return loss

    history = fit(loss_of, len(t.full), settings.epochs, settings.batch_size, optimizer, log)
    heads.eval()
    if settings.finetune_backbone:
        visual.requires_grad_(False)
        heads.fingerprint = model_fingerprint(visual)  # the heads belong to the tower they were tuned with
    plain_path = paths[0]
    plain = _cache_exit_tokens(loaded, vit, t, [plain_path], [*settings.depths, vit.depth])[0]
    with torch.no_grad():
        embedded = [
            F.normalize(vit.project(plain[:, j], depth, plain_path), dim=-1)
            for j, depth in enumerate([*settings.depths, vit.depth])
        ]
    agreement = {
        depth: float((emb * t.full).sum(-1).mean())
        for depth, emb in zip([*settings.depths, vit.depth], embedded, strict=True)
    }
    log(f"train-set mean cosine to the original full depth, per exit: {agreement}")
    return heads, {"history": history, "train_cosine_to_full": agreement}


@torch.inference_mode()
def _cache_exit_tokens(
    loaded: LoadedModel, vit: AdaptiveViT, t: Targets, paths: list[RouteSpec], depths: list[int]
) -> list[torch.Tensor]:
    """Per token path, [N, len(depths), width]: the token each exit reads."""
    return [
        torch.cat([exit_tokens(vit, normalized_pixels(loaded, t, r), route, depths) for r in t.rows(256)])
        for route in paths
    ]
