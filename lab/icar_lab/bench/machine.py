"""Machine limit: the fp32 matmul rate this CPU reaches with the benchmark's thread count, and how close
each encoder gets to it. Convention: one multiply-add = 2 FLOPs (as in pipeline/encode/flops.py)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

CONVENTION = "1 multiply-add = 2 FLOPs; an n x n by n x n matmul = 2 n^3 FLOPs"


def matmul_peak(size: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """GFLOP/s of large square fp32 matmuls: the best of `repeats` is the peak, the median its typical."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)  # warm-up: thread pool and caches
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2.0 * size**3 / (time.perf_counter() - t0) / 1e9)
    return {
        "peak_gflops": max(rates),
        "median_gflops": statistics.median(rates),
        "size": size,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "convention": CONVENTION,
    }


def attach_achieved(encoders: list[dict[str, Any]], peak_gflops: float) -> None:
    """Achieved GFLOP/s = GFLOPs/image (the encoder's own analytic count) x median images/s."""
    for result in encoders:
        for p in result["points"]:
            achieved = p["gflops_per_image"] * p["images_per_second"]["median"]
            p["achieved_gflops"] = achieved
            p["fraction_of_peak"] = achieved / peak_gflops
