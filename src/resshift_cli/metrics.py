"""PSNR and SSIM the way super-resolution papers report them, for single images and whole folders.

Conventions (those of the common SR evaluation code, e.g. BasicSR's): pixels on the 0..255 scale
(float, not re-rounded after colour conversion), optionally only the luma Y of ITU-R BT.601 as MATLAB's
``rgb2ycbcr`` computes it (16..235), optionally with ``crop_border`` pixels removed from each side
(usually the scale factor). SSIM is Wang et al. (2004): 11x11 Gaussian window with sigma 1.5,
K1 = 0.01, K2 = 0.03, L = 255, "valid" filtering, averaged over the channels for RGB. Identical images
have a PSNR of ``inf``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from resshift_cli.imagefiles import IMAGE_SUFFIXES, ImageError, find_images, load_image

__all__ = [
    "EvalResult",
    "ImageScore",
    "evaluate_folders",
    "format_table",
    "psnr",
    "rgb_to_y",
    "ssim",
    "to_255",
]

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966]) / 255.0
_SSIM_SIZE = 11
_SSIM_SIGMA = 1.5
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def to_255(image: np.ndarray) -> np.ndarray:
    """``image`` as float64 on the 0..255 scale: uint8 as is, uint16 scaled by 255/65535, floats by 255."""
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array.astype(np.float64)
    if array.dtype == np.uint16:
        return array.astype(np.float64) * 255.0 / 65535.0
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float64) * 255.0
    raise TypeError(f"unsupported image dtype {array.dtype}; use uint8, uint16 or float in [0, 1]")


def rgb_to_y(rgb255: np.ndarray) -> np.ndarray:
    """BT.601 luma of an H x W x 3 RGB array on the 0..255 scale, as MATLAB's ``rgb2ycbcr`` (16..235).

    ``Y = 16 + (65.481 R + 128.553 G + 24.966 B)`` with R, G, B in [0, 1]; not rounded.
    """
    return 16.0 + np.asarray(rgb255, dtype=np.float64) @ _Y_WEIGHTS


def _prepare(
    a: np.ndarray, b: np.ndarray, crop_border: int, y_channel: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Both H x W x 3 images (already on the 0..255 scale) border-cropped, as H x W x C (C = 1 for Y)."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape} vs {b.shape}")
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"images must be H x W x 3, got {a.shape}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    x, y = a, b
    if crop_border:
        if min(x.shape[:2]) <= 2 * crop_border:
            raise ValueError(f"crop_border {crop_border} leaves nothing of a {x.shape[1]}x{x.shape[0]} image")
        x = x[crop_border:-crop_border, crop_border:-crop_border]
        y = y[crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        return rgb_to_y(x)[..., None], rgb_to_y(y)[..., None]
    return x, y


def psnr(a: np.ndarray, b: np.ndarray, *, crop_border: int = 0, y_channel: bool = False) -> float:
    """Peak signal-to-noise ratio in dB on the 0..255 scale (peak 255); ``inf`` for identical images.

    ``a`` and ``b``: H x W x 3 arrays of the same shape (uint8, uint16 or float in [0, 1]).
    """
    return _psnr255(to_255(a), to_255(b), crop_border, y_channel)


def _psnr255(a: np.ndarray, b: np.ndarray, crop_border: int, y_channel: bool) -> float:
    x, y = _prepare(a, b, crop_border, y_channel)
    mse = float(np.mean((x - y) ** 2))
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(255.0**2 / mse)


def _gaussian_window() -> np.ndarray:
    offsets = np.arange(_SSIM_SIZE) - _SSIM_SIZE // 2
    window = np.exp(-(offsets**2) / (2 * _SSIM_SIGMA**2))
    return window / window.sum()


def _filter_valid(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """'Valid' 2-D filtering of an H x W array with the separable window ``outer(window, window)``.

    Done as a sum of shifted slices along each axis, which needs no more memory than the image.
    """
    size = len(window)
    height, width = image.shape[0] - size + 1, image.shape[1] - size + 1
    rows = sum(w * image[i : i + height] for i, w in enumerate(window))
    return sum(w * rows[:, j : j + width] for j, w in enumerate(window))


def _ssim_channel(x: np.ndarray, y: np.ndarray) -> float:
    window = _gaussian_window()
    mu_x, mu_y = _filter_valid(x, window), _filter_valid(y, window)
    var_x = _filter_valid(x * x, window) - mu_x**2
    var_y = _filter_valid(y * y, window) - mu_y**2
    cov = _filter_valid(x * y, window) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + _C1) * (2 * cov + _C2)
    denominator = (mu_x**2 + mu_y**2 + _C1) * (var_x + var_y + _C2)
    return float(np.mean(numerator / denominator))


def ssim(a: np.ndarray, b: np.ndarray, *, crop_border: int = 0, y_channel: bool = False) -> float:
    """Structural similarity (Wang et al. 2004) on the 0..255 scale, the mean over channels for RGB.

    ``a`` and ``b``: H x W x 3 arrays of the same shape (uint8, uint16 or float in [0, 1]), at least
    11 x 11 after the border crop.
    """
    return _ssim255(to_255(a), to_255(b), crop_border, y_channel)


def _ssim255(a: np.ndarray, b: np.ndarray, crop_border: int, y_channel: bool) -> float:
    x, y = _prepare(a, b, crop_border, y_channel)
    if min(x.shape[:2]) < _SSIM_SIZE:
        size = f"{_SSIM_SIZE}x{_SSIM_SIZE}"
        raise ValueError(f"SSIM needs at least {size} pixels, got {x.shape[1]}x{x.shape[0]}")
    return float(np.mean([_ssim_channel(x[..., c], y[..., c]) for c in range(x.shape[2])]))


# ---------------------------------------------------------------------------------------------------
# Folders.


@dataclass
class ImageScore:
    """The scores of one output/ground-truth pair, or why there are none (``error``)."""

    name: str
    """The shared stem (output stem without the suffix)."""
    output: Path | None
    ground_truth: Path | None
    psnr: float | None = None
    ssim: float | None = None
    error: str | None = None


@dataclass
class EvalResult:
    """Per-image scores of a folder comparison, the files without a partner and the settings used."""

    rows: list[ImageScore]
    unmatched_outputs: list[Path] = field(default_factory=list)
    unmatched_ground_truth: list[Path] = field(default_factory=list)
    crop_border: int = 0
    y_channel: bool = True

    @property
    def scored(self) -> list[ImageScore]:
        """The rows that have scores (no error)."""
        return [row for row in self.rows if row.error is None]

    @property
    def errors(self) -> list[ImageScore]:
        """The rows that could not be scored."""
        return [row for row in self.rows if row.error is not None]

    @property
    def mean_psnr(self) -> float | None:
        """Mean PSNR over the scored images (``inf`` if any pair is identical), None if there are none."""
        values = [row.psnr for row in self.scored if row.psnr is not None]
        return float(np.mean(values)) if values else None

    @property
    def mean_ssim(self) -> float | None:
        """Mean SSIM over the scored images, None if there are none."""
        values = [row.ssim for row in self.scored if row.ssim is not None]
        return float(np.mean(values)) if values else None

    def to_dict(self) -> dict:
        """Plain data for JSON; an infinite PSNR becomes the string "inf" (JSON has no infinity)."""
        return {
            "crop_border": self.crop_border,
            "y_channel": self.y_channel,
            "count": len(self.scored),
            "mean_psnr": _json_number(self.mean_psnr),
            "mean_ssim": self.mean_ssim,
            "images": [
                {
                    "name": row.name,
                    "output": None if row.output is None else str(row.output),
                    "ground_truth": None if row.ground_truth is None else str(row.ground_truth),
                    "psnr": _json_number(row.psnr),
                    "ssim": row.ssim,
                    "error": row.error,
                }
                for row in self.rows
            ],
            "unmatched_outputs": [str(p) for p in self.unmatched_outputs],
            "unmatched_ground_truth": [str(p) for p in self.unmatched_ground_truth],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The result as standard JSON text (see :meth:`to_dict`)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def _json_number(value: float | None) -> float | str | None:
    if value is not None and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _images_by_stem(folder: Path, suffix: str) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in find_images(folder, recursive=False, suffixes=IMAGE_SUFFIXES)[0]:
        stem = path.stem
        if suffix and stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
        found.setdefault(stem, []).append(path)
    return found


def _load_255(path: Path) -> np.ndarray:
    """An image on the 0..255 scale, its samples first rounded back to the exact levels of the source.

    The loader's float32 carries a little rounding error; 16-bit levels are scaled as ``v * 255 / 65535``
    (multiply first), so a 16-bit copy of an 8-bit image gives the very same values.
    """
    image = load_image(path)
    top = 255.0 if image.bit_depth == 8 else 65535.0
    return np.round(image.rgb.astype(np.float64) * top) * 255.0 / top


def _score(
    name: str, output: Path, truth: Path, crop_border: int, y_channel: bool, modcrop: int
) -> ImageScore:
    row = ImageScore(name, output, truth)
    try:
        out, gt = _load_255(output), _load_255(truth)
    except ImageError as e:
        row.error = str(e)
        return row
    if modcrop > 1:
        gt = gt[: gt.shape[0] // modcrop * modcrop, : gt.shape[1] // modcrop * modcrop]
    if out.shape != gt.shape:
        row.error = (
            f"size differs: output {out.shape[1]}x{out.shape[0]}, ground truth {gt.shape[1]}x{gt.shape[0]}"
        )
        return row
    try:
        row.psnr = _psnr255(out, gt, crop_border, y_channel)
        row.ssim = _ssim255(out, gt, crop_border, y_channel)
    except ValueError as e:
        row.psnr = row.ssim = None
        row.error = str(e)
    return row


def evaluate_folders(
    outputs: Path,
    ground_truth: Path,
    *,
    crop_border: int = 0,
    y_channel: bool = True,
    suffix: str = "",
    modcrop: int = 0,
) -> EvalResult:
    """Score every output image against the ground-truth image with the same stem.

    ``suffix`` is removed from the end of output stems before matching (``baby_x4.png`` with suffix
    ``_x4`` matches ``baby.png``); extensions need not agree. Files without a partner are listed in the
    result; pairs that cannot be scored (unreadable, sizes differ, several files with one stem, too small)
    become rows with an ``error`` instead of raising. Only image files directly in each folder are read.
    ``modcrop`` crops the ground truth to a multiple of it first (top-left), as SR papers do with the
    scale factor, so that an x4 output of its LR image lines up.
    """
    outputs, ground_truth = Path(outputs), Path(ground_truth)
    for folder in (outputs, ground_truth):
        if not folder.is_dir():
            raise NotADirectoryError(f"not a folder: {folder}")
    produced = _images_by_stem(outputs, suffix)
    truths = _images_by_stem(ground_truth, "")
    rows = []
    for name in sorted(produced.keys() & truths.keys()):
        out_paths, gt_paths = produced[name], truths[name]
        if len(out_paths) > 1 or len(gt_paths) > 1:
            clash = ", ".join(p.name for p in [*out_paths, *gt_paths])
            error = f"ambiguous, several files: {clash}"
            rows.append(ImageScore(name, out_paths[0], gt_paths[0], error=error))
            continue
        rows.append(_score(name, out_paths[0], gt_paths[0], crop_border, y_channel, modcrop))
    return EvalResult(
        rows=rows,
        unmatched_outputs=[p for name in sorted(produced.keys() - truths.keys()) for p in produced[name]],
        unmatched_ground_truth=[p for name in sorted(truths.keys() - produced.keys()) for p in truths[name]],
        crop_border=crop_border,
        y_channel=y_channel,
    )


def _format_psnr(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.2f}"


def _format_ssim(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(result: EvalResult) -> str:
    """A plain-text table: one line per image (PSNR in dB, SSIM or the error), the means, the unmatched."""
    channel = "Y" if result.y_channel else "RGB"
    header = ("image", f"PSNR ({channel})", f"SSIM ({channel})")
    lines = [(row.name, _format_psnr(row.psnr), _format_ssim(row.ssim)) for row in result.rows]
    mean = (f"mean of {len(result.scored)}", _format_psnr(result.mean_psnr), _format_ssim(result.mean_ssim))
    widths = [max(len(r[i]) for r in [header, *lines, mean]) for i in range(3)]

    def render(cells: tuple[str, str, str]) -> str:
        return f"{cells[0]:<{widths[0]}}  {cells[1]:>{widths[1]}}  {cells[2]:>{widths[2]}}".rstrip()

    rule = "-" * (sum(widths) + 4)
    text = [render(header), rule]
    for row, cells in zip(result.rows, lines, strict=True):
        text.append(render(cells) + (f"  error: {row.error}" if row.error else ""))
    text += [rule, render(mean), f"crop border: {result.crop_border} px"]
    for label, paths in (
        ("outputs without ground truth", result.unmatched_outputs),
        ("ground truth without output", result.unmatched_ground_truth),
    ):
        if paths:
            text.append(f"{label}: " + ", ".join(p.name for p in paths))
    return "\n".join(text)


def make_lr_images(ground_truth: Path, out: Path, scale: int) -> list[Path]:
    """Write the x``scale`` bicubic-downsampled LR input of every image in ``ground_truth`` to ``out``.

    The ground truth is first cropped to a multiple of ``scale``; downsampling is MATLAB-style
    antialiased bicubic, as the SR benchmarks (Set5, Set14, BSD100) are made. PNG, same stems.
    """
    import torch

    from resshift_cli.imagefiles import save_image
    from resshift_cli.training.degradations import bicubic_degrade

    written = []
    for path in find_images(ground_truth, recursive=False, suffixes=IMAGE_SUFFIXES)[0]:
        rgb = load_image(path).rgb
        h, w = rgb.shape[0] // scale * scale, rgb.shape[1] // scale * scale
        hq = torch.from_numpy(np.ascontiguousarray(rgb[:h, :w])).permute(2, 0, 1)[None]
        lr = bicubic_degrade(hq, scale)[0].permute(1, 2, 0).numpy()
        target = Path(out) / f"{path.stem}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        save_image(target, lr)
        written.append(target)
    return written
