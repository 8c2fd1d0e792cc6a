"""Procedural captioned scenes whose visual complexity spans the whole range.

A scene is a background plus 1-12 coloured shapes. Its caption states a few facts about it, and its
`scene_key` is the canonical form of exactly those facts, so any image whose key equals a caption's key
is a correct answer to that caption. Everything is a pure function of (seed, split, index).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "cyan": (40, 210, 220),
    "blue": (30, 60, 220),
    "purple": (140, 40, 190),
    "pink": (250, 130, 190),
}
SIZES = {"small": (14, 20), "medium": (28, 38), "large": (52, 72)}  # radius range in pixels at 256 px
BACKGROUNDS = ("plain", "gradient", "stripes", "checkerboard", "noise")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
RELATIONS = ("left of", "right of", "above", "below")
CANVAS = 256


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    x: float
    y: float
    radius: float
    angle: float


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]  # drawing order; the named objects come last so they stay visible
    caption: str
    scene_key: str

    @property
    def object_count(self) -> int:
        return len(self.objects)

    @property
    def complexity_level(self) -> str:
        """Ground-truth complexity bucket used to break evaluation results down."""
        busy = self.background in ("checkerboard", "noise")
        if self.object_count == 1 and not busy:
            return "low"
        if self.object_count <= 3:
            return "medium"
        return "high" if busy or self.object_count >= 8 else "medium"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def count_phrase(n: int) -> str:
    if n in COUNT_WORDS:
        return COUNT_WORDS[n]
    return "a few" if n <= 5 else "several" if n <= 8 else "many"


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, sum(map(ord, split)) * 7919 + len(split), index])


def _relation(a: SceneObject, b: SceneObject) -> str:
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _place(rng: np.random.Generator, size: str) -> tuple[float, float, float]:
    lo, hi = SIZES[size]
    radius = float(rng.uniform(lo, hi))
    margin = radius * 0.8
    x, y = rng.uniform(margin, CANVAS - margin, size=2)
    return float(x), float(y), radius


BIMODAL = "-bimodal"  # a stream whose name ends so draws the bimodal mix


def _mix(rng: np.random.Generator, split: str) -> tuple[str, int]:
    """(background, object count) of a scene: the default mix spreads complexity evenly; a stream named
    `<split>-bimodal` draws from the two ends only (one object on a plain or gradient background, or 6-12
    objects on a textured one), as a crawl mixes product shots with street scenes."""
    if split.endswith(BIMODAL):
        kind = str(rng.choice(["single", "clutter"]))
        background = str(rng.choice(BACKGROUNDS[:2] if kind == "single" else BACKGROUNDS[3:]))
        return background, 1 if kind == "single" else int(rng.integers(6, 13))
    background = str(rng.choice(BACKGROUNDS))
    kind = rng.choice(["single", "few", "clutter"], p=[0.3, 0.3, 0.4])
    n = 1 if kind == "single" else int(rng.integers(2, 4)) if kind == "few" else int(rng.integers(4, 13))
    return background, n


def _new_object(rng: np.random.Generator, size: str, avoid: tuple[str, str] | None = None) -> SceneObject:
    """A shape of `size` at a random place, its (shape, colour) unlike `avoid`."""
    while True:
        shape, color = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
        if (shape, color) != avoid:
            break
    x, y, radius = _place(rng, size)
    return SceneObject(shape, color, size, x, y, radius, float(rng.uniform(0, 2 * math.pi)))


def _single(rng: np.random.Generator, background: str) -> Scene:
    """One object, named with or without its size."""
    obj = _new_object(rng, str(rng.choice(list(SIZES))))
    if rng.random() < 0.5:
        caption = f"{article(obj.size)} {obj.size} {obj.color} {obj.shape} on a {background} background"
        key = f"n=1|bg={background}|{obj.size} {obj.color} {obj.shape}"
    else:
        caption = f"{article(obj.color)} {obj.color} {obj.shape} on a {background} background"
        key = f"n=1|bg={background}|{obj.color} {obj.shape}"
    return Scene(background, (obj,), caption, key)


def _few(rng: np.random.Generator, background: str, n: int) -> Scene:
    """Two named objects (plus small ones up to `n`), named by their relation or as a pair."""
    a = _new_object(rng, "medium")
    b = _new_object(rng, "medium", avoid=(a.shape, a.color))
    extra = tuple(_new_object(rng, "small") for _ in range(n - 2))
    names = sorted([f"{a.color} {a.shape}", f"{b.color} {b.shape}"])
    if n == 2 and rng.random() < 0.4:
        rel = _relation(a, b)
        caption = (
            f"{article(a.color)} {a.color} {a.shape} {rel} {article(b.color)} {b.color} {b.shape} "
            f"on a {background} background"
        )
        key = f"n=2|bg={background}|{a.color} {a.shape} {rel} {b.color} {b.shape}"
    else:
        caption = (
            f"{count_phrase(n)} shapes on a {background} background: "
            f"{article(names[0])} {names[0]} and {article(names[1])} {names[1]}"
        )
        key = f"n={n}|bg={background}|{names[0]}+{names[1]}"
    return Scene(background, (*extra, a, b), caption, key)


def _cluttered(rng: np.random.Generator, background: str, n: int) -> Scene:
    """`n` objects, named by how many and by the largest."""
    small = tuple(_new_object(rng, str(rng.choice(["small", "small", "medium"]))) for _ in range(n - 1))
    big = _new_object(rng, "large")
    phrase = count_phrase(n)
    largest = f"{article(big.color)} {big.color} {big.shape}"
    caption = f"{phrase} shapes on a {background} background, the largest {largest}"
    key = f"n={phrase}|bg={background}|largest {big.color} {big.shape}"
    return Scene(background, (*small, big), caption, key)


def sample_scene(seed: int, split: str, index: int) -> Scene:
    """The scene for one (seed, split, index); the same triple always gives the same scene. A stream
    named `<split>-bimodal` draws the bimodal mix (`_mix`): per-image routing has the most to gain there."""
    rng = _rng(seed, split, index)
    background, n = _mix(rng, split)
    if n == 1:
        return _single(rng, background)
    return _few(rng, background, n) if n <= 3 else _cluttered(rng, background, n)


def _background(rng: np.random.Generator, kind: str) -> np.ndarray:
    """Grey-toned backgrounds, so colour words always refer to the shapes."""
    a, b = sorted(rng.integers(40, 215, size=2).tolist())
    if b - a < 50:
        a, b = max(0, a - 40), min(255, b + 40)
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)
    if kind == "plain":
        grey = np.full((CANVAS, CANVAS), float(a if rng.random() < 0.5 else b))
    elif kind == "gradient":
        t = rng.uniform(0, 2 * math.pi)
        ramp = (np.cos(t) * xx + np.sin(t) * yy) / CANVAS
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        grey = a + (b - a) * ramp
    elif kind == "stripes":
        period = int(rng.integers(10, 40))
        axis = xx if rng.random() < 0.5 else yy
        grey = np.where((axis // (period / 2)) % 2 == 0, a, b)
    elif kind == "checkerboard":
        cell = int(rng.integers(12, 40))
        grey = np.where(((xx // cell) + (yy // cell)) % 2 == 0, a, b)
    else:  # noise: band-limited texture
        coarse = rng.uniform(a, b, size=(CANVAS // 8, CANVAS // 8))
        fine = rng.normal(0, 25, size=(CANVAS, CANVAS))
        grey = np.kron(coarse, np.ones((8, 8))) + fine
    tint = rng.uniform(0.92, 1.08, size=3)
    rgb = np.clip(grey[..., None] * tint, 0, 255)
    return rgb.astype(np.uint8)


def _polygon(obj: SceneObject) -> list[tuple[float, float]]:
    def ring(k: int, radius: float, offset: float = 0.0) -> list[tuple[float, float]]:
        return [
            (
                obj.x + radius * math.cos(obj.angle + offset + 2 * math.pi * i / k),
                obj.y + radius * math.sin(obj.angle + offset + 2 * math.pi * i / k),
            )
            for i in range(k)
        ]

    if obj.shape == "square":
        return ring(4, obj.radius)
    if obj.shape == "triangle":
        return ring(3, obj.radius)
    if obj.shape == "hexagon":
        return ring(6, obj.radius)
    if obj.shape == "star":
        outer, inner = ring(5, obj.radius), ring(5, obj.radius * 0.42, math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    # cross: a plus sign built from 12 corners
    w, r = obj.radius * 0.33, obj.radius
    corners = [
        (w, r),
        (w, w),
        (r, w),
        (r, -w),
        (w, -w),
        (w, -r),
        (-w, -r),
        (-w, -w),
        (-r, -w),
        (-r, w),
        (-w, w),
        (-w, r),
    ]
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    return [(obj.x + px * c - py * s, obj.y + px * s + py * c) for px, py in corners]


def render_scene(scene: Scene, seed: int, split: str, index: int) -> Image.Image:
    """Draw the scene at 256x256 RGB."""
    rng = _rng(seed, split + "/pixels", index)
    image = Image.fromarray(_background(rng, scene.background), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        jitter = rng.integers(-15, 16, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[obj.color], jitter, strict=True))
        outline = (20, 20, 20)
        if obj.shape == "circle":
            box = (obj.x - obj.radius, obj.y - obj.radius, obj.x + obj.radius, obj.y + obj.radius)
            draw.ellipse(box, fill=fill, outline=outline)
        else:
            draw.polygon(_polygon(obj), fill=fill, outline=outline)
    return image


def encode_image(image: Image.Image, rng: np.random.Generator) -> tuple[bytes, str]:
    """Encode as a web crawl would: mostly JPEG at varied quality, some PNG and WebP."""
    fmt = rng.choice(["jpg", "png", "webp"], p=[0.8, 0.1, 0.1])
    buf = io.BytesIO()
    if fmt == "jpg":
        image.save(buf, format="JPEG", quality=int(rng.integers(55, 96)))
    elif fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="WEBP", quality=int(rng.integers(60, 95)))
    return buf.getvalue(), str(fmt)


def make_example(seed: int, split: str, index: int) -> tuple[Scene, bytes, str]:
    """Scene, encoded image bytes and their format for one index."""
    scene = sample_scene(seed, split, index)
    image = render_scene(scene, seed, split, index)
    data, fmt = encode_image(image, _rng(seed, split + "/codec", index))
    return scene, data, fmt
