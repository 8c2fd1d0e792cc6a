"""Real encoded image bytes, generated in memory with Pillow, for decode and end-to-end tests.

Every factory is deterministic (fixed numpy seeds, no files on disk) and returns ``bytes``.

* ``GOOD_CASES``: name -> zero-argument callable returning bytes that ``decode_image`` must accept.
* ``GOOD_CASE_SIZES``: name -> (width, height) as stored in the file header (before any EXIF rotation),
  i.e. what ``decode_image`` reports as the original size.
* ``BAD_CASES``: name -> zero-argument callable returning bytes (or None) that must raise ``DecodeError``.
* ``BAD_CASE_REASONS``: name -> substrings, one of which the DecodeError message must contain.
* ``good_bytes()`` / ``bad_bytes()``: the same cases materialised as name -> bytes, for building shards.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
SOLID_RGB = (200, 60, 30)  # the colour of the solid JPEG / PNG / WebP cases
GREY_LEVEL = 90  # the level of the grayscale cases
EXIF_ORIENTATION = 0x0112


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def smooth_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random but smooth RGB image (bicubic upsampling of coarse noise), so resampling is well-behaved."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)


def quadrants_rgb(width: int, height: int, colours=(RED, GREEN, BLUE, WHITE)) -> Image.Image:
    """Top-left, top-right, bottom-left, bottom-right quadrants in the given colours (asymmetric)."""
    arr = np.empty((height, width, 3), dtype=np.uint8)
    h2, w2 = height // 2, width // 2
    arr[:h2, :w2], arr[:h2, w2:], arr[h2:, :w2], arr[h2:, w2:] = colours
    return Image.fromarray(arr, "RGB")


# ---------------------------------------------------------------- good cases


def jpeg_rgb() -> bytes:
    """Solid SOLID_RGB, 64x48."""
    return _encode(Image.new("RGB", (64, 48), SOLID_RGB), "JPEG", quality=95)


def png_rgb() -> bytes:
    """Solid SOLID_RGB, 50x70 (lossless)."""
    return _encode(Image.new("RGB", (50, 70), SOLID_RGB), "PNG")


def webp_rgb() -> bytes:
    """Solid SOLID_RGB, 40x40, lossy WebP."""
    return _encode(Image.new("RGB", (40, 40), SOLID_RGB), "WEBP", quality=95)


def jpeg_smooth() -> bytes:
    """Smooth random RGB, 120x90."""
    return _encode(smooth_rgb(120, 90, seed=1), "JPEG", quality=90)


def jpeg_grey() -> bytes:
    """Mode L, random grey noise around GREY_LEVEL, 48x48."""
    rng = np.random.default_rng(2)
    arr = np.clip(GREY_LEVEL + rng.integers(-20, 21, size=(48, 48)), 0, 255).astype(np.uint8)
    return _encode(Image.fromarray(arr, "L"), "JPEG", quality=95)


def png_grey() -> bytes:
    """Mode L, random grey noise, 40x56."""
    rng = np.random.default_rng(3)
    return _encode(Image.fromarray(rng.integers(0, 256, size=(56, 40), dtype=np.uint8), "L"), "PNG")


def jpeg_cmyk() -> bytes:
    """CMYK quadrants: pure cyan, magenta / yellow, black (RGB: cyan, magenta / yellow, black), 64x64."""
    arr = np.zeros((64, 64, 4), dtype=np.uint8)
    arr[:32, :32, 0] = 255  # C
    arr[:32, 32:, 1] = 255  # M
    arr[32:, :32, 2] = 255  # Y
    arr[32:, 32:, 3] = 255  # K
    return _encode(Image.fromarray(arr, "CMYK"), "JPEG", quality=95)


def png_rgba() -> bytes:
    """RGBA 64x64: left half opaque red; right half fully transparent with green stored under alpha 0."""
    arr = np.zeros((64, 64, 4), dtype=np.uint8)
    arr[:, :32] = (255, 0, 0, 255)
    arr[:, 32:] = (0, 255, 0, 0)
    return _encode(Image.fromarray(arr, "RGBA"), "PNG")


def _palette_image() -> Image.Image:
    """P mode 64x64: left half index 0 (red), right half index 1 (blue)."""
    idx = np.zeros((64, 64), dtype=np.uint8)
    idx[:, 32:] = 1
    image = Image.fromarray(idx, "P")
    image.putpalette([*RED, *BLUE] + [0, 0, 0] * 254)
    return image


def png_palette() -> bytes:
    return _encode(_palette_image(), "PNG")


def png_palette_transparent() -> bytes:
    """Palette index 1 (blue, right half) marked fully transparent via tRNS."""
    return _encode(_palette_image(), "PNG", transparency=1)


def png_grey16() -> bytes:
    """16-bit grey (I;16) 64x64 quadrants: 0, 65535 / 32768, 16384 -> 8-bit 0, 255 / 128, 64."""
    arr = np.zeros((64, 64), dtype=np.uint16)
    arr[:32, 32:] = 65535
    arr[32:, :32] = 32768
    arr[32:, 32:] = 16384
    image = Image.fromarray(arr)
    assert image.mode == "I;16", image.mode
    return _encode(image, "PNG")


def _exif_jpeg(orientation: int) -> bytes:
    """Stored 64x48 landscape quadrants (TL red, TR green, BL blue, BR white); EXIF says rotate."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return _encode(quadrants_rgb(64, 48), "JPEG", quality=95, subsampling=0, exif=exif.tobytes())


def jpeg_exif_rot6() -> bytes:
    """Orientation 6 (display = stored rotated 90 deg clockwise): displayed 48x64 portrait."""
    return _exif_jpeg(6)


def jpeg_exif_rot8() -> bytes:
    """Orientation 8 (display = stored rotated 90 deg counter-clockwise): displayed 48x64 portrait."""
    return _exif_jpeg(8)


def png_tiny_1x1() -> bytes:
    return _encode(Image.new("RGB", (1, 1), SOLID_RGB), "PNG")


def png_tiny_3x2() -> bytes:
    return _encode(Image.new("RGB", (3, 2), SOLID_RGB), "PNG")


def png_very_wide() -> bytes:
    """2000x20: left 40% red, middle 20% green, right 40% blue -> a centre crop is all green."""
    arr = np.zeros((20, 2000, 3), dtype=np.uint8)
    arr[:, :800] = RED
    arr[:, 800:1200] = GREEN
    arr[:, 1200:] = BLUE
    return _encode(Image.fromarray(arr, "RGB"), "PNG")


def jpeg_large() -> bytes:
    """Smooth random 1024x768 JPEG: big enough for libjpeg draft (DCT) downscaling to kick in."""
    return _encode(smooth_rgb(1024, 768, seed=4), "JPEG", quality=90)


GOOD_CASES: dict[str, Callable[[], bytes]] = {
    "jpeg_rgb": jpeg_rgb,
    "png_rgb": png_rgb,
    "webp_rgb": webp_rgb,
    "jpeg_smooth": jpeg_smooth,
    "jpeg_grey": jpeg_grey,
    "png_grey": png_grey,
    "jpeg_cmyk": jpeg_cmyk,
    "png_rgba": png_rgba,
    "png_palette": png_palette,
    "png_palette_transparent": png_palette_transparent,
    "png_grey16": png_grey16,
    "jpeg_exif_rot6": jpeg_exif_rot6,
    "jpeg_exif_rot8": jpeg_exif_rot8,
    "png_tiny_1x1": png_tiny_1x1,
    "png_tiny_3x2": png_tiny_3x2,
    "png_very_wide": png_very_wide,
    "jpeg_large": jpeg_large,
}

GOOD_CASE_SIZES: dict[str, tuple[int, int]] = {
    "jpeg_rgb": (64, 48),
    "png_rgb": (50, 70),
    "webp_rgb": (40, 40),
    "jpeg_smooth": (120, 90),
    "jpeg_grey": (48, 48),
    "png_grey": (40, 56),
    "jpeg_cmyk": (64, 64),
    "png_rgba": (64, 64),
    "png_palette": (64, 64),
    "png_palette_transparent": (64, 64),
    "png_grey16": (64, 64),
    "jpeg_exif_rot6": (64, 48),  # stored size; displayed is 48x64
    "jpeg_exif_rot8": (64, 48),
    "png_tiny_1x1": (1, 1),
    "png_tiny_3x2": (3, 2),
    "png_very_wide": (2000, 20),
    "jpeg_large": (1024, 768),
}


# ---------------------------------------------------------------- bad cases


def jpeg_truncated() -> bytes:
    """A valid JPEG cut in half: the header parses, the entropy-coded data ends early."""
    data = _encode(smooth_rgb(128, 96, seed=5), "JPEG", quality=90)
    return data[: len(data) // 2]


def random_bytes() -> bytes:
    return np.random.default_rng(6).integers(0, 256, size=4096, dtype=np.uint8).tobytes()


def eps_bytes() -> bytes:
    """A real EPS file: Pillow could open it (through Ghostscript), the pipeline must not try."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(out, format="EPS")
    return out.getvalue()


def empty_bytes() -> bytes:
    return b""


def null_bytes() -> None:
    return None


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A ~60-byte PNG whose IHDR (valid CRC) claims width x height RGB pixels; its IDAT is a stub."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00"))
        + _png_chunk(b"IEND", b"")
    )


def tiff_bad_strip_offsets() -> bytes:
    """A small RGB TIFF whose StripOffsets entry is retyped UNDEFINED x16: Pillow then raises TypeError."""
    data = bytearray(_encode(smooth_rgb(40, 30, seed=7), "TIFF"))
    assert data[:4] == b"II*\x00"
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 273:  # StripOffsets
            struct.pack_into("<HI", data, entry + 2, 7, 16)  # type UNDEFINED, 16 bytes
            return bytes(data)
    raise AssertionError("no StripOffsets tag in Pillow's TIFF")


BAD_CASES: dict[str, Callable[[], bytes | None]] = {
    "jpeg_truncated": jpeg_truncated,
    "random_bytes": random_bytes,
    "eps_not_a_web_format": eps_bytes,
    "empty_bytes": empty_bytes,
    "null": null_bytes,
    "png_header_bomb": png_header_bomb,
    "tiff_bad_strip_offsets": tiff_bad_strip_offsets,
}

BAD_CASE_REASONS: dict[str, tuple[str, ...]] = {
    "jpeg_truncated": ("truncated", "could not be decoded"),
    "random_bytes": ("accepted format",),
    "eps_not_a_web_format": ("accepted format",),
    "empty_bytes": ("empty",),
    "null": ("null",),
    "png_header_bomb": ("max_pixels", "bomb"),
    "tiff_bad_strip_offsets": ("could not be decoded",),
}


def good_bytes() -> dict[str, bytes]:
    return {name: make() for name, make in GOOD_CASES.items()}


def bad_bytes() -> dict[str, bytes | None]:
    return {name: make() for name, make in BAD_CASES.items()}
