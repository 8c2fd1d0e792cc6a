"""Scale projection: what the measured adaptive/full speed ratio would mean for indexing LAION-2B with
ViT-L-14 on N GPUs. Nothing here is measured on a GPU; every input that is not ours is an ASSUMPTION and
is printed as one."""

from __future__ import annotations

from typing import Any

IMAGES = 2_000_000_000
GPU_COUNTS = (8, 64)
FULL_IMAGES_PER_GPU_SECOND = 312.0  # ViT-L-14 per A100, clip-retrieval's published figure
USD_PER_GPU_HOUR = 2.0  # on-demand A100 order of magnitude; cloud list prices span ~1-4 $/GPU-hour


def project(speedup: float | None, speedup_source: str, gflops_ratio: float | None) -> dict[str, Any]:
    """Hours and dollars for full depth and adaptive, per GPU count; cost does not depend on N."""
    assumptions = [
        f"ASSUMPTION: ViT-L-14 full-depth throughput {FULL_IMAGES_PER_GPU_SECOND:.0f} images/s per A100 "
        "(clip-retrieval's published figure)",
        f"ASSUMPTION: ${USD_PER_GPU_HOUR:.2f} per GPU-hour",
        f"ASSUMPTION: the adaptive/full speed ratio measured here ({speedup_source}) transfers from the "
        "embedded CPU model to ViT-L-14 on GPUs",
        "ASSUMPTION: the job is encoder-bound (decode, read and write keep up; add CPU nodes if not) and "
        "scales linearly in N; start-up, retries and stragglers ignored",
        f"ASSUMPTION: {IMAGES:,} images, each encoded once",
    ]
    if gflops_ratio is not None:
        assumptions.append(
            f"for scale: the same point spends {gflops_ratio:.0%} of full-depth GFLOPs, so on a GPU that "
            f"turns every saved FLOP into saved time the speedup would be at most {1 / gflops_ratio:.2f}x"
        )
    rates = {"full depth": FULL_IMAGES_PER_GPU_SECOND}
    if speedup:
        rates["adaptive"] = FULL_IMAGES_PER_GPU_SECOND * speedup
    rows = []
    for name, per_gpu in rates.items():
        gpu_hours = IMAGES / per_gpu / 3600
        for n in GPU_COUNTS:
            rows.append(
                {
                    "encoder": name,
                    "gpus": n,
                    "images_per_second_per_gpu": per_gpu,
                    "hours": gpu_hours / n,
                    "gpu_hours": gpu_hours,
                    "usd": gpu_hours * USD_PER_GPU_HOUR,
                }
            )
    return {
        "images": IMAGES,
        "speedup": speedup,
        "speedup_source": speedup_source,
        "assumptions": assumptions,
        "rows": rows,
    }
