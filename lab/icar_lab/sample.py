"""A captioned sample: decoded images with their captions and match keys, the one sample type of the lab.

It comes from img2dataset-style parquet shards, read through the runtime's own reader and decoder so that
calibration sees exactly the pixels (and bytes per pixel) the indexing job would (`read_captioned`), or
from rendered scenes with their ground truth (heldout.py).

Quality needs to know which images answer which caption. Without ground truth, the caption text is the
match key: images with identical captions count as the same target. Shards that carry a match column
(the scene corpus's `scene_key`: the facts a caption states) use it instead, when every row has one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq

from icar_lab.scenes.splits import SPLIT_COLUMN
from pipeline.config import ConfigError, DecodeConfig, InputConfig
from pipeline.decode import DecodeError, Preprocess, decode_image
from pipeline.read import ShardPlan, inspect_shard, list_shards, read_chunks

MATCH_COLUMN = "scene_key"


@dataclass
class CaptionedSample:
    """Decoded images with their captions and match keys, row-aligned; rendered scenes also carry their
    ground truth (None where the rows do not)."""

    images: np.ndarray  # uint8 [N, S, S, 3], exactly what decode_image gives the pipeline
    captions: list[str]
    keys: list[str]  # rows with equal keys answer each other's captions
    bytes_per_pixel: np.ndarray  # float32 [N]: encoded size / pixels, the router's free feature
    key_source: str  # "caption" or the match column's name
    splits: set[str] = field(default_factory=set)  # scene streams of the rows, where they are named
    complexity_level: np.ndarray | None = None  # str [N]: low | medium | high
    object_count: np.ndarray | None = None  # int32 [N]
    background: np.ndarray | None = None  # str [N]
    ids: list[str] = field(default_factory=list)  # the job's row ids (shard name / key)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows passed over

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def split(self) -> str:
        """The scene stream(s) the rows were drawn from, as one name for reports."""
        return "+".join(sorted(self.splits))


def _side_columns(plan: ShardPlan, row_group: int, cfg: InputConfig, columns: list[str]) -> dict[str, list]:
    """Those of `columns` the shard has (the match key, the scene split), for one row group in the
    reader's row order; a column the shard lacks reads as all None."""
    fs, path = fsspec.core.url_to_fs(plan.shard.uri, **cfg.storage_options)
    with fs.open(path, "rb") as fh:
        meta = pq.ParquetFile(fh)
        present = [c for c in columns if c in meta.schema_arrow.names]
        table = meta.read_row_group(row_group, columns=present)
    return {c: table.column(c).to_pylist() if c in present else [None] * table.num_rows for c in columns}


def _rows(cfg: InputConfig, match_column: str | None) -> Iterator[tuple[dict[str, Any], Any, Any]]:
    """(row with id, caption, status, image; its match value or None; its scene split or None), shard by
    shard in listing order."""
    try:
        shards = list_shards(cfg)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    for shard in shards:
        plan = inspect_shard(shard, cfg)
        if plan.error:
            raise ConfigError(plan.error)
        for row_group in range(plan.row_groups):
            side = _side_columns(plan, row_group, cfg, [c for c in (match_column, SPLIT_COLUMN) if c])
            matches = side[match_column] if match_column else None
            offset = 0
            for chunk in read_chunks(plan, row_group, cfg, chunk_rows=256):
                rows = chunk.select(["id", "caption", "status", "image"]).to_pylist()
                for i, row in enumerate(rows, start=offset):
                    yield row, (matches[i] if matches is not None else None), side[SPLIT_COLUMN][i]
                offset += len(rows)


def read_captioned(
    paths: Sequence[str],
    image_size: int | Preprocess,
    limit: int,
    input_cfg: InputConfig | None = None,
    decode_cfg: DecodeConfig | None = None,
    match_column: str | None = MATCH_COLUMN,
    require_caption: bool = True,
) -> CaptionedSample:
    """The first `limit` usable rows of the shards, in listing order, decoded to `image_size` (the model's
    `Preprocess`, or a square side). Rows that are not successes, do not decode or (`require_caption`)
    lack a caption are skipped and counted; a kept row without a caption has the caption "". A shard
    without an image column is a ConfigError."""
    cfg = (input_cfg or InputConfig()).model_copy(update={"paths": list(paths)})
    decode = decode_cfg or DecodeConfig()
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size.size
    images, captions, matches, bpp, ids, splits = [], [], [], [], [], set()
    skipped: Counter[str] = Counter()
    rows = _rows(cfg, match_column)
    while len(images) < limit and (item := next(rows, None)) is not None:
        row, match, split = item
        if row["status"] != "success" or row["image"] is None:
            skipped["not a success or no image"] += 1
            continue
        if require_caption and not (row["caption"] or "").strip():
            skipped["no caption"] += 1
            continue
        try:
            pixels, (w, h) = decode_image(row["image"], image_size, decode.max_pixels, decode.use_draft)
        except DecodeError:
            skipped["does not decode"] += 1
            continue
        images.append(pixels)
        bpp.append(len(row["image"]) / (w * h))
        captions.append(row["caption"] or "")
        matches.append(match)
        ids.append(row["id"])
        if split is not None:
            splits.add(str(split))
    use_column = bool(matches) and all(m is not None for m in matches)
    return CaptionedSample(
        images=np.stack(images) if images else np.zeros((0, height, width, 3), np.uint8),
        captions=captions,
        keys=[str(m) for m in matches] if use_column else list(captions),
        bytes_per_pixel=np.asarray(bpp, np.float32),
        key_source=str(match_column) if use_column else "caption",
        splits=splits,
        ids=ids,
        skipped=dict(skipped),
    )
