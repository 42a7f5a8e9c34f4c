"""Reading and writing image files.

This is the only module that touches image files. It uses Pillow and numpy only (no torch), so the
command line starts quickly; callers turn the arrays into tensors themselves.

Pixels travel as float32 arrays in [0, 1]: colour always as H x W x 3 RGB (what the models take) and
alpha separately as H x W. What the writer needs to give the output the character of the input
(grayscale, 8 or 16 bits, ICC profile) travels alongside in :class:`LoadedImage`.

16-bit colour: Pillow has no 16-bit RGB mode. It reads 16-bit RGB(A) PNG and TIFF truncated to 8 bits
and cannot write them. This module reads them in full by decoding the file twice, once for the high and
once for the low byte of every sample (Pillow's ``;16B``/``;16L`` unpackers each keep one byte), and
writes 16-bit colour PNG and TIFF with small encoders of its own (zlib from the standard library).
"""

from __future__ import annotations

import errno
import os
import re
import struct
import sys
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError, features

from resshift_cli.atomic import write_atomically
from resshift_cli.errors import InputError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "INPUT_SUFFIXES",
    "ImageError",
    "LoadedImage",
    "find_images",
    "load_image",
    "output_extension",
    "probe_image",
    "resize_alpha",
    "save_image",
]

DEFAULT_MAX_PIXELS = 16384 * 16384
"""Largest image ``load_image`` decodes by default (268,435,456 pixels): a guard against decompression
bombs, files whose header claims a size that would exhaust memory."""

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
"""Lower-case file suffixes treated as images when looking for inputs."""

INPUT_SUFFIXES: frozenset[str] = IMAGE_SUFFIXES | {".gif"}
"""Suffixes of the files a restore run takes from input directories: the image suffixes and GIF,
which is read (its first frame) but not written."""

# Pillow formats load_image accepts. Limiting Image.open to these keeps every other Pillow plugin
# (EPS runs Ghostscript, for example) away from untrusted input. The JPEG opener also returns the
# multi-picture JPEGs (format "MPO") of many phone cameras.
_READ_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")

_WRITE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}

_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# Raw layouts of 16-bit colour that Pillow reads into 8-bit RGB/RGBA by keeping one byte per sample.
_WIDE_COLOUR_RAWMODE = re.compile(r"(RGB|RGBA|RGBX);16([BLN])")
# The byte order whose unpacker keeps the *other* byte of each sample.
_OTHER_BYTE = {"B": "L", "L": "B", "N": "B" if sys.byteorder == "little" else "L"}

_EXIF_ORIENTATION = 0x0112


class ImageError(InputError):
    """An image file could not be read or written; the message is one line and names the file."""


@dataclass
class LoadedImage:
    """A decoded image: pixels for the model plus what the writer needs to reproduce the source."""

    rgb: np.ndarray
    """float32, H x W x 3, in [0, 1]; grayscale sources have three equal channels."""
    alpha: np.ndarray | None
    """float32, H x W, in [0, 1], or None when the source has no transparency."""
    grayscale: bool
    """The source had no colour (write it back as grayscale)."""
    bit_depth: int
    """8 or 16: the precision of the source samples."""
    icc_profile: bytes | None
    """The source's ICC profile (RGB or gray), to embed in the output."""
    format: str | None
    """Pillow's name for the source format ("PNG", "JPEG", ...)."""
    notices: list[str] = field(default_factory=list)
    """Things the user should be told, such as "only the first frame of an animation is used"."""

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, the Pillow convention."""
        return self.rgb.shape[1], self.rgb.shape[0]


def output_extension(input_path: str | os.PathLike[str], ext: str = "auto") -> str:
    """The suffix (".png", ...) for the output made from ``input_path``.

    ``ext`` "auto" keeps the input's suffix when it is a format we write, else ".png" (GIF input, say);
    any writable format name ("png", "jpg", "webp", "bmp", "tif", with or without the dot) forces it.
    """
    choice = ext.strip().lower().lstrip(".")
    if choice == "auto":
        suffix = Path(input_path).suffix.lower()
        return suffix if suffix in _WRITE_FORMATS else ".png"
    if f".{choice}" in _WRITE_FORMATS:
        return f".{choice}"
    names = ", ".join(sorted(s[1:] for s in _WRITE_FORMATS))
    raise ValueError(f"unknown output format {ext!r}; use auto or one of {names}")


def find_images(
    root: str | os.PathLike[str],
    *,
    recursive: bool = True,
    exclude: str | os.PathLike[str] | None = None,
    suffixes: frozenset[str] = INPUT_SUFFIXES,
) -> tuple[list[Path], list[Path]]:
    """The image files under the folder ``root`` (by suffix; hidden files left out) and the other
    files, each sorted by their path relative to ``root``.

    With ``recursive`` every level is searched; symlinked folders are followed once, so loops end;
    the folder ``exclude`` (an output folder inside an input folder) is not entered.
    """
    root = Path(root)
    images: list[Path] = []
    others: list[Path] = []
    seen: set[tuple[int, int]] = set()
    if exclude is not None and Path(exclude).is_dir() and not os.path.samefile(exclude, root):
        st = os.stat(exclude)
        seen.add((st.st_dev, st.st_ino))
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file():
                (images if path.suffix.lower() in suffixes else others).append(path)
        if not recursive:
            dirnames[:] = []

    def by_relative_path(path: Path) -> str:
        return path.relative_to(root).as_posix()

    return sorted(images, key=by_relative_path), sorted(others, key=by_relative_path)


def load_image(path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode an image file fully into float arrays, upright (EXIF orientation applied).

    Images above ``max_pixels`` (width x height; None means no limit) are refused before any pixel
    is decoded. Every failure (missing, empty, truncated, corrupt, not an image, too large) raises
    :class:`ImageError` with a one-line message naming the file; no other exception escapes.
    Pillow's warnings about a damaged but readable file become notices.
    """
    source = Path(path)
    with _reading(source):
        # Pillow warns about damaged files through Python's warnings, which print two lines of its
        # source code; they become one-line notices instead.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _open(source) as im:
                _check_pixel_limit(source, im.size, max_pixels)
                image = _decode(source, im)
        image.notices += list(dict.fromkeys(_one_line(w.message) for w in caught))
        return image


def probe_image(
    path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """The upright (width, height) of an image file, from its header alone: what can be known
    about an input before its pixels (and the model) are needed. Raises :class:`ImageError` as
    :func:`load_image` does; a file that passes may still fail to decode later."""
    source = Path(path)
    with _reading(source), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _open(source) as im:
            _check_pixel_limit(source, im.size, max_pixels)
            width, height = im.size
            try:
                turned = im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8)
            except Exception:  # broken EXIF: load_image uses such an image as stored
                turned = False
    return (height, width) if turned else (width, height)


@contextmanager
def _reading(source: Path) -> Iterator[None]:
    """Turn every failure to read ``source`` into a one-line :class:`ImageError` naming it."""
    try:
        if source.is_dir():
            raise ImageError(f"cannot read {source}: it is a directory, not an image file")
        if source.stat().st_size == 0:
            raise ImageError(f"cannot read {source}: the file is empty (0 bytes)")
        yield
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        names = "PNG, JPEG, WebP, BMP, TIFF or GIF"
        raise ImageError(f"cannot read {source}: not an image file Pillow can read as {names}") from e
    except MemoryError as e:
        raise ImageError(f"cannot read {source}: not enough memory to decode it") from e
    # Pillow's plugins raise all sorts of exceptions on malformed data (OSError, ValueError,
    # SyntaxError, struct.error, EOFError, IndexError, ...); every one means "unreadable file".
    except Exception as e:
        raise ImageError(f"cannot read {source}: {_read_failure(e)}") from e


def save_image(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    *,
    alpha: np.ndarray | None = None,
    grayscale: bool = False,
    bit_depth: int = 8,
    icc_profile: bytes | None = None,
    quality: int = 95,
) -> None:
    """Write ``rgb`` (float H x W x 3 in [0, 1]; outside values clipped) atomically to ``path``.

    The format follows the suffix (.png .jpg .jpeg .webp .bmp .tif .tiff). Samples are rounded (not
    truncated) to 8 bits, or to 16 bits when ``bit_depth`` is 16 and the format is PNG or TIFF.
    ``grayscale`` writes one luminance channel (ITU-R 601 weights, as Pillow). ``alpha`` (H x W) is
    re-attached, except for JPEG and BMP, which cannot carry it: those get the colour only. The ICC
    profile is embedded when the format can hold one and its colour space (RGB or gray) matches the
    output; a mismatched profile is left out rather than mislabel the pixels. ``quality`` applies to
    JPEG (always 4:4:4 chroma) and WebP; WebP at quality 100 is lossless.

    The file is written under a temporary name beside the target and renamed over it, so an existing
    output is never left half-written. Failures raise :class:`ImageError` (bad arguments ValueError).
    """
    dest = Path(path)
    fmt = _WRITE_FORMATS.get(dest.suffix.lower())
    if fmt is None:
        raise ImageError(
            f"cannot write {dest}: unknown image extension {dest.suffix or '(none)'!r}; "
            "use .png, .jpg, .jpeg, .webp, .bmp, .tif or .tiff"
        )
    colour = np.asarray(rgb)
    if colour.ndim != 3 or colour.shape[2] != 3:
        raise ValueError(f"rgb must be an H x W x 3 array, got shape {colour.shape}")
    if alpha is not None and np.shape(alpha) != colour.shape[:2]:
        raise ValueError(f"alpha must be an H x W array matching rgb, got shape {np.shape(alpha)}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be between 1 and 100, got {quality}")
    if fmt in ("JPEG", "BMP"):
        alpha = None
    wide = bit_depth == 16 and fmt in ("PNG", "TIFF")
    dtype, top = (np.uint16, 65535) if wide else (np.uint8, 255)

    planes = [_luma(colour)[..., None]] if grayscale else [colour]
    if alpha is not None:
        planes.append(np.asarray(alpha)[..., None])
    pixels = _quantise(np.concatenate(planes, axis=2), top, dtype)
    icc = icc_profile if _icc_colour_space(icc_profile) == ("GRAY" if grayscale else "RGB") else None

    if wide and pixels.shape[2] > 1:
        if fmt == "PNG":
            _atomic_write(dest, lambda f: _write_png16(f, pixels, icc))
        else:
            # Pillow reads no 16-bit gray + alpha TIFF, so that case is stored as RGBA to stay readable
            # (a gray ICC profile would then mislabel it and is left out).
            if pixels.shape[2] == 2:
                pixels, icc = pixels[..., [0, 0, 0, 1]], None
            _atomic_write(dest, lambda f: _write_tiff16(f, pixels, icc))
        return
    image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    params = _save_params(fmt, quality, icc)
    _atomic_write(dest, lambda f: image.save(f, format=fmt, **params))


def resize_alpha(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an H x W alpha plane to ``size`` (width, height): bicubic, clipped to [0, 1].

    The models restore colour only, so alpha is scaled separately to match the output.
    """
    plane = Image.fromarray(np.ascontiguousarray(alpha, dtype=np.float32))
    resized = plane.resize((int(size[0]), int(size[1])), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


# Reading -------------------------------------------------------------------------------------------


@contextmanager
def _open(path: Path) -> Iterator[ImageFile.ImageFile]:
    """Open ``path`` as one of our formats, as ``Image.open`` does, but without its decompression
    bomb check: that applies Pillow's process-wide limit, where ours (checked from the header by
    the caller) is the user's ``--max-pixels``."""
    Image.preinit()
    with open(path, "rb") as fp:
        prefix = fp.read(16)
        for name in _READ_FORMATS:
            if name not in Image.OPEN:
                Image.init()
            factory, accept = Image.OPEN[name]
            verdict = accept(prefix) if accept is not None else True
            if not verdict or isinstance(verdict, str):  # a string: "this format, but unsupported"
                continue
            fp.seek(0)
            try:
                im = factory(fp, str(path))
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
            with im:
                yield im
            return
    raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}")


def _check_pixel_limit(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"cannot read {path}: {width}x{height} is {width * height:,} pixels, above the limit of "
            f"{max_pixels:,}; if you trust this file, raise the limit with --max-pixels"
        )


def _decode(path: Path, im: ImageFile.ImageFile) -> LoadedImage:
    """Decode an opened (not yet loaded) image into a LoadedImage."""
    notices: list[str] = []
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        notices.append(f"the file has {frames} frames; only the first is used")
    fmt = im.format
    icc = im.info.get("icc_profile") or None
    rawmodes = {_tile_rawmode(tile) for tile in im.tile}

    alpha: np.ndarray | None = None
    if im.mode in ("RGB", "RGBA") and rawmodes and all(_is_wide_colour(r) for r in rawmodes):
        high = _upright(im, notices)
        with _open(path) as other:
            other.tile = [_with_rawmode(t, _other_byte(_tile_rawmode(t) or "")) for t in other.tile]
            low = _upright(other, [])
        values = (np.asarray(high, dtype=np.uint16) << 8) | np.asarray(low, dtype=np.uint16)
        grayscale, bit_depth = False, 16
        rgb = values[..., :3] / np.float32(65535)
        if values.shape[2] == 4:
            alpha = values[..., 3] / np.float32(65535)
        else:
            alpha = _colour_key_alpha(values, im.info.get("transparency"))
    elif im.mode == "RGBA" and rawmodes == {"LA;16B"}:
        # 16-bit gray + alpha PNG: Pillow keeps only the high bytes, but reading the same 4 bytes per
        # pixel as 8-bit RGBA yields gray high, gray low, alpha high, alpha low.
        im.tile = [_with_rawmode(t, "RGBA") for t in im.tile]
        values = np.asarray(_upright(im, notices), dtype=np.uint16)
        gray = (values[..., 0] << 8) | values[..., 1]
        rgb = np.repeat(gray[..., None] / np.float32(65535), 3, axis=2)
        alpha = ((values[..., 2] << 8) | values[..., 3]) / np.float32(65535)
        grayscale, bit_depth = True, 16
    else:
        image = _upright(im, notices)
        rgb, alpha = _pixels(image, notices)
        grayscale = image.mode in _GRAY_MODES
        bit_depth = 16 if image.mode in _WIDE_GRAY_MODES else 8
        if bit_depth == 8 and any(r and ";16" in r for r in rawmodes):
            notices.append("this 16-bit layout is read at 8 bits per sample (a Pillow limit)")

    if _icc_colour_space(icc) not in ("RGB", "GRAY"):
        icc = None
    return LoadedImage(
        rgb=np.ascontiguousarray(rgb, dtype=np.float32),
        alpha=None if alpha is None else np.ascontiguousarray(alpha, dtype=np.float32),
        grayscale=grayscale,
        bit_depth=bit_depth,
        icc_profile=icc,
        format=fmt,
        notices=notices,
    )


def _upright(im: Image.Image, notices: list[str]) -> Image.Image:
    """Decode fully (a truncated file raises here) and apply the EXIF orientation."""
    im.load()
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:
        # Broken EXIF must not make a decodable image unreadable; the pixels are used as stored.
        notices.append("the EXIF orientation could not be read; the image is used as stored")
    return im


def _pixels(image: Image.Image, notices: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """RGB and alpha as float arrays from a decoded image in any 8-bit or grayscale mode."""
    mode = image.mode
    if mode in _WIDE_GRAY_MODES:
        values = np.asarray(image)
        if mode == "F":
            gray = np.clip(np.nan_to_num(values.astype(np.float32)), 0.0, 1.0)
        else:
            gray = np.clip(values.astype(np.float32), 0, 65535) / np.float32(65535)
        alpha = _colour_key_alpha(values, image.info.get("transparency")) if mode != "F" else None
        return np.repeat(gray[..., None], 3, axis=2), alpha

    has_alpha = "A" in mode or "a" in mode or "transparency" in image.info
    if mode == "CMYK":
        notices.append("CMYK converted to RGB without colour management; colours may shift")
    if mode in ("1", "L", "LA", "La"):
        values = np.asarray(image.convert("LA" if has_alpha else "L"))
        gray = (values[..., 0] if has_alpha else values) / np.float32(255)
        alpha = values[..., 1] / np.float32(255) if has_alpha else None
        return np.repeat(gray[..., None], 3, axis=2), alpha
    values = np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
    alpha = values[..., 3] / np.float32(255) if has_alpha else None
    return values[..., :3] / np.float32(255), alpha


def _colour_key_alpha(values: np.ndarray, key: Any) -> np.ndarray | None:
    """Alpha from a PNG tRNS colour key on 16-bit data: transparent where the pixel equals the key."""
    if key is None or isinstance(key, bytes):
        return None
    if values.ndim == 3:
        opaque = np.any(values[..., :3] != np.asarray(key, dtype=values.dtype)[:3], axis=2)
    else:
        opaque = values != key
    return opaque.astype(np.float32)


def _tile_rawmode(tile: Any) -> str | None:
    args = tile[3]
    raw = args[0] if isinstance(args, tuple) and args else args
    return raw if isinstance(raw, str) else None


def _with_rawmode(tile: Any, rawmode: str) -> Any:
    args = tile[3]
    new_args = (rawmode, *args[1:]) if isinstance(args, tuple) else rawmode
    return tile._replace(args=new_args) if hasattr(tile, "_replace") else (*tile[:3], new_args)


def _is_wide_colour(rawmode: str | None) -> bool:
    return rawmode is not None and _WIDE_COLOUR_RAWMODE.fullmatch(rawmode) is not None


def _other_byte(rawmode: str) -> str:
    return rawmode[:-1] + _OTHER_BYTE[rawmode[-1]]


def _read_failure(error: Exception) -> str:
    """A short reason for a read failure."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, PermissionError):
        return "permission denied"
    text = _one_line(error)
    if "truncated" in text:
        return f"the file is truncated ({text})"
    return f"corrupt or unsupported image ({type(error).__name__}: {text})"


def _icc_colour_space(icc: bytes | None) -> str | None:
    """The data colour space an ICC profile describes ("RGB", "GRAY", "CMYK", ...), from its header."""
    if not icc or len(icc) < 20:
        return None
    return icc[16:20].decode("ascii", "replace").strip()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# Writing -------------------------------------------------------------------------------------------


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luminance, the weights Pillow uses for RGB -> L; equal channels stay unchanged."""
    rgb = rgb.astype(np.float32, copy=False)
    return rgb[..., 0] * np.float32(0.299) + rgb[..., 1] * np.float32(0.587) + rgb[..., 2] * np.float32(0.114)


def _quantise(values: np.ndarray, top: int, dtype: type[np.integer]) -> np.ndarray:
    """Clip to [0, 1] (NaN to 0) and round to integers 0..top."""
    values = np.nan_to_num(values.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=0.0)
    return np.ascontiguousarray(np.rint(np.clip(values, 0.0, 1.0) * np.float32(top)).astype(dtype))


def _save_params(fmt: str, quality: int, icc: bytes | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if icc is not None and fmt != "BMP":
        params["icc_profile"] = icc
    if fmt == "JPEG":
        params.update(quality=quality, subsampling=0)
    elif fmt == "WEBP":
        # exact keeps the colour under fully transparent pixels, so alpha can be edited later.
        params.update(quality=quality, lossless=quality >= 100, exact=True)
    elif fmt == "TIFF" and features.check_codec("libtiff"):
        params["compression"] = "tiff_deflate"
    return params


def _atomic_write(dest: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``dest`` through a temporary file beside it (see :mod:`resshift_cli.atomic`)."""

    def create(temp: Path) -> None:
        with open(temp, "xb") as f:
            write(f)

    try:
        write_atomically(dest, create)
    except Exception as e:
        raise ImageError(f"cannot write {dest}: {_write_failure(e)}") from e


def _write_failure(error: Exception) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "the disk is full (no space left on device)"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[0].lower() + error.strerror[1:]
    return _one_line(error)


def _png_chunk(f: BinaryIO, kind: bytes, data: bytes) -> None:
    f.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)))


def _write_png16(f: BinaryIO, pixels: np.ndarray, icc: bytes | None) -> None:
    """A 16-bit PNG (gray + alpha, RGB or RGBA) from H x W x C uint16, which Pillow cannot write."""
    height, width, channels = pixels.shape
    colour_type = {2: 4, 3: 2, 4: 6}[channels]
    f.write(b"\x89PNG\r\n\x1a\n")
    _png_chunk(f, b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
    if icc:
        _png_chunk(f, b"iCCP", b"ICC profile\0\0" + zlib.compress(icc))
    step = 2 * channels
    stream = zlib.compressobj(6)
    for top in range(0, height, 256):
        rows = pixels[top : top + 256].astype(">u2").view(np.uint8).reshape(-1, width * step)
        # PNG "Sub" filter on every row: each byte minus the same byte of the pixel to its left.
        filtered = rows.copy()
        filtered[:, step:] -= rows[:, :-step]
        lines = np.concatenate((np.ones((len(rows), 1), np.uint8), filtered), axis=1)
        data = stream.compress(lines.tobytes())
        if data:
            _png_chunk(f, b"IDAT", data)
    _png_chunk(f, b"IDAT", stream.flush())
    _png_chunk(f, b"IEND", b"")


def _write_tiff16(f: BinaryIO, pixels: np.ndarray, icc: bytes | None) -> None:
    """A 16-bit RGB or RGBA TIFF (Deflate, horizontal predictor), which Pillow cannot write."""
    height, width, channels = pixels.shape
    rows_per_strip = max(1, (1 << 20) // (width * channels * 2))
    f.write(b"II*\0\0\0\0\0")
    offsets, counts = [], []
    for top in range(0, height, rows_per_strip):
        strip = pixels[top : top + rows_per_strip]
        # Predictor 2: every sample minus the same channel of the pixel to its left (modulo 2**16).
        delta = strip.copy()
        delta[:, 1:] -= strip[:, :-1]
        data = zlib.compress(delta.astype("<u2").tobytes(), 6)
        offsets.append(f.tell())
        counts.append(len(data))
        f.write(data)
    if f.tell() % 2:
        f.write(b"\0")
    short, long_, undefined = 3, 4, 7
    entries: list[tuple[int, int, int, bytes]] = [
        (256, long_, 1, struct.pack("<I", width)),
        (257, long_, 1, struct.pack("<I", height)),
        (258, short, channels, struct.pack(f"<{channels}H", *[16] * channels)),
        (259, short, 1, struct.pack("<H", 8)),
        (262, short, 1, struct.pack("<H", 2)),
        (273, long_, len(offsets), struct.pack(f"<{len(offsets)}I", *offsets)),
        (277, short, 1, struct.pack("<H", channels)),
        (278, long_, 1, struct.pack("<I", rows_per_strip)),
        (279, long_, len(counts), struct.pack(f"<{len(counts)}I", *counts)),
        (284, short, 1, struct.pack("<H", 1)),
        (317, short, 1, struct.pack("<H", 2)),
    ]
    if channels == 4:
        entries.append((338, short, 1, struct.pack("<H", 2)))
    if icc:
        entries.append((34675, undefined, len(icc), icc))
    ifd_offset = f.tell()
    extra_offset = ifd_offset + 2 + 12 * len(entries) + 4
    table, extra = [struct.pack("<H", len(entries))], []
    for tag, kind, count, value in entries:
        if len(value) <= 4:
            table.append(struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0"))
        else:
            table.append(struct.pack("<HHII", tag, kind, count, extra_offset))
            padded = value + b"\0" * (len(value) % 2)
            extra.append(padded)
            extra_offset += len(padded)
    if extra_offset > 0xFFFFFFFF:
        raise ValueError("the image is too large for a TIFF file (over 4 GB)")
    f.write(b"".join(table) + b"\0\0\0\0" + b"".join(extra))
    f.seek(4)
    f.write(struct.pack("<I", ifd_offset))
    f.seek(0, os.SEEK_END)
