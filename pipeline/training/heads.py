"""Dual-path training of the exit heads with the backbone frozen.

Loss per exit depth = InfoNCE(exit embedding, caption embedding)            (caption-level quality)
                    + distill_weight * (1 - cos(exit embedding, full-depth embedding))  (instance-level)
The frozen backbone runs once per image; its CLS tokens at every exit depth are cached, so the heads
train for many epochs in seconds. Heads see the tokens of every route they serve (plain and reduced), so
they stay calibrated when an exit is combined with merging or pruning.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import RouteSpec
from pipeline.encode.adaptive import AdaptiveViT
from pipeline.encode.heads import ExitHeads
from pipeline.encode.model import LoadedModel, normalize_uint8
from pipeline.evaluate import load_heldout
from pipeline.metrics import multi_positive_infonce


@dataclass
class HeadSettings:
    depths: list[int] = field(default_factory=lambda: [4, 6, 8, 10])
    images: int = 8000
    seed: int = 0
    split: str = "heads"
    epochs: int = 30
    batch_size: int = 512
    lr: float = 2e-3
    distill_weight: float = 4.0
    reduced_routes: list[RouteSpec] = field(default_factory=list)  # extra token paths the heads must serve


@torch.inference_mode()
def exit_features(vit: AdaptiveViT, x: torch.Tensor, route: RouteSpec, depths: list[int]) -> torch.Tensor:
    """[B, len(depths), width]: the token each exit head reads, under `route`'s token path."""
    return torch.stack([vit.pooled_tokens(x, route, depth)[0] for depth in depths], dim=1)


def cache_features(loaded: LoadedModel, settings: HeadSettings, log=print):
    """Run the frozen backbone once: exit features for each token path, full-depth and text embeddings."""
    sample = load_heldout(settings.seed, settings.images, loaded.image_size, split=settings.split)
    images, captions, keys = sample.images, sample.captions, sample.scene_keys
    model = loaded.model
    vit = AdaptiveViT(model.visual, ExitHeads(model.visual, settings.depths))
    paths = [RouteSpec(name="plain")] + list(settings.reduced_routes)
    feats, full, text = [[] for _ in paths], [], []
    started = time.time()
    with torch.inference_mode():
        for i in range(0, len(images), 256):
            x = normalize_uint8(torch.from_numpy(images[i : i + 256]), loaded.mean, loaded.std)
            for p, route in enumerate(paths):
                feats[p].append(exit_features(vit, x, route, settings.depths))
            full.append(model.encode_image(x, normalize=True))
            text.append(model.encode_text(loaded.tokenizer(captions[i : i + 256]), normalize=True))
            log(f"cached {min(i + 256, len(images))}/{len(images)} images ({time.time() - started:.0f} s)")
    key_ids = torch.as_tensor(np.unique(np.asarray(keys), return_inverse=True)[1])
    return [torch.cat(f) for f in feats], torch.cat(full), torch.cat(text), key_ids


def train_heads(loaded: LoadedModel, settings: HeadSettings, log=print) -> tuple[ExitHeads, dict]:
    torch.manual_seed(settings.seed)
    feats, full, text, key_ids = cache_features(loaded, settings, log)
    heads = ExitHeads(loaded.model.visual, settings.depths)
    heads.train()
    optimizer = torch.optim.AdamW(heads.parameters(), lr=settings.lr, weight_decay=0.01)
    scale = loaded.model.logit_scale.exp().detach()
    n = full.shape[0]
    steps = settings.epochs * math.ceil(n / settings.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    history = []
    for epoch in range(settings.epochs):
        order = torch.randperm(n)
        total = 0.0
        for i in range(0, n, settings.batch_size):
            rows = order[i : i + settings.batch_size]
            loss = torch.zeros(())
            for path_feats in feats:
                for j, depth in enumerate(settings.depths):
                    emb = F.normalize(heads.project(path_feats[rows, j], depth), dim=-1)
                    contrastive = multi_positive_infonce(emb, text[rows], key_ids[rows], scale)
                    distill = (1 - (emb * full[rows]).sum(-1)).mean()
                    loss = loss + contrastive + settings.distill_weight * distill
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(rows)
        history.append({"epoch": epoch, "loss": total / n})
    heads.eval()
    with torch.no_grad():
        agreement = {
            depth: float((F.normalize(heads.project(feats[0][:, j], depth), dim=-1) * full).sum(-1).mean())
            for j, depth in enumerate(settings.depths)
        }
    log(f"train-set mean cosine to full depth per exit: {agreement}")
    return heads, {"history": history, "train_cosine_to_full": agreement}
