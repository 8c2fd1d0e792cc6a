"""Tuned tails: for a token path (a merge schedule at full depth), the tower's last blocks, final LayerNorm
and projection, trained on the tokens that path leaves, with the dual-path loss of the exit heads
(InfoNCE to the captions + distillation to the untouched full depth). The blocks before the tail stay the
tower's own, so their output is computed once per image and cached; each step runs only the tail.

Merging changes what the last blocks see (fewer tokens, each standing for several patches); the tower's
own weights are not trained on that. On the embedded model, tuning the last 6 of 12 blocks for
`tome-keep65-floor8` raises the calib mean cosine to full depth from 0.974 to 0.988 (a head-only fit,
LayerNorm + projection: 0.983; the last 2 blocks: 0.985), at the route's own FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from icar_lab.scenes.splits import HEADS
from icar_lab.training.loop import Fitting, fit
from icar_lab.training.targets import Targets, dual_path_loss, load_targets, mean_cosine, normalized_pixels
from pipeline.config import RouteSpec
from pipeline.encode.adaptive import AdaptiveViT
from pipeline.encode.heads import ExitHeads, token_path_key
from pipeline.encode.model import LoadedModel
from pipeline.encode.regroup import TokenGroup


@dataclass
class TailSettings:
    tail_blocks: int = 6  # the last blocks tuned (of 12 on the embedded model)
    images: int = 6000
    seed: int = 0
    split: str = HEADS
    epochs: int = 20
    batch_size: int = 256
    block_lr: float = 1e-4
    head_lr: float = 2e-3  # the final LayerNorm and projection move further
    distill_weight: float = 16.0


@torch.no_grad()
def _tail_inputs(loaded: LoadedModel, vit: AdaptiveViT, t: Targets, route: RouteSpec, start: int):
    """Tokens and sizes entering block `start` on `route`'s (untuned) token path, for every image: one
    group per batch, as a route that neither prunes nor splits keeps every image's token count equal."""
    pixels = (normalized_pixels(loaded, t, rows) for rows in t.rows(256))
    entering = [vit.run_blocks(vit.stem(batch), 0, start, route) for batch in pixels]
    return torch.cat([g.x for (g,) in entering]), torch.cat([g.size for (g,) in entering])


def train_tail(
    loaded: LoadedModel,
    heads: ExitHeads,
    route: RouteSpec,
    settings: TailSettings,
    t: Targets,
    log=print,
    fitting: Fitting | None = None,
) -> dict:
    """Add (or replace) the tuned tail of `route`'s token path in `heads`; returns its training summary."""
    fitting = fitting or Fitting()
    torch.manual_seed(settings.seed)
    visual = loaded.model.visual
    vit = AdaptiveViT(visual, heads)
    start = vit.depth - settings.tail_blocks
    untuned = route.model_copy(update={"tuned": False})
    tuned = untuned.model_copy(update={"tuned": True})
    tail = heads.add_tail(visual, token_path_key(route), start)
    tail.requires_grad_(True)

    def embedder(targets: Targets):
        """Rows of `targets` -> their tuned embedding, the tail's input computed once."""
        x, size = _tail_inputs(loaded, vit, targets, untuned, start)

        def embed(rows: torch.Tensor) -> torch.Tensor:
            groups = vit.run_blocks([TokenGroup.whole(x[rows], size[rows])], start, vit.depth, tuned)
            return F.normalize(vit.project(vit.pool(groups, vit.depth, tuned), vit.depth, tuned), dim=-1)

        return embed

    embed = embedder(t)
    optimizer = torch.optim.AdamW(
        [
            {"params": tail.blocks.parameters(), "lr": settings.block_lr},
            {"params": [*tail.ln_post.parameters(), tail.proj], "lr": settings.head_lr},
        ],
        weight_decay=0.01,
    )
    scale = loaded.model.logit_scale.exp().detach()
    heldout_embed = embedder(fitting.heldout) if fitting.heldout is not None else None
    keeper = fitting.keeper(tail, lambda held: mean_cosine(heldout_embed, held))
    history = fit(
        lambda rows: dual_path_loss(embed(rows), t, rows, scale, settings.distill_weight),
        len(t), settings.epochs, settings.batch_size, optimizer, log, f"{route.name} ", keeper,
        fitting.precision,
    )  # fmt: skip
    tail.requires_grad_(False)
    cosine = mean_cosine(embed, t)
    return {"route": route.name, "start": start, "history": history, "train_cosine_to_full": cosine}


def train_tails(
    loaded: LoadedModel, heads: ExitHeads, routes: list[RouteSpec], settings: TailSettings, log=print
) -> list[dict]:
    """Tune a tail for each of `routes`' token paths, all on the same scenes of `settings.split`."""
    t = load_targets(loaded, settings.split, settings.images, settings.seed, log)
    return [train_tail(loaded, heads, route, settings, t, log) for route in routes]
