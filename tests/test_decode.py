"""pipeline.decode on real encoded images (tests/imagefactory.py): shapes, sizes, pixel values, failures.

Convention checked here: the original size decode_image reports is the size stored in the file header,
i.e. BEFORE EXIF rotation (an orientation-6 JPEG stored 64x48 reports (64, 48) although it displays 48x64).
"""

from __future__ import annotations

import io

import imagefactory as f  # tests/ is on sys.path under pytest's default (prepend) import mode
import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from pipeline.decode import DecodeError, Preprocess, decode_image, resize_to

S = 32  # output side for most tests: small keeps the file fast


def decode(name: str, size: int = S, **kwargs) -> tuple[np.ndarray, tuple[int, int]]:
    return decode_image(f.GOOD_CASES[name](), size, **kwargs)


def close(pixel, expected, tol: int = 6) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, dtype=int) - np.asarray(expected, dtype=int)) <= tol))


def quadrant_centres(pixels: np.ndarray) -> tuple:
    """Pixels at the centres of the TL, TR, BL, BR quadrants of an S x S output."""
    q, h = pixels.shape[0] // 4, 3 * pixels.shape[0] // 4
    return pixels[q, q], pixels[q, h], pixels[h, q], pixels[h, h]


# ---------------------------------------------------------------- every good case


@pytest.mark.parametrize("name", sorted(f.GOOD_CASES))
def test_good_case_shape_dtype_and_original_size(name):
    pixels, orig = decode(name)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (S, S, 3)
    assert orig == f.GOOD_CASE_SIZES[name]


def test_factory_is_deterministic_and_complete():
    assert set(f.GOOD_CASES) == set(f.GOOD_CASE_SIZES)
    assert set(f.BAD_CASES) == set(f.BAD_CASE_REASONS)
    assert f.good_bytes()["jpeg_smooth"] == f.jpeg_smooth()
    assert f.bad_bytes()["random_bytes"] == f.random_bytes()


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("name", ["jpeg_rgb", "png_rgb", "webp_rgb", "png_tiny_1x1", "png_tiny_3x2"])
def test_solid_colour_decodes_to_that_colour(name):
    pixels, _ = decode(name)
    lossless = name.startswith("png")
    assert close(pixels.reshape(-1, 3), f.SOLID_RGB, tol=0 if lossless else 4)


@pytest.mark.parametrize("name", ["jpeg_grey", "png_grey"])
def test_grayscale_gives_equal_channels(name):
    pixels, _ = decode(name)
    assert np.array_equal(pixels[..., 0], pixels[..., 1])
    assert np.array_equal(pixels[..., 1], pixels[..., 2])
    assert pixels.std() > 1  # the grey texture survives, it is not flattened to one value
    if name == "jpeg_grey":
        assert abs(float(pixels.mean()) - f.GREY_LEVEL) < 6


def test_png_grey_matches_pillow_l_resize():
    data = f.png_grey()
    expected = np.asarray(resize_to(Image.open(io.BytesIO(data)).convert("L"), Preprocess((S, S))))
    pixels, _ = decode_image(data, S)
    assert np.array_equal(pixels[..., 0], expected)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    # Stored quadrants 0, 65535 / 32768, 16384 -> 0, 255 / 128, 64 (65535 -> 255, 32768 -> ~128).
    pixels, _ = decode_image(f.png_grey16(), 64)  # 64 = stored size: no resampling, exact values
    tl, tr, bl, br = quadrant_centres(pixels)
    assert tl.tolist() == [0, 0, 0]
    assert tr.tolist() == [255, 255, 255]
    assert bl.tolist() == [128, 128, 128]
    assert br.tolist() == [64, 64, 64]
    resized, _ = decode("png_grey16")
    assert [int(p[0]) for p in quadrant_centres(resized)] == [0, 255, 128, 64]


def test_cmyk_converts_to_sensible_rgb():
    tl, tr, bl, br = quadrant_centres(decode("jpeg_cmyk")[0])
    assert close(tl, (0, 255, 255))  # cyan
    assert close(tr, (255, 0, 255))  # magenta
    assert close(bl, (255, 255, 0))  # yellow
    assert close(br, (0, 0, 0))  # black


def test_rgba_drops_alpha_like_open_clip_training():
    # Alpha is discarded (Pillow convert("RGB"), as open_clip's "pilrgb" decode does): the fully transparent
    # right half shows the colour stored under alpha 0 (green); the opaque left half stays red.
    tl, tr, bl, br = quadrant_centres(decode("png_rgba")[0])
    assert close(tl, f.RED, 0) and close(bl, f.RED, 0)
    assert close(tr, f.GREEN, 0) and close(br, f.GREEN, 0)


@pytest.mark.parametrize("name", ["png_palette", "png_palette_transparent"])
def test_palette_png(name):
    tl, tr, bl, br = quadrant_centres(decode(name)[0])
    assert close(tl, f.RED, 0) and close(bl, f.RED, 0)
    assert close(tr, f.BLUE, 0) and close(br, f.BLUE, 0)  # transparent index keeps its palette colour


def test_exif_orientation_6_rotates_clockwise():
    # Stored 64x48: TL red, TR green, BL blue, BR white. Rotated 90 deg clockwise for display (48x64):
    # TL blue, TR red, BL white, BR green. The reported size is the stored one.
    pixels, orig = decode("jpeg_exif_rot6")
    assert orig == (64, 48)
    tl, tr, bl, br = quadrant_centres(pixels)
    assert close(tl, f.BLUE) and close(tr, f.RED) and close(bl, f.WHITE) and close(br, f.GREEN)


def test_exif_orientation_8_rotates_counter_clockwise():
    # Rotated 90 deg counter-clockwise for display: TL green, TR white, BL red, BR blue.
    pixels, orig = decode("jpeg_exif_rot8")
    assert orig == (64, 48)
    tl, tr, bl, br = quadrant_centres(pixels)
    assert close(tl, f.GREEN) and close(tr, f.WHITE) and close(bl, f.RED) and close(br, f.BLUE)


def test_very_wide_image_is_centre_cropped():
    # 2000x20 with red | green (800..1200) | blue: shortest side -> S, then the centre S columns, all green.
    pixels, orig = decode("png_very_wide")
    assert orig == (2000, 20)
    assert close(pixels.reshape(-1, 3), f.GREEN, tol=0)


# ---------------------------------------------------------------- geometry vs open_clip

INTERPOLATIONS = ["bicubic", "bilinear"]
RESIZE_MODES = ["shortest", "longest", "squash"]
# (width, height) sources: square, wide, tall, smaller than every target, and extreme enough to pad a lot
SOURCES = [(64, 64), (100, 40), (30, 90), (13, 9), (200, 11)]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("target", [32, (24, 40), (40, 24)], ids=["square", "wide", "tall"])
@pytest.mark.parametrize("resize_mode", RESIZE_MODES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_decode_matches_open_clip_eval_transform(interpolation, resize_mode, target):
    """decode_image + normalize_uint8 == open_clip's image_transform(is_train=False) on the same PNG.

    Tolerance 1e-6: open_clip's eval transform resizes, crops and pads the same uint8 PIL image before
    ToTensor, so there is no rounding step between the two, only float arithmetic in the normalisation.
    One uint8 level anywhere would show as (1/255)/std >= 0.014, four orders of magnitude above it.
    """
    import open_clip
    import torch

    from pipeline.encode.model import normalize_uint8

    transform = open_clip.image_transform(
        target, is_train=False, interpolation=interpolation, resize_mode=resize_mode
    )
    preprocess = Preprocess(
        (target, target) if isinstance(target, int) else target, interpolation, resize_mode
    )
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    for i, (w, h) in enumerate(SOURCES):
        data = _png(f.smooth_rgb(w, h, seed=20 + i))
        reference = transform(Image.open(io.BytesIO(data)))
        pixels, orig = decode_image(data, preprocess, use_draft=False)
        assert orig == (w, h)
        assert pixels.shape == (*preprocess.size, 3) and pixels.dtype == np.uint8
        ours = normalize_uint8(torch.from_numpy(pixels)[None], mean, std)[0]
        assert ours.shape == reference.shape
        assert float((ours - reference).abs().max()) < 1e-6, (w, h)


def test_int_size_is_open_clips_default_square_geometry():
    data = _png(f.smooth_rgb(90, 50, seed=3))
    pixels, _ = decode_image(data, S)
    assert np.array_equal(pixels, decode_image(data, Preprocess((S, S), "bicubic", "shortest"))[0])


def test_longest_pads_with_black_and_keeps_the_whole_image():
    # 2000x20, red | green | blue: the long side fits 32 px, so the strip is 1 px high (a 0.32 px sliver
    # rounded up, where open_clip's rounding would reach 0 and fail), on row 15: the odd pad row goes below
    pixels, _ = decode_image(f.png_very_wide(), Preprocess((S, S), resize_mode="longest"))
    row = (S - 1) // 2
    assert close(pixels[row, 0], f.RED, 0) and close(pixels[row, S - 1], f.BLUE, 0)
    assert close(pixels[row, S // 2], f.GREEN, 0)
    assert not pixels[:row].any() and not pixels[row + 1 :].any()


def test_squash_keeps_the_whole_image_without_padding():
    pixels, _ = decode_image(f.png_very_wide(), Preprocess((S, S), "bilinear", "squash"))
    assert close(pixels[:, 0], f.RED, 0) and close(pixels[:, S // 2], f.GREEN, 0)
    assert close(pixels[:, S - 1], f.BLUE, 0)


@pytest.mark.parametrize("resize_mode", RESIZE_MODES)
@pytest.mark.parametrize("wh", [(300, 200), (200, 300), (33, 97), (S, S), (S + 1, S), (5, 4)])
def test_resize_to_gives_the_target_size(wh, resize_mode):
    out = resize_to(f.smooth_rgb(*wh, seed=12), Preprocess((S, S + 8), resize_mode=resize_mode))
    assert out.size == (S + 8, S)


# ---------------------------------------------------------------- the model's preprocess config


def test_preprocess_from_model_config_defaults_to_open_clips():
    import open_clip
    from open_clip.transform import PreprocessCfg

    assert Preprocess.from_model_config(open_clip.get_model_config("ViT-B-32")) == Preprocess((224, 224))
    assert Preprocess.from_model_config({"vision_cfg": {}}) == Preprocess((224, 224))  # CLIPVisionCfg default
    defaults = PreprocessCfg()
    assert (defaults.interpolation, defaults.resize_mode) == ("bicubic", "shortest")


def test_preprocess_from_model_config_reads_size_pair_and_preprocess_cfg():
    cfg = {
        "vision_cfg": {"image_size": [256, 320]},
        "preprocess_cfg": {"interpolation": "bilinear", "resize_mode": "squash", "mean": [0.5] * 3},
    }
    assert Preprocess.from_model_config(cfg) == Preprocess((256, 320), "bilinear", "squash")
    nulls = {"vision_cfg": {"image_size": 64}, "preprocess_cfg": {"interpolation": None, "resize_mode": None}}
    assert Preprocess.from_model_config(nulls) == Preprocess((64, 64), "bicubic", "shortest")
    # 'random' is a training option; open_clip's eval transform resizes bicubic for it
    random = {"vision_cfg": {"image_size": 64}, "preprocess_cfg": {"interpolation": "random"}}
    assert Preprocess.from_model_config(random).interpolation == "bicubic"


@pytest.mark.parametrize(
    ("preprocess_cfg", "named"),
    [
        ({"interpolation": "nearest"}, "interpolation 'nearest'"),
        ({"resize_mode": "crop"}, "resize_mode 'crop'"),
        ({"fill_color": 128}, "fill_color 128"),
    ],
)
def test_preprocess_from_model_config_rejects_what_it_cannot_follow(preprocess_cfg, named):
    with pytest.raises(ValueError, match=named):
        Preprocess.from_model_config({"vision_cfg": {"image_size": 64}, "preprocess_cfg": preprocess_cfg})


@pytest.mark.parametrize("size", [(0, 32), (32,), (32.0, 32)])
def test_preprocess_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match="positive ints"):
        Preprocess(size)


# ---------------------------------------------------------------- draft mode


@pytest.mark.parametrize("size", [64, Preprocess((48, 80), "bilinear", "squash")], ids=["int", "preprocess"])
def test_draft_mode_is_close_to_full_decode(monkeypatch, size):
    scales = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original_draft(self, mode, size)
        scales.append(result)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = f.jpeg_large()
    drafted, orig_a = decode_image(data, size, use_draft=True)
    full, orig_b = decode_image(data, size, use_draft=False)
    assert orig_a == orig_b == (1024, 768)  # the header size, not the DCT-reduced one
    shape = (size, size, 3) if isinstance(size, int) else (*size.size, 3)
    assert drafted.shape == full.shape == shape
    assert len(scales) == 1 and scales[0] is not None  # draft really reduced the decode (not a no-op)
    assert float(np.abs(drafted.astype(int) - full.astype(int)).mean()) < 8


# ---------------------------------------------------------------- bad cases


@pytest.mark.parametrize("name", sorted(f.BAD_CASES))
def test_bad_case_raises_decode_error_saying_why(name):
    with pytest.raises(DecodeError) as info:
        decode_image(f.BAD_CASES[name](), S)
    message = str(info.value).lower()
    assert any(reason in message for reason in f.BAD_CASE_REASONS[name]), message


def test_header_bomb_is_small_and_refused_before_decoding(monkeypatch):
    data = f.png_header_bomb()
    assert len(data) < 100
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self))
    with pytest.raises(DecodeError, match="max_pixels|bomb"):
        decode_image(data, S)
    # With Pillow's own bomb guard off, our max_pixels header check alone refuses it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert Image.open(io.BytesIO(data)).size == (100_000, 100_000)
    with pytest.raises(DecodeError, match="100000x100000.*max_pixels"):
        decode_image(data, S)
    assert loads == []  # no pixel data was ever decoded/allocated


def test_max_pixels_check_below_pillows_limit():
    data = f.png_header_bomb(5000, 4000)  # 20 Mpx: under Pillow's bomb limit, so only our check applies
    with pytest.raises(DecodeError, match="5000x4000.*max_pixels=1000000"):
        decode_image(data, S, max_pixels=1_000_000)
    pixels, orig = decode("jpeg_rgb", max_pixels=64 * 48)  # exactly at the limit is allowed
    assert orig == (64, 48) and pixels.shape == (S, S, 3)
    with pytest.raises(DecodeError, match="max_pixels"):
        decode("jpeg_rgb", max_pixels=64 * 48 - 1)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF it skips
def test_corrupted_images_only_ever_raise_decode_error():
    """Small deterministic fuzz: truncations and byte flips of every small good case."""
    rng = np.random.default_rng(13)
    seeds = [make() for name, make in sorted(f.GOOD_CASES.items()) if name != "jpeg_large"]
    seeds.append(f.tiff_bad_strip_offsets())
    outcomes = {"ok": 0, "error": 0}
    for i in range(400):
        data = bytearray(seeds[i % len(seeds)])
        if i % 3 == 0:
            data = data[: int(rng.integers(1, len(data)))]
        else:
            for _ in range(int(rng.integers(1, 6))):
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        try:
            pixels, _ = decode_image(bytes(data), 16)
        except DecodeError:
            outcomes["error"] += 1
        else:
            assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
            outcomes["ok"] += 1
    assert outcomes["error"] > 0 and outcomes["ok"] > 0
