"""Image bytes -> the model's input as uint8 pixels, safely.

Follows the model's open_clip eval preprocessing (`image_transform(..., is_train=False)`: resize by the
shortest or longest side or squash, with bicubic or bilinear resampling, then centre crop or pad) step
for step on the 8-bit RGB PIL image, so an RGB file gives exactly open_clip's pixels; it stops at uint8, so
the CPU workers ship 4x fewer bytes to the encoders and normalisation runs batched there. Every failure
becomes a DecodeError with a message; nothing here may crash a job.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_RESIZE_MODES = ("shortest", "longest", "squash")
_VISION_IMAGE_SIZE = 224  # open_clip's CLIPVisionCfg default when a config omits image_size
THUMBNAIL_QUALITY = 75
THUMBNAIL_METHOD = 0  # libwebp effort (0-6): 0 costs half of its default 4 at equal PSNR, 21% more bytes


# the formats web crawls hold (JPEG's opener also returns cameras' MPO files); Pillow's others (EPS through
# Ghostscript, ...) are refused before any decoder runs
WEB_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class DecodeError(ValueError):
    """The bytes are not an image this pipeline can use; the message says why."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Every Pillow mode to 8-bit RGB (16-bit greys are scaled down, not clipped)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if grey.max(initial=0) > 255 or image.mode != "I" else 255.0
        grey8 = np.clip(np.rint(grey * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey8, "L").convert("RGB")
    if image.mode == "F":
        grey = np.asarray(image, dtype=np.float32)
        return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


@dataclass(frozen=True)
class Preprocess:
    """The geometry of a model's eval preprocessing: output (height, width) and how the image gets there.

    Mirrors the open_clip `PreprocessCfg` fields that move pixels; mean/std are left to the encoders
    (`normalize_uint8`), which normalise whole batches.
    """

    size: tuple[int, int]  # (height, width), as open_clip's image_size
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if len(self.size) != 2 or not all(isinstance(v, int) and v > 0 for v in self.size):
            raise ValueError(f"preprocess size must be (height, width) positive ints, got {self.size!r}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(
                f"unsupported preprocess interpolation {self.interpolation!r} "
                f"(supported: {', '.join(_RESAMPLE)})"
            )
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(
                f"unsupported preprocess resize_mode {self.resize_mode!r} "
                f"(supported: {', '.join(_RESIZE_MODES)})"
            )

    @classmethod
    def from_model_config(cls, model_cfg: dict[str, Any]) -> Preprocess:
        """From an open_clip model config: `vision_cfg.image_size` (int or (height, width)) and the optional
        `preprocess_cfg` keys `interpolation` / `resize_mode`, absent or None meaning open_clip's
        `PreprocessCfg` defaults ('bicubic', 'shortest'). ValueError names any value this cannot follow."""
        image_size = model_cfg.get("vision_cfg", {}).get("image_size", _VISION_IMAGE_SIZE)
        pre = model_cfg.get("preprocess_cfg") or {}
        interpolation = pre.get("interpolation") or "bicubic"
        if interpolation == "random":  # a training option; open_clip's eval transform resizes bicubic then
            interpolation = "bicubic"
        if pre.get("fill_color", 0) != 0:
            raise ValueError(f"unsupported preprocess fill_color {pre['fill_color']!r} (only 0, black)")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        return cls(size, interpolation, pre.get("resize_mode") or "shortest")


def _center_crop_or_pad(image: Image.Image, height: int, width: int) -> Image.Image:
    """torchvision's `center_crop` (= open_clip's `center_crop_or_pad`, fill 0): pad with black to at
    least the target, centred (the odd pixel goes right/bottom), then crop the centre."""
    w, h = image.size
    if width > w or height > h:
        canvas = Image.new(image.mode, (max(w, width), max(h, height)))  # zeros: black
        canvas.paste(image, (max(width - w, 0) // 2, max(height - h, 0) // 2))
        image, (w, h) = canvas, canvas.size
    if (w, h) == (width, height):
        return image
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def resize_to(image: Image.Image, preprocess: Preprocess) -> Image.Image:
    """open_clip's eval geometry (`image_transform(..., is_train=False)`), step for step, so pixels match.

    - squash: resize straight to (height, width);
    - shortest, square target: torchvision `Resize(size)` (short side to size, long side truncated);
    - shortest, non-square target: open_clip's `ResizeKeepRatio` (both sides rounded), which it builds
      without the configured interpolation, so it is always bicubic;
    - longest: `ResizeKeepRatio(longest=1)`, the long side fits and the short one is padded with black;
    then a centre crop (or pad) to (height, width).
    """
    height, width = preprocess.size
    resample = _RESAMPLE[preprocess.interpolation]
    if preprocess.resize_mode == "squash":
        return image.resize((width, height), resample)
    w, h = image.size
    if preprocess.resize_mode == "shortest" and height == width:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = height, int(height * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        ratio_h, ratio_w = h / height, w / width
        ratio = max(ratio_h, ratio_w) if preprocess.resize_mode == "longest" else min(ratio_h, ratio_w)
        # open_clip rounds; a sliver would round to 0 px and crash Pillow, so keep at least one pixel
        new_w, new_h = max(1, round(w / ratio)), max(1, round(h / ratio))
        if preprocess.resize_mode == "shortest":
            resample = Image.Resampling.BICUBIC
    return _center_crop_or_pad(image.resize((new_w, new_h), resample), height, width)


class Decoded(NamedTuple):
    pixels: np.ndarray  # uint8 [height, width, 3], the model's input
    size: tuple[int, int]  # (w, h) stored in the file header, before any EXIF rotation
    thumbnail: bytes | None  # a small WebP of the whole image, when asked for


def make_thumbnail(image: Image.Image, side: int, quality: int = THUMBNAIL_QUALITY) -> bytes:
    """The whole image (no crop) fitted into side x side, as WebP: what a result grid shows."""
    small = image.copy()
    small.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    small.save(out, "WEBP", quality=quality, method=THUMBNAIL_METHOD)
    return out.getvalue()


def decode(
    data: bytes | None,
    size: int | Preprocess,
    max_pixels: int = 64_000_000,
    use_draft: bool = True,
    thumbnail_side: int = 0,
) -> Decoded:
    """Decode, orient, convert and resize one image, and (`thumbnail_side` > 0) make its thumbnail.

    `size` is the model's `Preprocess`, or an int for open_clip's default geometry at size x size (bicubic,
    shortest side, centre crop).
    """
    preprocess = Preprocess((size, size)) if isinstance(size, int) else size
    if data is None:
        raise DecodeError("image is null")
    if len(data) == 0:
        raise DecodeError("image bytes are empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=WEB_FORMATS)
            width, height = image.size
            if width <= 0 or height <= 0:
                raise DecodeError(f"image has an empty size {width}x{height}")
            if width * height > max_pixels:
                raise DecodeError(
                    f"image header claims {width}x{height} pixels, over decode.max_pixels={max_pixels}"
                )
            if use_draft and image.format == "JPEG":
                # libjpeg DCT scaling keeps both sides >= the request; the longer target side for both,
                # because an EXIF rotation applied afterwards may swap them
                side = max(*preprocess.size, thumbnail_side)
                image.draft("RGB", (side, side))
            image.load()
            image = _to_rgb(ImageOps.exif_transpose(image))
            pixels = np.array(resize_to(image, preprocess), dtype=np.uint8)
            thumbnail = make_thumbnail(image, thumbnail_side) if thumbnail_side else None
    except DecodeError:
        raise
    except Image.UnidentifiedImageError:
        raise DecodeError(
            f"bytes are not an image in an accepted format ({', '.join(WEB_FORMATS)})"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"decompression bomb refused: {exc}") from None
    except Exception as exc:  # corrupt files make Pillow raise TypeError, struct.error, IndexError, ... too
        raise DecodeError(f"image could not be decoded: {type(exc).__name__}: {exc}") from None
    if pixels.shape != (*preprocess.size, 3):  # pragma: no cover - defensive; resize_to guarantees it
        raise DecodeError(f"decoded to unexpected shape {pixels.shape}")
    return Decoded(pixels, (width, height), thumbnail)


def decode_image(
    data: bytes | None, size: int | Preprocess, max_pixels: int = 64_000_000, use_draft: bool = True
) -> tuple[np.ndarray, tuple[int, int]]:
    """`decode` without a thumbnail: (uint8 [height, width, 3], original (w, h))."""
    pixels, original, _ = decode(data, size, max_pixels, use_draft)
    return pixels, original
