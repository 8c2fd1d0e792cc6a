"""Write a procedural scene corpus as img2dataset-style parquet shards (plus ground-truth columns).

    python jobs/make_corpus.py --out .demo/corpus --seed 0 --split demo --images 2000 --shard-size 500

The shards are valid indexing input (key, url, caption, jpg, status, … like img2dataset's) and carry
scene_key / complexity_level / object_count / background so a written table can be scored afterwards
(`python jobs/evaluate.py --table-config ...`). Same (seed, split, index) -> same scene, always.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from icar_lab.scenes.shards import write_corpus


def summarize(paths: list[Path]) -> str:
    """Counts by complexity level and background, read back from the written shards."""
    levels: Counter[str] = Counter()
    backgrounds: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    for path in paths:
        table = pq.read_table(path, columns=["complexity_level", "background", "image_format"])
        levels.update(table.column("complexity_level").to_pylist())
        backgrounds.update(table.column("background").to_pylist())
        formats.update(table.column("image_format").to_pylist())

    def line(title: str, counts: Counter[str], order: tuple[str, ...] = ()) -> str:
        names = [n for n in order if n in counts] + sorted(set(counts) - set(order))
        return f"  {title:<18}" + ", ".join(f"{n} {counts[n]}" for n in names)

    return "\n".join(
        [
            line("complexity_level:", levels, ("low", "medium", "high")),
            line("background:", backgrounds),
            line("image_format:", formats),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="directory for 00000.parquet, 00001.parquet, …")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--split",
        default="demo",
        help="scene stream: train, heads, calib, test (see lab/icar_lab/scenes/splits.py) or any name",
    )
    parser.add_argument("--images", type=int, default=1000, help="number of scenes")
    parser.add_argument("--shard-size", type=int, default=250, help="scenes per shard")
    args = parser.parse_args(argv)
    if args.images <= 0 or args.shard_size <= 0:
        parser.error("--images and --shard-size must be positive")
    started = time.perf_counter()
    paths = write_corpus(args.out, args.seed, args.split, args.images, args.shard_size)
    elapsed = time.perf_counter() - started
    print(
        f"wrote {args.images} scenes (seed {args.seed}, split {args.split!r}) as {len(paths)} shards "
        f"in {args.out} ({elapsed:.1f} s)"
    )
    print(summarize(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
