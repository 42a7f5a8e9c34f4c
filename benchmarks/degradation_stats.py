"""How blurred and how corrupted LQ images are next to a clean downscale of their ground truth.

For each ground-truth image, the clean LR is its antialiased bicubic downscale (``bicubic_degrade``).
An LQ image is fitted as that clean LR blurred by a Gaussian of LR-pixel sigma s (s from a grid,
0 = no blur), plus a residual: the best s says how much blur the degradation adds beyond a clean
downscale, the residual's RMS (grey levels, per-channel mean removed, 4 border pixels shaved) how
much noise, JPEG and aliasing it adds. A third figure, the stretch, is the factor 1 + k by which the
LQ's bicubic upsampling, stretched about its top-left corner, best matches the ground truth (k from
0 to 0.01): Real-ESRGAN's code resizes by a factor whose size it rounds down, which shrinks the
content that way (``resize_by_factor``); k > 0 where that happened. Quantiles (10/25/50/75/90 %)
over the images are printed for testdata's imagenet-val LQ and for the same ground truth degraded by
each Real-ESRGAN setting given (two draws per image), and the share of images with k >= 0.001. The
LQ made here are measured, never trained on.

    python benchmarks/degradation_stats.py                                # test LQ, lite's config, defaults
    python benchmarks/degradation_stats.py --config runs/x/config.toml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from resshift_cli.imagefiles import load_image
from resshift_cli.training.config import load_train_config
from resshift_cli.training.degradations import (
    DegradationConfig,
    bicubic_degrade,
    bivariate_kernel,
    filter_image,
    realesrgan_degrade,
)

SIGMAS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.1, 1.4, 1.8, 2.4)
STRETCHES = np.arange(0, 0.01001, 0.00025)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
BORDER = 4


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a (3, H, W) image (3 sigma each side), reflected borders; sigma 0: unchanged."""
    if sigma == 0:
        return image
    radius = int(3 * sigma + 1)
    return filter_image(image, bivariate_kernel(2 * radius + 1, sigma, sigma))


def fit(lq: torch.Tensor, clean: torch.Tensor) -> tuple[float, float]:
    """(sigma, residual RMS in grey levels) of the blur of ``clean`` closest to ``lq``."""
    best = (0.0, float("inf"))
    for sigma in SIGMAS:
        residual = (lq - gaussian_blur(clean, sigma))[:, BORDER:-BORDER, BORDER:-BORDER]
        residual = residual - residual.mean(dim=(1, 2), keepdim=True)
        rms = float(residual.pow(2).mean().sqrt()) * 255
        if rms < best[1]:
            best = (sigma, rms)
    return best


def stretch(lq: torch.Tensor, truth: torch.Tensor) -> float:
    """The k in STRETCHES for which bicubic(lq) sampled at (x + 1/2)(1 + k) is closest to ``truth``."""
    up = F.interpolate(lq[None], scale_factor=4, mode="bicubic", align_corners=False)
    height, width = up.shape[-2:]
    rows, columns = torch.meshgrid(
        (torch.arange(height, dtype=torch.float64) + 0.5) / height,
        (torch.arange(width, dtype=torch.float64) + 0.5) / width,
        indexing="ij",
    )
    centres = torch.stack([columns, rows], -1)  # pixel centres, 0..1 across the image
    errors = []
    for k in STRETCHES:
        grid = (centres * (1 + k) * 2 - 1)[None].float()
        warped = F.grid_sample(up, grid, mode="bicubic", align_corners=False)[0]
        inner = (warped.clamp(0, 1) - truth)[:, 2 * BORDER : -2 * BORDER, 2 * BORDER : -2 * BORDER]
        errors.append(float(inner.pow(2).mean()))
    return float(STRETCHES[int(np.argmin(errors))])


def measure(lq: torch.Tensor, clean: torch.Tensor, truth: torch.Tensor) -> tuple[float, float, float]:
    return (*fit(lq, clean), stretch(lq, truth))


def row(name: str, fits: list[tuple[float, float, float]]) -> str:
    values = np.array(fits)
    sigma, rms = (" ".join(f"{q:5.2f}" for q in np.quantile(values[:, k], QUANTILES)) for k in (0, 1))
    k = " ".join(f"{q * 1000:4.1f}" for q in np.quantile(values[:, 2], QUANTILES))
    return f"{name:28} {sigma}   | {rms} | {k} | {np.mean(values[:, 2] >= 0.001):4.0%}"


def main(argv: list[str] | None = None) -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=root.parent / "shared")
    parser.add_argument(
        "--config", type=Path, action="append", help="a training config whose [data.realesrgan] to measure"
    )
    args = parser.parse_args(argv)

    gt_dir = args.shared / "testdata/sr/imagenet-val/gt"
    names = sorted(p.name for p in gt_dir.iterdir())
    truths = [torch.from_numpy(load_image(gt_dir / n).rgb).permute(2, 0, 1) for n in names]
    cleans = [bicubic_degrade(t, 4, quantise=False) for t in truths]
    settings = {"Real-ESRGAN defaults": DegradationConfig()}
    for path in args.config or [root / "configs/lite.toml"]:
        settings[str(path)] = load_train_config(path).data.realesrgan

    print(
        f"{'x4 LQ of imagenet-val GT':28} {'blur sigma (LR px) quantiles':31} | "
        f"{'residual RMS quantiles':29} | {'stretch k x 1000':24} | k >= 0.001"
    )
    lq_dir = gt_dir.parent / "lq"
    tests = [torch.from_numpy(load_image(lq_dir / n).rgb).permute(2, 0, 1) for n in names]
    print(row("testdata lq", [measure(lq, c, t) for lq, c, t in zip(tests, cleans, truths, strict=True)]))
    for name, config in settings.items():
        generator = torch.Generator().manual_seed(0)
        pairs = [(t, c) for _ in range(2) for t, c in zip(truths, cleans, strict=True)]
        fits = [measure(realesrgan_degrade(t, 4, config, generator), c, t) for t, c in pairs]
        print(row(name, fits))


if __name__ == "__main__":
    main()
