"""Held-out scene sets: rendered, decoded exactly as the pipeline decodes, cached as .npz.

Training, calibration, evaluation and benchmarks all read their scenes here, so a split means the same
images everywhere; which split may be used for what is in `lab/icar_lab/scenes/splits.py`.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from icar_lab.sample import MATCH_COLUMN, CaptionedSample
from icar_lab.scenes import render as _render_module
from icar_lab.scenes.render import make_example
from pipeline import decode as _decode_module
from pipeline.decode import decode_image

# what the cache stores of a rendered set (every row's scene key is its match key; one split per set)
CACHED = ("images", "captions", "keys", "bytes_per_pixel", "complexity_level", "object_count", "background")


def _renderer_version() -> str:
    """Hash of the renderer and decoder sources and the cached fields: older caches are never reused."""
    digest = hashlib.sha256()
    for module in (_render_module, _decode_module):
        digest.update(inspect.getsource(module).encode())
    digest.update(",".join(CACHED).encode())
    return digest.hexdigest()[:12]


def _cache_path(cache_dir: str | Path, seed: int, split: str, count: int, image_size: int) -> Path:
    name = f"heldout-{split}-seed{seed}-n{count}-{image_size}px-{_renderer_version()}.npz"
    return Path(cache_dir) / name


def _scene_set(split: str, columns: dict[str, np.ndarray | list]) -> CaptionedSample:
    """A rendered set from its columns (CACHED), keyed by scene key."""
    return CaptionedSample(
        images=np.asarray(columns["images"]),
        captions=[str(c) for c in columns["captions"]],
        keys=[str(k) for k in columns["keys"]],
        bytes_per_pixel=np.asarray(columns["bytes_per_pixel"], np.float32),
        key_source=MATCH_COLUMN,
        splits={split},
        complexity_level=np.asarray(columns["complexity_level"], dtype=str),
        object_count=np.asarray(columns["object_count"], dtype=np.int32),
        background=np.asarray(columns["background"], dtype=str),
    )


def _render(seed: int, split: str, count: int, image_size: int) -> CaptionedSample:
    columns: dict[str, Any] = {name: [] for name in CACHED}
    columns["images"] = np.empty((count, image_size, image_size, 3), np.uint8)
    for index in range(count):
        scene, data, _ = make_example(seed, split, index)
        columns["images"][index], (width, height) = decode_image(data, image_size)
        columns["bytes_per_pixel"].append(len(data) / (width * height))
        columns["captions"].append(scene.caption)
        columns["keys"].append(scene.scene_key)
        columns["complexity_level"].append(scene.complexity_level)
        columns["object_count"].append(scene.object_count)
        columns["background"].append(scene.background)
    return _scene_set(split, columns)


def _write_cache(path: Path, heldout: CaptionedSample) -> None:
    """Written atomically, so concurrent runs cannot read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **{name: np.asarray(getattr(heldout, name)) for name in CACHED})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_heldout(
    split: str,
    count: int = 2000,
    image_size: int = 128,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> CaptionedSample:
    """Render (or read from the .npz cache) the first `count` scenes of `split` (calib or test: see
    scenes/splits.py for which may be used for what). Rendering 2000 scenes takes ~15 s,
    so callers that evaluate repeatedly pass a `cache_dir`; the cache is keyed by (seed, split, count,
    size) and by the renderer's source.
    """
    path = _cache_path(cache_dir, seed, split, count, image_size) if cache_dir is not None else None
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as data:
            return _scene_set(split, {name: data[name] for name in CACHED})
    heldout = _render(seed, split, count, image_size)
    if path is not None:
        _write_cache(path, heldout)
    return heldout
