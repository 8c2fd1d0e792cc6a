"""Held-out scene sets: rendered, decoded exactly as the pipeline decodes, cached as .npz.

Training, calibration, evaluation and benchmarks all read their scenes here, so a split means the same
images everywhere; which split may be used for what is in `lab/icar_lab/scenes/splits.py`.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from icar_lab.scenes import render as _render_module
from icar_lab.scenes.render import make_example
from pipeline import decode as _decode_module
from pipeline.decode import decode_image


@dataclass
class HeldoutSet:
    """Decoded held-out scenes with their captions and ground truth, row-aligned."""

    images: np.ndarray  # uint8 [N, S, S, 3], exactly what decode_image gives the pipeline
    captions: list[str]
    scene_keys: list[str]
    complexity_level: np.ndarray  # str [N]: low | medium | high
    object_count: np.ndarray  # int32 [N]
    background: np.ndarray  # str [N]
    bytes_per_pixel: np.ndarray  # float32 [N]: encoded size / pixels, the router's free feature
    split: str  # the scene stream drawn from (see scenes/splits.py)

    def __len__(self) -> int:
        return len(self.captions)


def _renderer_version() -> str:
    """Hash of the renderer and decoder sources and the set's fields: older caches are never reused."""
    digest = hashlib.sha256()
    for module in (_render_module, _decode_module):
        digest.update(inspect.getsource(module).encode())
    digest.update(",".join(f.name for f in fields(HeldoutSet)).encode())
    return digest.hexdigest()[:12]


def _cache_path(cache_dir: str | Path, seed: int, split: str, count: int, image_size: int) -> Path:
    name = f"heldout-{split}-seed{seed}-n{count}-{image_size}px-{_renderer_version()}.npz"
    return Path(cache_dir) / name


def _render(seed: int, split: str, count: int, image_size: int) -> HeldoutSet:
    images = np.empty((count, image_size, image_size, 3), np.uint8)
    captions, keys, levels, counts, backgrounds = [], [], [], [], []
    bytes_per_pixel = np.empty(count, np.float32)
    for index in range(count):
        scene, data, _ = make_example(seed, split, index)
        images[index], (width, height) = decode_image(data, image_size)
        bytes_per_pixel[index] = len(data) / (width * height)
        captions.append(scene.caption)
        keys.append(scene.scene_key)
        levels.append(scene.complexity_level)
        counts.append(scene.object_count)
        backgrounds.append(scene.background)
    return HeldoutSet(
        images=images,
        captions=captions,
        scene_keys=keys,
        complexity_level=np.asarray(levels, dtype=str),
        object_count=np.asarray(counts, dtype=np.int32),
        background=np.asarray(backgrounds, dtype=str),
        bytes_per_pixel=bytes_per_pixel,
        split=split,
    )


def load_heldout(
    split: str,
    count: int = 2000,
    image_size: int = 128,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> HeldoutSet:
    """Render (or read from the .npz cache) the first `count` scenes of `split` (calib or test: see
    scenes/splits.py for which may be used for what). Rendering 2000 scenes takes ~15 s,
    so callers that evaluate repeatedly pass a `cache_dir`; the cache is keyed by (seed, split, count,
    size) and by the renderer's source, and written atomically so concurrent runs cannot read half a file.
    """
    path = _cache_path(cache_dir, seed, split, count, image_size) if cache_dir is not None else None
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as data:
            columns = {f.name: data[f.name] for f in fields(HeldoutSet)}
        columns["captions"], columns["scene_keys"] = list(columns["captions"]), list(columns["scene_keys"])
        columns["split"] = str(columns["split"])
        return HeldoutSet(**columns)
    heldout = _render(seed, split, count, image_size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **{f.name: np.asarray(getattr(heldout, f.name)) for f in fields(heldout)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return heldout
