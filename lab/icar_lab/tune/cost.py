"""What a tune costs: parameters trained and frozen, wall time per stage, peak memory, each also per
1,000 images so that a tune can be sized before it runs."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

MB = 2**20


class CostMeter:
    """Wall seconds per named stage on one device, and the peak memory of the whole run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = time.perf_counter() - started

    def peak_memory_mb(self) -> float:
        """GPU: the most memory torch allocated; CPU: the process's peak resident set (model included)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB

    def report(self, trainable: nn.Module, frozen: nn.Module, images: int, targets_bytes: int) -> dict:
        total = sum(self.seconds.values())
        per_1000 = 1000 / images
        return {
            "device": str(self.device),
            "trainable_parameters": sum(p.numel() for p in trainable.parameters()),
            "frozen_parameters": sum(p.numel() for p in frozen.parameters()),
            "images": images,
            "wall_seconds": {**self.seconds, "total": total},
            "wall_seconds_per_1000_images": total * per_1000,
            "peak_memory_mb": self.peak_memory_mb(),
            "peak_memory_mb_per_1000_images": self.peak_memory_mb() * per_1000,
            "targets_mb_per_1000_images": targets_bytes / MB * per_1000,
        }
