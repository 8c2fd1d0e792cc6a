"""`make bench-scale` (also run by `make bench`): the write path as the work grows, written to
results/bench/scale.json, scale.md and scale.png.

    python jobs/bench_scale.py           # full: about 10 minutes on 2 cores
    python jobs/bench_scale.py --tiny    # seconds; what tests/test_bench.py runs

(a) the driver's commit cost per shard over 20,000 shards (shards 19,001-20,000 vs 1,001-2,000);
(b) start-up over a 100,000-shard manifest; (c) `icar index` on 1,000 shards of 4 images vs the same
images in 8 shards of 500; (d) two Ray nodes writing to moto's S3 server: every id once, and the bytes
the driver received per row; (e) the job with the shipped routes against the full-depth job, end to end on
20,000 images in 40 shards. Timings need an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from icar_lab.plots import pyplot

SIZES = {
    # (shards, rows per shard, commit_shards, compact_fragments), manifest shards,
    # (images, small shard, large shard, pairs), (images, shard size) on two nodes,
    # (images, shard size, pairs) routed vs full depth
    "full": ((20_000, 20, 64, 256), 100_000, (4_000, 4, 500, 2), (2_000, 50), (20_000, 500, 2)),
    "tiny": ((2_200, 4, 16, 64), 2_000, None, None, None),
}


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    a = result["commit_path"]
    per_thousand = a["per_shard_ms_by_thousand"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([1000 * (i + 1) for i in range(len(per_thousand))], per_thousand, marker="o")
    ax.set_xlabel("shards committed")
    ax.set_ylabel("driver ms per shard (mean of 1,000)")
    ax.set_ylim(0, max(per_thousand) * 1.3)
    ax.set_title("commit cost as the table grows")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="small sizes, seconds (tests)")
    parser.add_argument("--out", default="results/bench", help="output directory")
    args = parser.parse_args()
    from icar_lab.bench import scale

    commit, manifest_shards, small, nodes, routed = SIZES["tiny" if args.tiny else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict = {
        "utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
    }
    with tempfile.TemporaryDirectory(prefix="icar-scale-") as tmp:
        work = Path(tmp)
        print("(a) commit path")
        result["commit_path"] = scale.commit_path(work / "commit", *commit)
        print("(b) manifest start-up")
        result["manifest_startup"] = scale.manifest_startup(work / "startup", manifest_shards)
        if small:
            print("(c) many small shards")
            result["many_small_shards"] = scale.many_small_shards(work / "small", *small)
        if nodes:
            print("(d) two nodes on S3")
            result["two_nodes_on_s3"] = scale.two_nodes_on_s3(work / "nodes", *nodes)
        if routed:
            print("(e) routed vs full depth, end to end")
            result["routed_vs_full"] = scale.routed_vs_full(work / "routed", *routed)
    nodes_result = result.get("two_nodes_on_s3")
    per_part = None
    if nodes_result and nodes_result["driver_bytes_per_row"]:
        per_part = nodes_result["driver_bytes_per_row"] * nodes_result["images"] / nodes_result["shards"]
    result["projection"] = scale.project_writes(result["commit_path"], per_part)
    result["seconds"] = time.perf_counter() - started
    name = "scale-tiny" if args.tiny else "scale"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(scale.markdown(result))
    plot(result, out / f"{name}.png")
    print("\n" + scale.markdown(result))


if __name__ == "__main__":
    main()
