"""What distillation pulls toward: the frozen model's own full-depth embedding of each image, and, where an
image has a caption, that caption's embedding (the contrastive half of the dual-path loss).

Any images make targets: the scene corpus's splits (the lab's jobs) or the user's shards (`icar tune`),
with or without captions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from icar_lab.heldout import load_heldout
from icar_lab.metrics import multi_positive_infonce
from pipeline.encode.model import LoadedModel, normalize_uint8

UNCAPTIONED = -1  # the key id of an image without a caption: distilled, never a contrastive pair
TARGET_BATCH = 256


@dataclass
class Targets:
    """Row-aligned images and what every exit is pulled toward, computed once with the frozen model."""

    images: np.ndarray  # uint8 [N, H, W, 3], as the job's decoder makes them
    full: torch.Tensor  # [N, D] original full-depth image embeddings (on the training device)
    text: torch.Tensor  # [N, D] caption embeddings; zeros where a row has no caption
    key_ids: torch.Tensor  # [N] match key id (equal ids: each other's positives); UNCAPTIONED where none

    def __len__(self) -> int:
        return len(self.full)

    def rows(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Every row index, in order, in batches of `batch`."""
        return torch.arange(len(self.full)).split(batch)

    def nbytes(self) -> int:
        """Memory held per image set: pixels and target embeddings."""
        return self.images.nbytes + sum(t.element_size() * t.nelement() for t in (self.full, self.text))


def _key_ids(captions: Sequence[str | None], keys: Sequence[str]) -> torch.Tensor:
    """Dense ids of `keys`, UNCAPTIONED where the row's caption is missing or blank."""
    captioned = [bool((c or "").strip()) for c in captions]
    known = sorted({k for k, c in zip(keys, captioned, strict=True) if c})
    index = {k: i for i, k in enumerate(known)}
    return torch.as_tensor([index[k] if c else UNCAPTIONED for k, c in zip(keys, captioned, strict=True)])


def targets_of(
    loaded: LoadedModel,
    images: np.ndarray,
    captions: Sequence[str | None],
    keys: Sequence[str],
    log: Callable[[str], None],
) -> Targets:
    """Full-depth embeddings of `images` and caption embeddings of the captioned rows, on the model's
    device; rows with equal `keys` count as each other's positives."""
    model, device = loaded.model, model_device(loaded)
    key_ids = _key_ids(captions, keys)
    full, text, started = [], [], time.time()
    with torch.inference_mode():
        for i in range(0, len(images), TARGET_BATCH):
            batch = slice(i, i + TARGET_BATCH)
            x = normalize_uint8(torch.from_numpy(images[batch]).to(device), loaded.mean, loaded.std)
            full.append(model.encode_image(x, normalize=True).float())
            text.append(_caption_embeddings(loaded, captions[batch], key_ids[batch]))
            done = min(i + TARGET_BATCH, len(images))
            log(f"targets {done}/{len(images)} images ({time.time() - started:.0f} s)")
    return Targets(images, torch.cat(full), torch.cat(text), key_ids.to(device))


def _caption_embeddings(loaded: LoadedModel, captions: Sequence[str | None], key_ids: torch.Tensor):
    """[len(captions), D]: the text tower's embedding of each captioned row, zeros elsewhere."""
    device = model_device(loaded)
    out = torch.zeros(len(captions), loaded.model.visual.output_dim, device=device)
    rows = torch.nonzero(key_ids != UNCAPTIONED).flatten()
    if len(rows):
        tokens = loaded.tokenizer([captions[i] for i in rows.tolist()]).to(device)
        out[rows.to(device)] = loaded.model.encode_text(tokens, normalize=True).float()
    return out


def load_targets(loaded: LoadedModel, split: str, images: int, seed: int, log) -> Targets:
    """The first `images` scenes of `split`, their full-depth and caption embeddings."""
    sample = load_heldout(split, images, loaded.image_size, seed)
    return targets_of(loaded, sample.images, sample.captions, sample.keys, log)


def model_device(loaded: LoadedModel) -> torch.device:
    return next(loaded.model.parameters()).device


def normalized_pixels(loaded: LoadedModel, t: Targets, rows: torch.Tensor) -> torch.Tensor:
    """The model's input for `rows`, on the targets' device."""
    pixels = torch.from_numpy(t.images[rows.numpy()]).to(t.full.device)
    return normalize_uint8(pixels, loaded.mean, loaded.std)


def dual_path_loss(emb: torch.Tensor, t: Targets, rows: torch.Tensor, scale: torch.Tensor, weight: float):
    """Distillation toward the original full-depth embedding, plus InfoNCE against the captions of the
    batch's captioned rows (when at least two are): the dual path where captions exist."""
    loss = weight * (1 - (emb * t.full[rows]).sum(-1)).mean()
    keys = t.key_ids[rows]
    captioned = keys != UNCAPTIONED
    if int(captioned.sum()) >= 2:
        loss = loss + multi_positive_infonce(emb[captioned], t.text[rows][captioned], keys[captioned], scale)
    return loss


def mean_cosine(embed: Callable[[torch.Tensor], torch.Tensor], t: Targets, batch: int = 512) -> float:
    """Mean cosine of `embed(rows)` (L2-normalised) to the full-depth targets, over every row."""
    with torch.no_grad():
        return float(torch.cat([(embed(r) * t.full[r]).sum(-1) for r in t.rows(batch)]).mean())
