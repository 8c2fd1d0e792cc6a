"""The training loop every head and tail fit shares: shuffled epochs with a cosine-annealed learning rate,
optionally choosing the epoch by a held-out score, checkpointing each epoch so that an interrupted fit
continues where it stopped, and running in reduced precision on a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from icar_lab.training.targets import Targets


@dataclass(frozen=True)
class Precision:
    """Autocast for the training steps: bf16 (fp16 with loss scaling where bf16 is missing) on CUDA, full
    precision on CPU, where reduced-precision matmuls are slower, not faster."""

    dtype: torch.dtype | None = None

    @classmethod
    def for_device(cls, device: torch.device) -> Precision:
        if device.type != "cuda":
            return cls()
        return cls(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.dtype is None:
            yield
            return
        with torch.autocast("cuda", dtype=self.dtype):
            yield

    def scaler(self) -> torch.amp.GradScaler:
        """fp16 gradients underflow without loss scaling; bf16's range needs none (a pass-through)."""
        return torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

    @property
    def name(self) -> str:
        return "fp32" if self.dtype is None else str(self.dtype).removeprefix("torch.")


class EpochKeeper:
    """After each epoch: scores `trainee` on held-out rows (`score`, higher is better), remembers the best
    epoch's weights, and (with `path`) saves everything a resumed fit needs to continue exactly: weights,
    optimizer and schedule state, the random state that shuffles the next epoch, the history."""

    def __init__(self, trainee: nn.Module, score: Callable[[], float] | None, path: Path | None):
        self.trainee, self.score, self.path = trainee, score, path
        self.best: dict | None = None
        self.best_score = -math.inf

    def resume(self, optimizer: torch.optim.Optimizer, schedule) -> tuple[int, list[dict]]:
        """(the epoch to start at, the history so far): from the checkpoint when there is one."""
        if self.path is None or not self.path.exists():
            return 0, []
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        self.trainee.load_state_dict(state["trainee"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        self.best, self.best_score = state["best"], state["best_score"]
        return len(state["history"]), state["history"]

    def end_epoch(self, history: list[dict], optimizer: torch.optim.Optimizer, schedule) -> None:
        if self.score is not None:
            score = history[-1]["heldout_cosine"] = self.score()
            if score > self.best_score:
                self.best, self.best_score = copy.deepcopy(self.trainee.state_dict()), score
        if self.path is not None:
            state = {
                "trainee": self.trainee.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "rng": torch.get_rng_state(),
                "best": self.best,
                "best_score": self.best_score,
                "history": history,
            }
            partial = self.path.with_suffix(".partial")
            torch.save(state, partial)
            os.replace(partial, self.path)  # a kill mid-save leaves the previous epoch's checkpoint whole

    def restore_best(self) -> None:
        """Leave the trainee at the best held-out epoch's weights (without a score: the last epoch's)."""
        if self.best is not None:
            self.trainee.load_state_dict(self.best)


def _scores(entry: dict) -> str:
    held_out = f", held-out cosine {entry['heldout_cosine']:.4f}" if "heldout_cosine" in entry else ""
    return f"loss {entry['loss']:.4f}{held_out}"


def fit(
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    log: Callable[[str], None],
    label: str = "",
    keeper: EpochKeeper | None = None,
    precision: Precision | None = None,
) -> list[dict]:
    """`epochs` passes over `n` rows in shuffled batches, one optimizer step per batch on `loss_of(rows)`,
    the learning rate cosine-annealed to zero: the mean loss per epoch (and, with a scoring `keeper`, the
    held-out score, the weights left at the best epoch's)."""
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * math.ceil(n / batch_size))
    start, history = keeper.resume(optimizer, schedule) if keeper else (0, [])
    if start:
        log(f"{label}resuming at epoch {start} of {epochs}")
    precision = precision or Precision()
    scaler, started = precision.scaler(), time.time()
    for epoch in range(start, epochs):
        total = 0.0
        for rows in torch.randperm(n).split(batch_size):
            with precision.autocast():
                loss = loss_of(rows)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            total += float(loss.detach()) * len(rows)
        history.append({"epoch": epoch, "loss": total / n})
        if keeper:
            keeper.end_epoch(history, optimizer, schedule)
        log(f"{label}epoch {epoch}: {_scores(history[-1])} ({time.time() - started:.0f} s)")
    if keeper:
        keeper.restore_best()
    return history


@dataclass
class Fitting:
    """How one fit runs beyond its settings: the rows held out to choose its epoch by, where its epochs
    are checkpointed (and resumed from), and its precision. The lab's scene jobs use the defaults."""

    heldout: Targets | None = None
    checkpoint: Path | None = None
    precision: Precision = field(default_factory=Precision)

    def keeper(self, trainee: nn.Module, score: Callable[[Targets], float]) -> EpochKeeper:
        """An EpochKeeper for `trainee`, scoring it with `score` on the held-out rows (if any)."""
        held = self.heldout
        return EpochKeeper(trainee, None if held is None else lambda: score(held), self.checkpoint)
