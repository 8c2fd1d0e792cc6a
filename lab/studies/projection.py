"""Scale projection: what the bench's measured adaptive/full speed ratio would mean for indexing LAION-2B
with ViT-L-14 on N GPUs.

    python lab/studies/projection.py                                   # from results/bench/latest.json
    python lab/studies/projection.py --bench results/bench/<UTC>.json --out /tmp/projection

Nothing here is measured on a GPU; every input that is not the bench's is an ASSUMPTION and is printed as
one. The ratio is the shipped router's on the embedded model when the bench knows its quality on the test
split, else the calibrated router's, else ToMe r=4's (speed only), each against the adaptive forward at
full depth. Writes <out>/projection.json and projection.md and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from icar_lab.catalogue import route, spec_key
from icar_lab.outputs import output_path
from icar_lab.speed import BASELINE, ROUTED

IMAGES = 2_000_000_000
GPU_COUNTS = (8, 64)
FULL_IMAGES_PER_GPU_SECOND = 312.0  # ViT-L-14 per A100, clip-retrieval's published figure
USD_PER_GPU_HOUR = 2.0  # on-demand A100 order of magnitude; cloud list prices span ~1-4 $/GPU-hour


def projection_input(embedded: dict[str, Any]) -> tuple[float | None, str, float | None]:
    """(speed ratio, where it comes from, GFLOPs ratio) of the bench's embedded-model result: the shipped
    router, with its quality on the test split when known, else the calibrated router, else ToMe (speed
    only)."""
    points = {p["name"]: p for p in embedded["points"]}
    full = points[BASELINE]["gflops_per_image"]
    eq = embedded.get("equal_quality") or {}
    if eq:
        ratio = eq["recall_ratio"]
        verdict = "equal quality" if eq["meets"] else f"below equal quality ({ratio:.3f} of full)"
        point = points[eq["point"]]
        source = f"shipped router on {embedded['model']}, {verdict} on the test split"
    elif ROUTED in points:
        point, source = points[ROUTED], f"calibrated router on {embedded['model']}, quality not established"
    else:
        point = next(p for p in embedded["points"] if p["key"] == spec_key(route(merge="tome", merge_r=4)))
        source = f"{point['name']} on {embedded['model']}: speed only, quality not established"
    # vs our own full-depth route: the work saved, without the attention-kernel gain over open_clip
    ratio = (point["speedup_vs_full_route"] or point["speedup"])["median"]
    return ratio, source + " vs the adaptive forward at full depth", point["gflops_per_image"] / full


def assumptions(speedup_source: str, gflops_ratio: float | None) -> list[str]:
    listed = [
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
        listed.append(
            f"for scale: the same point spends {gflops_ratio:.0%} of full-depth GFLOPs, so on a GPU that "
            f"turns every saved FLOP into saved time the speedup would be at most {1 / gflops_ratio:.2f}x"
        )
    return listed


def project(speedup: float | None, speedup_source: str, gflops_ratio: float | None) -> dict[str, Any]:
    """Hours and dollars for full depth and adaptive, per GPU count; cost does not depend on N."""
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
        "assumptions": assumptions(speedup_source, gflops_ratio),
        "rows": rows,
    }


def markdown(projection: dict[str, Any], bench: str) -> str:
    lines = [
        f"# Scale projection: 2B images, ViT-L-14 (from {bench})",
        "",
        *[f"- {x}" for x in projection["assumptions"]],
        "",
        "| encoder | GPUs | images/s per GPU | wall hours | GPU-hours | cost $ |",
        "|---|---|---|---|---|---|",
        *[
            f"| {row['encoder']} | {row['gpus']} | {row['images_per_second_per_gpu']:.0f} "
            f"| {row['hours']:.1f} | {row['gpu_hours']:,.0f} | {row['usd']:,.0f} |"
            for row in projection["rows"]
        ],
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bench", default="results/bench/latest.json", help="a bench result (jobs/bench.py)")
    parser.add_argument("--out", default="results/bench", help="directory for projection.json and .md")
    args = parser.parse_args()
    embedded = json.loads(Path(args.bench).read_text())["encoder"][0]
    projection = project(*projection_input(embedded))
    out = output_path(Path(args.out) / "projection.json")
    out.write_text(json.dumps(projection, indent=2))
    text = markdown(projection, args.bench)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
