"""Train the embedded OpenCLIP model from scratch on scenes rendered on the fly.

Images go through the same bytes -> decode_image -> uint8 path as the indexing pipeline, so the model
sees at training time exactly the pixels it will see in production.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from icar_lab.embed import embed_texts
from icar_lab.heldout import load_heldout
from icar_lab.metrics import multi_positive_infonce, recall_at_k
from icar_lab.outputs import output_path
from icar_lab.sample import CaptionedSample
from icar_lab.scenes.render import make_example
from icar_lab.scenes.splits import CALIB
from pipeline.config import EMBEDDED_MODEL, ModelConfig
from pipeline.decode import decode_image
from pipeline.encode.model import load_model, normalize_uint8


@dataclass
class TrainSettings:
    seed: int = 0
    steps: int = 2400
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 150
    eval_every: int = 200
    eval_images: int = 1000
    threads: int = 2
    out: str = "results/training"  # never the package: the shipped checkpoint is read-only


class SceneStream(IterableDataset):
    """Endless (uint8 image, caption, scene key) triples from the 'train' split."""

    def __init__(self, seed: int, image_size: int, start: int = 0):
        self.seed, self.image_size, self.start = seed, image_size, start

    def __iter__(self):
        info = get_worker_info()
        index = self.start + (info.id if info else 0)
        step = info.num_workers if info else 1
        while True:
            scene, data, _ = make_example(self.seed, "train", index)
            pixels, _ = decode_image(data, self.image_size)
            yield torch.from_numpy(pixels), scene.caption, scene.scene_key
            index += step


@torch.no_grad()
def evaluate_recall(loaded, heldout: CaptionedSample, batch: int = 256) -> dict[str, float]:
    """Held-out text->image and image->text recall, scene-key hits (the quality harness's metric)."""
    was_training = loaded.model.training
    loaded.model.eval()
    pixels = torch.from_numpy(heldout.images)
    img = torch.cat(
        [
            loaded.model.encode_image(
                normalize_uint8(pixels[i : i + batch], loaded.mean, loaded.std), normalize=True
            )
            for i in range(0, len(heldout), batch)
        ]
    )
    txt = embed_texts(loaded, heldout.captions, batch)
    loaded.model.train(was_training)
    keys = heldout.keys
    t2i, i2t = recall_at_k(txt, img, keys, keys), recall_at_k(img, txt, keys, keys)
    return {**{f"t2i_R@{k}": v for k, v in t2i.items()}, **{f"i2t_R@{k}": v for k, v in i2t.items()}}


def save_checkpoint(model: torch.nn.Module, path: Path, dtype: torch.dtype = torch.float16) -> None:
    """safetensors; fp16 halves the bytes and open_clip's loader casts back to the model's dtype. Use
    float32 when something (exit heads' fingerprint) must match the in-memory weights exactly."""
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def _optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only (not on embeddings, norms and biases)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to zero at the last step."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.5 * settings.lr * (1 + math.cos(math.pi * progress))


def _step(
    loaded, optimizer: torch.optim.Optimizer, pixels: torch.Tensor, captions: list[str], keys: list[str]
) -> float:
    """One optimizer step on a batch's multi-positive InfoNCE; the loss it stepped on."""
    model = loaded.model
    image_emb = model.encode_image(normalize_uint8(pixels, loaded.mean, loaded.std), normalize=True)
    text_emb = model.encode_text(loaded.tokenizer(list(captions)), normalize=True)
    key_ids = torch.as_tensor(np.unique(np.asarray(keys), return_inverse=True)[1])
    loss = multi_positive_infonce(image_emb, text_emb, key_ids, model.logit_scale.exp())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return float(loss.detach())


def train(settings: TrainSettings) -> dict:
    """Train from scratch; write the checkpoint, a JSONL log and a summary to `settings.out` (never the
    installed package: a ConfigError before any work)."""
    out = output_path(Path(settings.out) / f"{EMBEDDED_MODEL}.safetensors").parent
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    loaded = load_model(ModelConfig(name=EMBEDDED_MODEL), pretrained=False)
    loaded.model.train()
    optimizer = _optimizer(loaded.model, settings)
    stream = SceneStream(settings.seed, loaded.image_size)
    loader = DataLoader(stream, batch_size=settings.batch_size, num_workers=1, prefetch_factor=4)
    heldout = load_heldout(CALIB, settings.eval_images, loaded.image_size, settings.seed)  # picks the best
    log_path = out / f"{EMBEDDED_MODEL}.train_log.jsonl"
    log_path.write_text("")
    started = time.time()
    best: dict = {}
    for step, (pixels, captions, keys) in enumerate(loader):
        if step >= settings.steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        loss = _step(loaded, optimizer, pixels, captions, keys)
        record = {
            "step": step,
            "loss": loss,
            "lr": learning_rate(step, settings),
            "elapsed_s": time.time() - started,
        }
        if (step + 1) % settings.eval_every == 0 or step == settings.steps - 1:
            record.update(evaluate_recall(loaded, heldout))
            save_checkpoint(loaded.model, out / f"{EMBEDDED_MODEL}.safetensors")
            best = record
            print(json.dumps(record), flush=True)
        with log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
    summary = {
        "settings": asdict(settings),
        "out": str(out),
        "final": best,
        "train_seconds": time.time() - started,
    }
    (out / f"{EMBEDDED_MODEL}.train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
