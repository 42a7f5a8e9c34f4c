"""Image files in and out: formats, bit depths, modes, metadata, bad input and atomic output.

Every test writes real files with Pillow (or, where Pillow cannot, by hand) and reads them back.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile
from reference import shared_path

from resshift_cli import atomic, imagefiles
from resshift_cli.imagefiles import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    load_image,
    output_extension,
    probe_image,
    resize_alpha,
    save_image,
)

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def shared_file(*parts: str) -> Path:
    return shared_path("testdata", *parts)


def noise(shape: tuple[int, ...], top: int = 255, seed: int = 0) -> np.ndarray:
    dtype = np.uint8 if top == 255 else np.uint16
    return np.random.default_rng(seed).integers(0, top + 1, shape).astype(dtype)


def smooth_rgb(height: int = 48, width: int = 64) -> np.ndarray:
    """A gentle gradient, so lossy codecs stay close to it."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return np.stack([x / width, y / height, 0.5 + 0.3 * np.sin(x / 9)], axis=2).astype(np.float32)


def levels(values: np.ndarray, top: int = 255) -> np.ndarray:
    return np.rint(values * top).astype(np.int64)


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def png_ihdr(path: Path) -> tuple[int, int]:
    """(bit depth, colour type) straight from the PNG header."""
    data = path.read_bytes()
    assert data[12:16] == b"IHDR"
    return data[24], data[25]


# Round trips -------------------------------------------------------------------------------------


def test_png_8bit_round_trip_is_exact(tmp_path: Path) -> None:
    pixels = noise((23, 31, 3))
    Image.fromarray(pixels).save(tmp_path / "in.png")
    loaded = load_image(tmp_path / "in.png")
    assert loaded.rgb.dtype == np.float32 and loaded.rgb.shape == (23, 31, 3)
    assert loaded.size == (31, 23)
    assert (loaded.format, loaded.bit_depth, loaded.grayscale, loaded.alpha) == ("PNG", 8, False, None)
    assert loaded.notices == []
    save_image(tmp_path / "out.png", loaded.rgb)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), pixels)


@pytest.mark.parametrize("suffix", [".bmp", ".tif", ".tiff"])
def test_lossless_formats_round_trip_exactly(tmp_path: Path, suffix: str) -> None:
    pixels = noise((17, 29, 3), seed=1)
    Image.fromarray(pixels).save(tmp_path / f"in{suffix}")
    loaded = load_image(tmp_path / f"in{suffix}")
    save_image(tmp_path / f"out{suffix}", loaded.rgb)
    with Image.open(tmp_path / f"out{suffix}") as out:
        assert out.format == {".bmp": "BMP"}.get(suffix, "TIFF")
        assert np.array_equal(np.asarray(out), pixels)


@pytest.mark.parametrize(("suffix", "fmt"), [(".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")])
def test_lossy_formats_round_trip_closely(tmp_path: Path, suffix: str, fmt: str) -> None:
    rgb = smooth_rgb()
    save_image(tmp_path / f"out{suffix}", rgb, quality=95)
    with Image.open(tmp_path / f"out{suffix}") as out:
        assert out.format == fmt
    loaded = load_image(tmp_path / f"out{suffix}")
    assert loaded.format == fmt and loaded.rgb.shape == rgb.shape
    assert np.abs(loaded.rgb - rgb).mean() < 2 / 255


def test_webp_quality_100_is_lossless_with_alpha(tmp_path: Path) -> None:
    pixels = noise((19, 21, 4), seed=2)
    rgb, alpha = pixels[..., :3] / 255, pixels[..., 3] / 255
    save_image(tmp_path / "out.webp", rgb, alpha=alpha, quality=100)
    with Image.open(tmp_path / "out.webp") as out:
        assert out.mode == "RGBA"
        assert np.array_equal(np.asarray(out), pixels)


def test_values_are_rounded_and_clipped(tmp_path: Path) -> None:
    rgb = np.zeros((1, 4, 3), np.float32)
    rgb[0, :, 0] = [100.6 / 255, 100.4 / 255, -0.5, 1.7]
    rgb[0, 0, 1] = np.nan
    save_image(tmp_path / "out.png", rgb)
    assert np.asarray(Image.open(tmp_path / "out.png"))[0, :, 0].tolist() == [101, 100, 0, 255]
    assert np.asarray(Image.open(tmp_path / "out.png"))[0, 0, 1] == 0


def test_save_rejects_wrong_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="H x W x 3"):
        save_image(tmp_path / "out.png", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="alpha"):
        save_image(tmp_path / "out.png", np.zeros((4, 4, 3), np.float32), alpha=np.zeros((3, 4)))
    assert files_in(tmp_path) == []


# Orientation, ICC, alpha, grayscale ----------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = (255, 0, 0)
    pixels[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a quarter turn clockwise
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.size == (16, 32)
    assert loaded.rgb.shape == (32, 16, 3)
    top, bottom = loaded.rgb[:12].mean(axis=(0, 1)), loaded.rgb[-12:].mean(axis=(0, 1))
    assert top[0] > 0.9 and top[2] < 0.1, "the stored left half (red) must end up on top"
    assert bottom[2] > 0.9 and bottom[0] < 0.1


def test_broken_exif_does_not_make_the_image_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.fromarray(noise((4, 6, 3))).save(tmp_path / "in.png")

    def broken(*args: object, **kwargs: object) -> None:
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(imagefiles.ImageOps, "exif_transpose", broken)
    loaded = load_image(tmp_path / "in.png")
    assert loaded.size == (6, 4)
    # The caller names the file (the CLI prefixes every notice with the input), the notice does not.
    assert len(loaded.notices) == 1 and "EXIF" in loaded.notices[0] and "in.png" not in loaded.notices[0]


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".tif"])
def test_icc_profile_is_carried_to_the_output(tmp_path: Path, suffix: str) -> None:
    Image.fromarray(noise((8, 8, 3))).save(tmp_path / "in.png", icc_profile=SRGB)
    loaded = load_image(tmp_path / "in.png")
    assert loaded.icc_profile == SRGB
    save_image(tmp_path / f"out{suffix}", loaded.rgb, icc_profile=loaded.icc_profile)
    with Image.open(tmp_path / f"out{suffix}") as out:
        assert out.info.get("icc_profile") == SRGB


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_icc_profile_in_16bit_colour_output(tmp_path: Path, suffix: str) -> None:
    save_image(tmp_path / f"out{suffix}", smooth_rgb(8, 8), bit_depth=16, icc_profile=SRGB)
    with Image.open(tmp_path / f"out{suffix}") as out:
        assert out.info.get("icc_profile") == SRGB


def test_rgb_icc_profile_is_not_put_on_grayscale_output(tmp_path: Path) -> None:
    save_image(tmp_path / "out.png", smooth_rgb(8, 8), grayscale=True, icc_profile=SRGB)
    with Image.open(tmp_path / "out.png") as out:
        assert out.mode == "L"
        assert "icc_profile" not in out.info


def test_alpha_is_kept(tmp_path: Path) -> None:
    pixels = noise((13, 17, 4), seed=3)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    loaded = load_image(tmp_path / "in.png")
    assert loaded.alpha is not None and loaded.alpha.shape == (13, 17)
    assert np.array_equal(levels(loaded.alpha), pixels[..., 3])
    assert np.array_equal(levels(loaded.rgb), pixels[..., :3])
    save_image(tmp_path / "out.png", loaded.rgb, alpha=loaded.alpha)
    with Image.open(tmp_path / "out.png") as out:
        assert out.mode == "RGBA"
        assert np.array_equal(np.asarray(out), pixels)


@pytest.mark.parametrize("suffix", [".jpg", ".bmp"])
def test_formats_without_alpha_get_the_colour_only(tmp_path: Path, suffix: str) -> None:
    rgb = smooth_rgb(16, 16)
    save_image(tmp_path / f"out{suffix}", rgb, alpha=np.zeros((16, 16), np.float32))
    with Image.open(tmp_path / f"out{suffix}") as out:
        assert out.mode == "RGB"
        assert np.abs(np.asarray(out) / 255 - rgb).mean() < 2 / 255


def test_grayscale_in_grayscale_out(tmp_path: Path) -> None:
    pixels = noise((11, 9), seed=4)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    loaded = load_image(tmp_path / "in.png")
    assert loaded.grayscale and loaded.bit_depth == 8
    assert loaded.rgb.shape == (11, 9, 3)
    assert all(np.array_equal(levels(loaded.rgb[..., c]), pixels) for c in range(3))
    save_image(tmp_path / "out.png", loaded.rgb, grayscale=True)
    with Image.open(tmp_path / "out.png") as out:
        assert out.mode == "L"
        assert np.array_equal(np.asarray(out), pixels)


def test_grayscale_output_uses_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((1, 3, 3), np.float32)
    rgb[0, 0, 0] = rgb[0, 1, 1] = rgb[0, 2, 2] = 1.0
    save_image(tmp_path / "out.png", rgb, grayscale=True)
    assert np.asarray(Image.open(tmp_path / "out.png"))[0].tolist() == [76, 150, 29]


def test_color_input_is_not_grayscale(tmp_path: Path) -> None:
    Image.fromarray(noise((4, 4, 3))).save(tmp_path / "in.png")
    assert not load_image(tmp_path / "in.png").grayscale


# 16 bits ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grayscale_survives_load_and_save(tmp_path: Path, suffix: str) -> None:
    values = noise((12, 10), top=65535, seed=5)
    values[0, 0], values[0, 1] = 65535, 257  # 257 and 256 differ only below the top byte
    values[0, 2] = 256
    Image.fromarray(values).save(tmp_path / f"in{suffix}")
    loaded = load_image(tmp_path / f"in{suffix}")
    assert (loaded.bit_depth, loaded.grayscale) == (16, True)
    assert np.array_equal(levels(loaded.rgb[..., 0], 65535), values)
    save_image(tmp_path / f"out{suffix}", loaded.rgb, grayscale=True, bit_depth=16)
    with Image.open(tmp_path / f"out{suffix}") as out:
        assert out.mode.startswith("I;16")
        assert np.array_equal(np.asarray(out).astype(np.uint16), values)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_16bit_colour_survives_save_and_load(tmp_path: Path, suffix: str, with_alpha: bool) -> None:
    values = noise((9, 14, 4), top=65535, seed=6)
    values[0, 0, :3] = (65535, 257, 256)
    rgb = values[..., :3] / np.float32(65535)
    alpha = values[..., 3] / np.float32(65535) if with_alpha else None
    save_image(tmp_path / f"out{suffix}", rgb, alpha=alpha, bit_depth=16)
    with Image.open(tmp_path / f"out{suffix}") as out:  # Pillow sees a 16-bit file (and would truncate)
        assert out.mode == ("RGBA" if with_alpha else "RGB")
        assert ";16" in str(out.tile[0][3])
    if suffix == ".png":
        assert png_ihdr(tmp_path / "out.png") == (16, 6 if with_alpha else 2)
    loaded = load_image(tmp_path / f"out{suffix}")
    assert (loaded.bit_depth, loaded.grayscale, loaded.notices) == (16, False, [])
    assert np.array_equal(levels(loaded.rgb, 65535), values[..., :3])
    if with_alpha:
        assert loaded.alpha is not None
        assert np.array_equal(levels(loaded.alpha, 65535), values[..., 3])
    else:
        assert loaded.alpha is None


def test_16bit_gray_with_alpha_png(tmp_path: Path) -> None:
    values = noise((7, 5, 2), top=65535, seed=7)
    gray = np.repeat(values[..., :1] / np.float32(65535), 3, axis=2)
    save_image(tmp_path / "out.png", gray, alpha=values[..., 1] / 65535, grayscale=True, bit_depth=16)
    assert png_ihdr(tmp_path / "out.png") == (16, 4)
    loaded = load_image(tmp_path / "out.png")
    assert (loaded.bit_depth, loaded.grayscale) == (16, True)
    assert np.array_equal(levels(loaded.rgb[..., 1], 65535), values[..., 0])
    assert loaded.alpha is not None
    assert np.array_equal(levels(loaded.alpha, 65535), values[..., 1])


def test_16bit_gray_with_alpha_tiff_is_stored_as_rgba(tmp_path: Path) -> None:
    values = noise((6, 4, 2), top=65535, seed=8)
    gray = np.repeat(values[..., :1] / np.float32(65535), 3, axis=2)
    save_image(tmp_path / "out.tif", gray, alpha=values[..., 1] / 65535, grayscale=True, bit_depth=16)
    loaded = load_image(tmp_path / "out.tif")
    assert loaded.bit_depth == 16 and loaded.alpha is not None
    assert np.array_equal(levels(loaded.rgb[..., 2], 65535), values[..., 0])
    assert np.array_equal(levels(loaded.alpha, 65535), values[..., 1])


def test_16bit_png_colour_key_transparency(tmp_path: Path) -> None:
    gray = np.array([[5, 300, 300]], np.uint16)
    Image.fromarray(gray).save(tmp_path / "gray.png", transparency=300)
    loaded = load_image(tmp_path / "gray.png")
    assert loaded.bit_depth == 16 and loaded.alpha is not None
    assert loaded.alpha[0].tolist() == [1.0, 0.0, 0.0]

    colour = np.array([[[1, 2, 3], [1, 2, 4]]], np.uint16)
    save_image(tmp_path / "colour.png", colour / 65535, bit_depth=16)
    data = (tmp_path / "colour.png").read_bytes()
    key = struct.pack(">3H", 1, 2, 3)
    trns = struct.pack(">I", 6) + b"tRNS" + key + struct.pack(">I", zlib.crc32(b"tRNS" + key))
    end_of_ihdr = 8 + 8 + 13 + 4
    (tmp_path / "colour.png").write_bytes(data[:end_of_ihdr] + trns + data[end_of_ihdr:])
    loaded = load_image(tmp_path / "colour.png")
    assert loaded.bit_depth == 16 and loaded.alpha is not None
    assert loaded.alpha[0].tolist() == [0.0, 1.0]


def write_raw_rgb16_tiff(path: Path, values: np.ndarray, big_endian: bool) -> None:
    """An uncompressed 16-bit RGB TIFF, which Pillow cannot write."""
    height, width, _ = values.shape
    order = ">" if big_endian else "<"
    data = values.astype(f"{order}u2").tobytes()
    # (tag, type, count, value or None for "points to the extra data")
    entries = [
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, None), (259, 3, 1, 1), (262, 3, 1, 2),
        (273, 4, 1, None), (277, 3, 1, 3), (278, 4, 1, height), (279, 4, 1, len(data)), (284, 3, 1, 1),
    ]  # fmt: skip
    extra = 8 + 2 + 12 * len(entries) + 4
    pointers = {258: extra, 273: extra + 6}
    out = (b"MM" if big_endian else b"II") + struct.pack(f"{order}HIH", 42, 8, len(entries))
    for tag, kind, count, value in entries:
        if value is None:
            out += struct.pack(f"{order}HHII", tag, kind, count, pointers[tag])
        elif kind == 3:
            out += struct.pack(f"{order}HHIHH", tag, kind, count, value, 0)
        else:
            out += struct.pack(f"{order}HHII", tag, kind, count, value)
    path.write_bytes(out + b"\0\0\0\0" + struct.pack(f"{order}3H", 16, 16, 16) + data)


@pytest.mark.parametrize("big_endian", [False, True])
def test_uncompressed_16bit_rgb_tiff_is_read_in_full(tmp_path: Path, big_endian: bool) -> None:
    values = noise((5, 7, 3), top=65535, seed=9)
    write_raw_rgb16_tiff(tmp_path / "in.tif", values, big_endian)
    assert Image.open(tmp_path / "in.tif").tile[0][0] == "raw"
    loaded = load_image(tmp_path / "in.tif")
    assert loaded.bit_depth == 16
    assert np.array_equal(levels(loaded.rgb, 65535), values)


def test_16bit_request_for_8bit_formats_writes_8bit(tmp_path: Path) -> None:
    save_image(tmp_path / "out.bmp", smooth_rgb(4, 4), bit_depth=16)
    assert Image.open(tmp_path / "out.bmp").mode == "RGB"


# Unusual modes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_cmyk_becomes_rgb(tmp_path: Path, suffix: str) -> None:
    cmyk = Image.frombytes("CMYK", (2, 1), bytes([255, 0, 0, 0, 0, 0, 0, 255]))
    cmyk.resize((16, 8), Image.Resampling.NEAREST).save(tmp_path / f"in{suffix}", quality=100)
    loaded = load_image(tmp_path / f"in{suffix}")
    assert not loaded.grayscale and loaded.rgb.shape == (8, 16, 3)
    assert np.allclose(loaded.rgb[4, 2], (0, 1, 1), atol=0.05), "pure cyan"
    assert np.allclose(loaded.rgb[4, 13], (0, 0, 0), atol=0.05), "pure black"
    assert any("CMYK" in notice for notice in loaded.notices)


def test_palette_with_transparency_keeps_alpha(tmp_path: Path) -> None:
    image = Image.new("P", (4, 2))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "in.png", transparency=0)
    loaded = load_image(tmp_path / "in.png")
    assert loaded.alpha is not None
    assert loaded.alpha[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert loaded.rgb[0, 1].tolist() == [0.0, 1.0, 0.0]
    assert not loaded.grayscale


def test_palette_without_transparency(tmp_path: Path) -> None:
    Image.fromarray(noise((6, 6, 3))).quantize(8).save(tmp_path / "in.png")
    expected = np.asarray(Image.open(tmp_path / "in.png").convert("RGB"))
    loaded = load_image(tmp_path / "in.png")
    assert loaded.alpha is None
    assert np.array_equal(levels(loaded.rgb), expected)


def test_gray_with_alpha(tmp_path: Path) -> None:
    pixels = noise((5, 6, 2), seed=10)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    assert Image.open(tmp_path / "in.png").mode == "LA"
    loaded = load_image(tmp_path / "in.png")
    assert loaded.grayscale and loaded.alpha is not None
    assert np.array_equal(levels(loaded.rgb[..., 0]), pixels[..., 0])
    assert np.array_equal(levels(loaded.alpha), pixels[..., 1])
    save_image(tmp_path / "out.png", loaded.rgb, alpha=loaded.alpha, grayscale=True)
    with Image.open(tmp_path / "out.png") as out:
        assert out.mode == "LA"
        assert np.array_equal(np.asarray(out), pixels)


def test_bilevel_is_gray(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 255, 255]], np.uint8)).convert("1").save(tmp_path / "in.png")
    loaded = load_image(tmp_path / "in.png")
    assert loaded.grayscale and loaded.bit_depth == 8
    assert loaded.rgb[0, :, 0].tolist() == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_i16_modes_scale_by_65535(tmp_path: Path, mode: str) -> None:
    order = ">" if mode == "I;16B" else "<"
    data = np.array([[0, 300, 65535]], f"{order}u2").tobytes()
    Image.frombytes(mode, (3, 1), data).save(tmp_path / "in.tif")
    assert Image.open(tmp_path / "in.tif").mode == mode
    loaded = load_image(tmp_path / "in.tif")
    assert (loaded.grayscale, loaded.bit_depth) == (True, 16)
    assert np.array_equal(levels(loaded.rgb[0, :, 0], 65535), [0, 300, 65535])


def test_i_mode_scales_by_65535_and_clips(tmp_path: Path) -> None:
    Image.fromarray(np.array([[-5, 0, 300, 70000]], np.int32)).save(tmp_path / "in.tif")
    assert Image.open(tmp_path / "in.tif").mode == "I"
    loaded = load_image(tmp_path / "in.tif")
    assert loaded.grayscale and loaded.bit_depth == 16
    assert np.array_equal(levels(loaded.rgb[0, :, 0], 65535), [0, 0, 300, 65535])


def test_f_mode_is_clipped_to_unit_range(tmp_path: Path) -> None:
    Image.fromarray(np.array([[-1.0, 0.25, 0.5, 1.5]], np.float32)).save(tmp_path / "in.tif")
    assert Image.open(tmp_path / "in.tif").mode == "F"
    loaded = load_image(tmp_path / "in.tif")
    assert loaded.grayscale
    assert loaded.rgb[0, :, 0].tolist() == [0.0, 0.25, 0.5, 1.0]


def test_animated_gif_gives_first_frame_and_a_notice(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(tmp_path / "anim.gif").n_frames == 3
    loaded = load_image(tmp_path / "anim.gif")
    assert np.allclose(loaded.rgb[4, 4], (1, 0, 0))
    assert len(loaded.notices) == 1
    assert "3 frames" in loaded.notices[0] and "first" in loaded.notices[0]
    assert "anim.gif" not in loaded.notices[0]


def test_animated_png_gives_first_frame_and_a_notice(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((10, 20, 30), (200, 100, 0))]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    loaded = load_image(tmp_path / "anim.png")
    assert levels(loaded.rgb[0, 0]).tolist() == [10, 20, 30]
    assert any("2 frames" in notice for notice in loaded.notices)


# Real files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flower2.jpeg", "penguin1.png"])
def test_real_rgba_images(tmp_path: Path, name: str) -> None:
    source = shared_file("sr", "realset65", name)
    expected = np.asarray(Image.open(source).convert("RGBA"))
    loaded = load_image(source)
    assert loaded.format == "PNG", "the format comes from the content, not the suffix"
    assert loaded.alpha is not None
    assert np.array_equal(levels(loaded.rgb), expected[..., :3])
    assert np.array_equal(levels(loaded.alpha), expected[..., 3])
    save_image(tmp_path / "out.png", loaded.rgb, alpha=loaded.alpha, icc_profile=loaded.icc_profile)
    with Image.open(tmp_path / "out.png") as out:
        assert np.array_equal(np.asarray(out), expected)
        assert out.info.get("icc_profile") == loaded.icc_profile


# Bad input ----------------------------------------------------------------------------------------


def assert_read_error(path: Path, *fragments: str, **kwargs: object) -> str:
    with pytest.raises(ImageError) as caught:
        load_image(path, **kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_bomb_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (200, 100)).save(tmp_path / "big.png")
    decoded: list[object] = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or original_load(self))
    assert_read_error(tmp_path / "big.png", "200x100", "20,000", "19,999", "--max-pixels", max_pixels=19_999)
    assert decoded == []
    assert load_image(tmp_path / "big.png", max_pixels=20_000).size == (200, 100)
    assert load_image(tmp_path / "big.png", max_pixels=None).size == (200, 100)


def test_our_limit_replaces_pillows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (200, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow alone would refuse this (> 2x)
    assert load_image(tmp_path / "big.png").size == (200, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000, "Pillow's setting must be restored"
    assert DEFAULT_MAX_PIXELS >= 256_000_000


def test_pillows_own_pixel_limit_is_neither_used_nor_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only our limit (--max-pixels) applies: with Pillow's process-wide limit far below the image,
    which would make Image.open refuse it, the image loads, and Pillow's setting is left as it is."""
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "in.png")
    assert load_image(tmp_path / "in.png").size == (16, 16)
    assert probe_image(tmp_path / "in.png") == (16, 16)
    assert Image.MAX_IMAGE_PIXELS == 10
    assert_read_error(tmp_path / "in.png", "above the limit of 100", max_pixels=100)


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    assert_read_error(tmp_path / "empty.png", "empty")


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("this is not an image\n" * 20)
    assert_read_error(tmp_path / "notes.png", "not an image")


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".tif", ".bmp"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    Image.fromarray(noise((64, 64, 3), seed=11)).save(tmp_path / f"whole{suffix}")
    data = (tmp_path / f"whole{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert_read_error(tmp_path / f"cut{suffix}")


def test_directory_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "folder.png").mkdir()
    assert_read_error(tmp_path / "folder.png", "directory")
    assert_read_error(tmp_path / "missing.png", "no such file")


def test_formats_outside_the_list_are_not_opened(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "image.ppm")
    assert_read_error(tmp_path / "image.ppm", "not an image")


BROKEN_HEADERS = [b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"\xff\xd8\xff" + b"\x01" * 60, b"GIF89a"]


@pytest.mark.parametrize("garbage", BROKEN_HEADERS)
def test_broken_headers(tmp_path: Path, garbage: bytes) -> None:
    (tmp_path / "broken.png").write_bytes(garbage)
    assert_read_error(tmp_path / "broken.png")


# Atomic output ------------------------------------------------------------------------------------


def test_save_replaces_existing_output_and_leaves_no_temp_file(tmp_path: Path) -> None:
    (tmp_path / "out.png").write_bytes(b"old")
    save_image(tmp_path / "out.png", smooth_rgb(4, 4))
    assert files_in(tmp_path) == ["out.png"]
    assert Image.open(tmp_path / "out.png").size == (4, 4)


def test_temp_file_is_hidden_beside_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def recording_replace(source: str | Path, target: str | Path) -> None:
        renames.append((str(source), str(target)))
        real_replace(source, target)

    monkeypatch.setattr(atomic.os, "replace", recording_replace)
    save_image(tmp_path / "out.png", smooth_rgb(4, 4))
    save_image(tmp_path / "out.png", smooth_rgb(4, 4))
    (first, target), (second, _) = renames
    assert target == str(tmp_path / "out.png")
    assert Path(first).parent == tmp_path
    assert Path(first).name.startswith(".") and first.endswith(".tmp")
    assert first != second


def test_failed_write_keeps_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "out.png").write_bytes(b"old output")

    def half_written(self: Image.Image, fp: io.BufferedWriter, *args: object, **kwargs: object) -> None:
        fp.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", half_written)
    with pytest.raises(ImageError) as caught:
        save_image(tmp_path / "out.png", smooth_rgb(4, 4))
    assert str(tmp_path / "out.png") in str(caught.value) and "disk is full" in str(caught.value)
    assert (tmp_path / "out.png").read_bytes() == b"old output"
    assert files_in(tmp_path) == ["out.png"]


def test_failed_16bit_write_keeps_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "out.tif").write_bytes(b"old output")

    def broken(*args: object) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(imagefiles.zlib, "compress", broken)
    with pytest.raises(ImageError, match="input/output error"):
        save_image(tmp_path / "out.tif", smooth_rgb(4, 4), bit_depth=16)
    assert (tmp_path / "out.tif").read_bytes() == b"old output"
    assert files_in(tmp_path) == ["out.tif"]


def test_unwritable_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a regular file, not a directory")
    with pytest.raises(ImageError) as caught:
        save_image(tmp_path / "file" / "out.png", smooth_rgb(4, 4))
    message = str(caught.value)
    assert str(tmp_path / "file" / "out.png") in message and "\n" not in message
    assert files_in(tmp_path) == ["file"]


def test_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"out\.xyz.*unknown image extension"):
        save_image(tmp_path / "out.xyz", smooth_rgb(4, 4))
    assert files_in(tmp_path) == []


# Small helpers ------------------------------------------------------------------------------------


def test_output_extension() -> None:
    assert output_extension("a/photo.JPG", "auto") == ".jpg"
    assert output_extension("photo.webp", "auto") == ".webp"
    assert output_extension("scan.tiff", "auto") == ".tiff"
    assert output_extension("anim.gif", "auto") == ".png"
    assert output_extension("noext", "auto") == ".png"
    assert output_extension("photo.jpg", "png") == ".png"
    assert output_extension("photo.png", "jpg") == ".jpg"
    assert output_extension("photo.png", ".WEBP") == ".webp"
    with pytest.raises(ValueError, match="gif"):
        output_extension("photo.png", "gif")


def test_resize_alpha() -> None:
    alpha = np.zeros((4, 6), np.float32)
    alpha[:, 3:] = 1.0
    resized = resize_alpha(alpha, (24, 16))
    assert resized.shape == (16, 24) and resized.dtype == np.float32
    assert resized.min() >= 0.0 and resized.max() <= 1.0, "bicubic overshoot is clipped"
    assert resized[:, :8].max() < 0.05 and resized[:, 16:].min() > 0.95
    assert np.allclose(resize_alpha(np.full((3, 3), 0.5, np.float32), (7, 5)), 0.5)


def test_module_does_not_import_torch() -> None:
    code = "import sys, resshift_cli.imagefiles; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
