"""Stage 2b: a cheap visual-complexity score per image, computed batched on the CPU workers.

Two scorers share one feature extractor:
- `HandcraftedScorer`: gradient energy, edge density and compressed bytes per pixel, which each correlate
  r~0.7 with human complexity ratings (Nagle & Lavie 2020); no training.
- `LearnedScorer`: a ridge regression from the same cheap features (plus a 4x4 grid of gradient energy and
  colour statistics) to "the cheapest route that keeps this image's embedding", fitted by calibration.
Both cost microseconds per image next to the encoder's milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

GRADIENT_SCALE = 20.0  # mean |grey gradient| (levels per STRIDE pixels) typical of busy images
EDGE_LEVEL = 24.0  # a gradient above this many grey levels counts as an edge
BYTES_PER_PIXEL_SCALE = 1.0
GRID = 4  # the learned scorer also sees gradient energy on a GRID x GRID layout
STRIDE = 2  # features read every STRIDE-th pixel in each direction
PATCH = 16  # the ViT patch the redundancy features are read at (icar-tiny-vit, ViT-B/16)
FLAT_STD = 6.0  # a patch whose grey std is below this many levels is flat
SAME_COLOUR = 8.0  # neighbouring flat patches whose mean colours differ less than this look alike


def complexity_features(images: np.ndarray, bytes_per_pixel: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] uint8 + [N] -> [N, 6 + GRID² + 4] float32.

    Columns: gradient energy, edge density, bytes per pixel, grey std, saturation mean, saturation std,
    gradient energy per grid cell, then patch redundancy at the ViT's patch grid (`patch_redundancy`).
    Computed on every STRIDE-th pixel: the statistics barely move and the router's CPU cost falls STRIDE²
    times.
    """
    pixels = images[:, ::STRIDE, ::STRIDE].astype(np.float32)
    # channel planes with plain elementwise ops: numpy's matmul and reductions over a trailing axis of
    # 3 take a slow path, and this function is the router's whole CPU cost
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    grey = 0.299 * r + 0.587 * g + 0.114 * b
    gx = np.abs(np.diff(grey, axis=2))[:, :-1, :]
    gy = np.abs(np.diff(grey, axis=1))[:, :, :-1]
    magnitude = gx + gy
    n, h, w = magnitude.shape
    saturation = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    cells = magnitude[:, : h // GRID * GRID, : w // GRID * GRID]
    cells = cells.reshape(n, GRID, h // GRID, GRID, w // GRID).mean(axis=(2, 4)).reshape(n, -1)
    columns = [
        magnitude.mean(axis=(1, 2)),
        (magnitude > EDGE_LEVEL).mean(axis=(1, 2)),
        bytes_per_pixel.astype(np.float32),
        grey.std(axis=(1, 2)),
        saturation.mean(axis=(1, 2)),
        saturation.std(axis=(1, 2)),
    ]
    patches = patch_redundancy(pixels, grey, PATCH // STRIDE)
    return np.concatenate([np.stack(columns, axis=1), cells, patches], axis=1).astype(np.float32)


def patch_redundancy(pixels: np.ndarray, grey: np.ndarray, side: int) -> np.ndarray:
    """[N, H, W, 3] colour + [N, H, W] grey -> [N, 4]: how many of the ViT's patch tokens look alike.

    Token merging and pruning save most where many patches carry the same content, so these predict how
    far an image's tokens can be reduced: the share of flat patches, the share of neighbouring patch pairs
    that are both flat and of one colour (the pairs ToMe would merge first), the mean patch std and the
    spread of patch mean brightness. Reads the arrays as patches in place (no copy on the router's path)."""
    n, h, w = grey.shape
    gh, gw = h // side, w // side
    grey_cells = grey[:, : gh * side, : gw * side].reshape(n, gh, side, gw, side)
    colour = pixels[:, : gh * side, : gw * side].reshape(n, gh, side, gw, side, 3).mean(axis=(2, 4))
    std = grey_cells.std(axis=(2, 4))  # [N, gh, gw] grey std per patch
    flat = std < FLAT_STD

    def alike(a: tuple, b: tuple) -> np.ndarray:
        same = np.abs(colour[a] - colour[b]).max(axis=-1) < SAME_COLOUR
        return flat[a] & flat[b] & same

    right = alike((slice(None), slice(None), slice(1, None)), (slice(None), slice(None), slice(None, -1)))
    down = alike((slice(None), slice(1, None)), (slice(None), slice(None, -1)))
    pairs = right.sum(axis=(1, 2)) + down.sum(axis=(1, 2))
    total_pairs = gh * (gw - 1) + (gh - 1) * gw
    columns = [flat.mean(axis=(1, 2)), pairs / max(total_pairs, 1), std.mean(axis=(1, 2))]
    return np.stack([*columns, grey_cells.mean(axis=(2, 4)).std(axis=(1, 2))], axis=1)


class Scorer(Protocol):
    def __call__(self, features: np.ndarray) -> np.ndarray: ...


class HandcraftedScorer:
    """score = 1 - exp(-(weighted gradient, edges, bytes per pixel)) in [0, 1)."""

    def __call__(self, features: np.ndarray) -> np.ndarray:
        gradient, edges, bpp = features[:, 0], features[:, 1], features[:, 2]
        raw = 0.5 * gradient / GRADIENT_SCALE + 1.2 * edges + 0.2 * bpp / BYTES_PER_PIXEL_SCALE
        return (1.0 - np.exp(-raw)).astype(np.float32)


class LearnedScorer:
    """Ridge regression on standardised features; predicts a route index (higher = needs more compute)."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, weights: np.ndarray, bias: float):
        self.mean, self.std, self.weights, self.bias = mean, std, weights, bias

    @classmethod
    def fit(cls, features: np.ndarray, targets: np.ndarray, l2: float = 1.0) -> LearnedScorer:
        mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
        z = (features - mean) / std
        gram = z.T @ z + l2 * np.eye(z.shape[1])
        weights = np.linalg.solve(gram, z.T @ (targets - targets.mean()))
        return cls(mean, std, weights, float(targets.mean()))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return (((features - self.mean) / self.std) @ self.weights + self.bias).astype(np.float32)

    def save(self, path: str | Path) -> None:
        fields = {"mean": self.mean, "std": self.std, "weights": self.weights}
        data = {k: np.asarray(v, np.float64).tolist() for k, v in fields.items()} | {"bias": self.bias}
        Path(path).write_text(json.dumps(data))

    @classmethod
    def load(cls, path: str | Path) -> LearnedScorer:
        data = json.loads(Path(path).read_text())
        arrays = [np.asarray(data[k], np.float32) for k in ("mean", "std", "weights")]
        return cls(*arrays, float(data["bias"]))


def scorer_path(spec: str) -> Path | None:
    """The file of a learned scorer (`router.scorer`, relative paths also under the shipped models);
    None for the handcrafted one."""
    if spec == "handcrafted":
        return None
    path = Path(spec)
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parent / "models" / spec
    if not path.exists():
        raise FileNotFoundError(f"router.scorer {spec!r}: no such learned-scorer file")
    return path


def load_scorer(spec: str) -> Scorer:
    """'handcrafted', or the path of a learned scorer's JSON written by calibration."""
    path = scorer_path(spec)
    return HandcraftedScorer() if path is None else LearnedScorer.load(path)
