"""Timing that survives a noisy shared machine: candidates run alternately (A B C A B C …) on the same
inputs and threads, so background load hits them alike and their ratio stays meaningful.

One speedup definition serves calibration, the frontier and the bench: the median (with min and max) of
same-round ratios. A ratio of medians would pair a candidate's quiet round with the reference's busy one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(
    candidates: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one call each per round, in turn."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return samples


def throughput(seconds: list[float], items_per_call: int) -> dict[str, float]:
    """Median items/s with its spread (min and max over rounds)."""
    rates = sorted(items_per_call / s for s in seconds)
    return {"median": statistics.median(rates), "min": rates[0], "max": rates[-1], "rounds": len(rates)}


def paired_speedup(reference: list[float], times: list[float]) -> dict[str, float]:
    """How many times faster than `reference` a candidate ran: median, min and max of the same-round
    ratios (reference seconds / candidate seconds) from `alternate`."""
    ratios = [r / t for r, t in zip(reference, times, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def best_cpu_seconds(fn: Callable[[], object], items: int, repeats: int) -> float:
    """Best-of-`repeats` CPU seconds (this process, all threads) per item of one call (noise only ever
    adds time), for costs too small to alternate against the encoder, such as the router's."""
    cpu = []
    for _ in range(repeats):
        started = time.process_time()
        fn()
        cpu.append((time.process_time() - started) / items)
    return min(cpu)
