"""Image bytes -> the model's input as uint8 pixels, safely.

Follows open_clip's eval preprocessing (bicubic resize of the shortest side, centre crop) but stops at
uint8, so the CPU workers ship 4x fewer bytes to the encoders and normalisation runs batched there.
Every failure becomes a DecodeError with a message; nothing here may crash a job.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


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


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """open_clip's eval geometry: shortest side to `size` (bicubic), then a centred size x size crop."""
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    if (new_w, new_h) != (size, size):
        image = image.crop((left, top, left + size, top + size))
    return image


def decode_image(
    data: bytes | None, size: int, max_pixels: int = 64_000_000, use_draft: bool = True
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode, orient, convert and crop one image. Returns (uint8 [size, size, 3], original (w, h)).

    The original (w, h) is the size stored in the file header, before any EXIF rotation is applied.
    """
    if data is None:
        raise DecodeError("image is null")
    if len(data) == 0:
        raise DecodeError("image bytes are empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width <= 0 or height <= 0:
                raise DecodeError(f"image has an empty size {width}x{height}")
            if width * height > max_pixels:
                raise DecodeError(
                    f"image header claims {width}x{height} pixels, over decode.max_pixels={max_pixels}"
                )
            if use_draft and image.format == "JPEG":
                image.draft("RGB", (size, size))  # libjpeg DCT scaling; keeps both sides >= size
            image.load()
            image = ImageOps.exif_transpose(image)
            pixels = np.array(resize_center_crop(_to_rgb(image), size), dtype=np.uint8)
    except DecodeError:
        raise
    except Image.UnidentifiedImageError:
        raise DecodeError("bytes are not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"decompression bomb refused: {exc}") from None
    except Exception as exc:  # corrupt files make Pillow raise TypeError, struct.error, IndexError, ... too
        raise DecodeError(f"image could not be decoded: {type(exc).__name__}: {exc}") from None
    if pixels.shape != (size, size, 3):  # pragma: no cover - defensive; resize_center_crop guarantees it
        raise DecodeError(f"decoded to unexpected shape {pixels.shape}")
    return pixels, (width, height)
