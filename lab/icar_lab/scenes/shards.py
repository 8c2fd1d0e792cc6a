"""Write scenes as img2dataset-style parquet shards (plus ground-truth columns for evaluation)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from icar_lab.scenes.render import make_example
from icar_lab.scenes.splits import SPLIT_COLUMN

SHARD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("jpg", pa.binary()),  # img2dataset's column name; the bytes may be JPEG, PNG or WebP
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
        ("image_format", pa.string()),
        ("object_count", pa.int32()),
        ("background", pa.string()),
        ("complexity_level", pa.string()),
        ("scene_key", pa.string()),
        (SPLIT_COLUMN, pa.string()),  # the scene stream: calibration refuses the test split's rows
    ]
)


def scene_rows(seed: int, split: str, start: int, count: int) -> pa.Table:
    """Rows [start, start+count) of a split as an Arrow table with SHARD_SCHEMA."""
    cols: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
    for index in range(start, start + count):
        scene, data, fmt = make_example(seed, split, index)
        key = f"{split}{index:09d}"
        row = {
            "key": key,
            "url": f"https://scenes.example/{split}/{key}.{fmt}",
            "caption": scene.caption,
            "jpg": data,
            "status": "success",
            "error_message": None,
            "width": 256,
            "height": 256,
            "original_width": 256,
            "original_height": 256,
            "sha256": hashlib.sha256(data).hexdigest(),
            "image_format": fmt,
            "object_count": scene.object_count,
            "background": scene.background,
            "complexity_level": scene.complexity_level,
            "scene_key": scene.scene_key,
            SPLIT_COLUMN: split,
        }
        for name, value in row.items():
            cols[name].append(value)
    return pa.Table.from_pydict(cols, schema=SHARD_SCHEMA)


def write_corpus(out_dir: str | Path, seed: int, split: str, num_images: int, shard_size: int) -> list[Path]:
    """Write `num_images` scenes as shards named like img2dataset's (00000.parquet, …)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, num_images, shard_size)):
        table = scene_rows(seed, split, start, min(shard_size, num_images - start))
        path = out / f"{shard:05d}.parquet"
        pq.write_table(table, path, row_group_size=max(1, shard_size // 4))
        paths.append(path)
    return paths
