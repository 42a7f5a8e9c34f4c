"""Low-quality training inputs made on the fly from high-quality images.

Two degradations for x4 (or any integer factor) super-resolution training:

* :func:`bicubic_degrade`: MATLAB-style bicubic downsampling (antialiased Keys cubic, a = -0.5, symmetric
  borders), the "bicubic" LR of the classic SR benchmarks.
* :func:`realesrgan_degrade`: the second-order degradation of Real-ESRGAN (Wang et al. 2021), written
  here from the paper's description: two rounds of blur -> random resize -> noise -> JPEG, then a
  resize to the LQ size together with a sinc filter and JPEG, in random order. Defaults are the paper's
  (:class:`DegradationConfig`).

Every random choice comes from an explicit ``torch.Generator``; the global RNGs are never touched, so
the same seed gives the same output bit for bit. Images are float32 tensors in [0, 1], shaped
(N, 3, H, W) or (3, H, W). Unlike Real-ESRGAN, which draws the resize scale and mode once per batch,
each image here draws its own, so images of a batch are degraded independently of each other.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "JPEG_CODECS",
    "KERNEL_TYPES",
    "RESIZE_MODES",
    "DegradationConfig",
    "add_gaussian_noise",
    "add_poisson_noise",
    "bicubic_degrade",
    "bivariate_kernel",
    "check_shrink_range",
    "filter_image",
    "jpeg_compress",
    "random_crop_flip",
    "random_kernel",
    "random_shrink",
    "realesrgan_degrade",
    "sinc_kernel",
    "torch_jpeg",
]

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
"""Blur kernel families of Real-ESRGAN, in the order of :attr:`DegradationConfig.kernel_probs`."""

RESIZE_MODES = ("area", "bilinear", "bicubic")
"""Interpolation modes the random resize chooses from (``torch.nn.functional.interpolate`` names)."""

JPEG_CODECS = ("pillow", "torch")
"""JPEG implementations :attr:`DegradationConfig.jpeg` names: see :func:`jpeg_compress` and
:func:`torch_jpeg`."""

_ODD_SIZES_7_TO_21 = (7, 9, 11, 13, 15, 17, 19, 21)


@dataclass(frozen=True)
class DegradationConfig:
    """Parameters of the Real-ESRGAN degradation; the defaults are those of the Real-ESRGAN x4 model.

    Fields ending in ``2`` belong to the second round, which happens with probability
    ``second_order_prob`` (1 in Real-ESRGAN; ResShift's training uses 0.5, which gives milder inputs;
    the final resize, sinc filter and JPEG always happen). Noise sigmas are on the 0..255 scale. Resize
    probabilities are (up, down, keep); the scale is drawn in [1, hi] going up and [lo, 1] going down.
    Sequences given as lists are stored as tuples; inconsistent values raise ``ValueError``.

    Two fields choose between a clean implementation and the one in Real-ESRGAN's training code,
    which made the LQ of test sets such as ResShift's ImageNet one: ``jpeg`` ("pillow", a real JPEG
    round trip, or "torch", Real-ESRGAN's JPEG in floating point: :func:`torch_jpeg`, at a quality
    drawn as a real number) and ``resize_by_factor`` (False: the first round's random
    resize maps the image onto its rounded-down new size; True: it samples at the drawn factor, as
    ``interpolate(scale_factor=...)`` does there, so the content shrinks by up to a pixel, anchored
    at the top-left corner, against its ground truth). The defaults keep the clean ones.
    """

    kernel_sizes: tuple[int, ...] = _ODD_SIZES_7_TO_21
    kernel_types: tuple[str, ...] = KERNEL_TYPES
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    sinc_prob: float = 0.1
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[int, int] = (30, 95)

    second_order_prob: float = 1.0
    second_blur_prob: float = 0.8
    kernel_sizes2: tuple[int, ...] = _ODD_SIZES_7_TO_21
    kernel_types2: tuple[str, ...] = KERNEL_TYPES
    kernel_probs2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    sinc_prob2: float = 0.1
    resize_probs2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[int, int] = (30, 95)

    final_sinc_prob: float = 0.8
    final_kernel_sizes: tuple[int, ...] = _ODD_SIZES_7_TO_21
    resize_modes: tuple[str, ...] = RESIZE_MODES
    jpeg: str = "pillow"
    resize_by_factor: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        for suffix in ("", "2"):
            sizes = getattr(self, f"kernel_sizes{suffix}")
            types = getattr(self, f"kernel_types{suffix}")
            probs = getattr(self, f"kernel_probs{suffix}")
            _check_probs(f"kernel_probs{suffix}", probs, len(types))
            unknown = set(types) - set(KERNEL_TYPES)
            if unknown:
                raise ValueError(f"kernel_types{suffix}: unknown kernel type(s) {sorted(unknown)}")
            _check_sizes(f"kernel_sizes{suffix}", sizes)
            _check_probs(f"resize_probs{suffix}", getattr(self, f"resize_probs{suffix}"), 3)
            for name in ("betag_range", "betap_range", "noise_range", "poisson_scale_range"):
                _check_range(f"{name}{suffix}", getattr(self, f"{name}{suffix}"), low=0.0)
            if _check_range(f"blur_sigma{suffix}", getattr(self, f"blur_sigma{suffix}"), low=0.0)[0] <= 0:
                raise ValueError(
                    f"blur_sigma{suffix} must be positive, got {getattr(self, f'blur_sigma{suffix}')}"
                )
            lo, hi = _check_range(f"resize_range{suffix}", getattr(self, f"resize_range{suffix}"), low=0.0)
            if lo <= 0 or lo > 1 or hi < 1:
                raise ValueError(f"resize_range{suffix} must satisfy 0 < lo <= 1 <= hi, got {(lo, hi)}")
            q_lo, q_hi = _check_range(f"jpeg_range{suffix}", getattr(self, f"jpeg_range{suffix}"), low=1)
            if q_hi > 100 or q_lo != int(q_lo) or q_hi != int(q_hi):
                raise ValueError(f"jpeg_range{suffix} must be whole qualities in 1..100, got {(q_lo, q_hi)}")
        _check_sizes("final_kernel_sizes", self.final_kernel_sizes)
        for name in (
            "sinc_prob",
            "sinc_prob2",
            "gaussian_noise_prob",
            "gaussian_noise_prob2",
            "gray_noise_prob",
            "gray_noise_prob2",
            "second_order_prob",
            "second_blur_prob",
            "final_sinc_prob",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not self.resize_modes or set(self.resize_modes) - set(RESIZE_MODES):
            raise ValueError(f"resize_modes must be a non-empty subset of {RESIZE_MODES}")
        if self.jpeg not in JPEG_CODECS:
            raise ValueError(f"jpeg must be one of {', '.join(JPEG_CODECS)}, got {self.jpeg!r}")
        if not isinstance(self.resize_by_factor, bool):
            raise ValueError(f"resize_by_factor must be true or false, got {self.resize_by_factor!r}")


def _check_probs(name: str, probs: Sequence[float], count: int) -> None:
    if len(probs) != count or any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
        raise ValueError(f"{name} must be {count} non-negative probabilities summing to 1, got {probs}")


def _check_sizes(name: str, sizes: Sequence[int]) -> None:
    if not sizes or any(int(s) != s or s < 1 or s % 2 == 0 for s in sizes):
        raise ValueError(f"{name} must be a non-empty list of odd positive kernel sizes, got {sizes}")


def _check_range(name: str, pair: Sequence[float], *, low: float) -> tuple[float, float]:
    if len(pair) != 2 or pair[0] > pair[1] or pair[0] < low:
        raise ValueError(f"{name} must be (lo, hi) with {low} <= lo <= hi, got {pair}")
    return pair[0], pair[1]


class _Stage(NamedTuple):
    """The parameters of one degradation round, picked out of the flat config."""

    kernel_sizes: tuple[int, ...]
    kernel_types: tuple[str, ...]
    kernel_probs: tuple[float, ...]
    blur_sigma: tuple[float, float]
    betag_range: tuple[float, float]
    betap_range: tuple[float, float]
    sinc_prob: float
    resize_probs: tuple[float, float, float]
    resize_range: tuple[float, float]
    gaussian_noise_prob: float
    noise_range: tuple[float, float]
    poisson_scale_range: tuple[float, float]
    gray_noise_prob: float
    jpeg_range: tuple[int, int]


def _stage(config: DegradationConfig, stage: int) -> _Stage:
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    suffix = "" if stage == 1 else "2"
    return _Stage(*(getattr(config, f"{name}{suffix}") for name in _Stage._fields))


# ---------------------------------------------------------------------------------------------------
# Random draws, all from an explicit generator.


def _rand(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * _rand(generator)


def _randint(generator: torch.Generator, lo: int, hi: int) -> int:
    """A whole number in [lo, hi], both ends included."""
    return int(torch.randint(int(lo), int(hi) + 1, (), generator=generator))


def _choice(generator: torch.Generator, options: Sequence, probs: Sequence[float] | None = None):
    if probs is None:
        return options[_randint(generator, 0, len(options) - 1)]
    r = _rand(generator) * sum(probs)
    total = 0.0
    for option, p in zip(options, probs, strict=True):
        total += p
        if r < total:
            return option
    return next(o for o, p in zip(reversed(options), reversed(probs), strict=True) if p > 0)


# ---------------------------------------------------------------------------------------------------
# Kernels.


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return yy, xx


def bivariate_kernel(
    size: int,
    sigma_x: float,
    sigma_y: float,
    theta: float = 0.0,
    *,
    kind: str = "gaussian",
    beta: float = 1.0,
) -> torch.Tensor:
    """A ``size`` x ``size`` blur kernel (float32, sums to 1) of one of Real-ESRGAN's three families.

    With ``q`` the squared Mahalanobis distance from the centre for the covariance with standard
    deviations ``sigma_x``/``sigma_y`` along axes rotated by ``theta`` (radians), the kernel is
    ``exp(-q/2)`` ("gaussian"), ``exp(-q**beta/2)`` ("generalized") or ``1/(1 + q**beta)`` ("plateau").
    Equal sigmas give an isotropic kernel. Every kernel is point-symmetric about its centre.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and positive, got {size}")
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"sigmas must be positive, got {sigma_x}, {sigma_y}")
    yy, xx = _grid(size)
    cos, sin = math.cos(theta), math.sin(theta)
    u = cos * xx + sin * yy
    v = -sin * xx + cos * yy
    q = (u / sigma_x) ** 2 + (v / sigma_y) ** 2
    if kind == "gaussian":
        kernel = torch.exp(-0.5 * q)
    elif kind == "generalized":
        kernel = torch.exp(-0.5 * q**beta)
    elif kind == "plateau":
        kernel = 1.0 / (q**beta + 1.0)
    else:
        raise ValueError(f"unknown kernel kind {kind!r}; use gaussian, generalized or plateau")
    return (kernel / kernel.sum()).float()


def sinc_kernel(cutoff: float, size: int) -> torch.Tensor:
    """An ideal circular low-pass (2-D sinc) kernel with cutoff frequency ``cutoff`` (radians per pixel).

    ``k(r) = cutoff * J1(cutoff * r) / (2 pi r)``, the inverse Fourier transform of a disc of radius
    ``cutoff``, cut to ``size`` x ``size`` and normalised to sum 1 (float32). It mimics the ringing and
    overshoot artefacts of sharpened or band-limited images.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and positive, got {size}")
    if not 0 < cutoff <= math.pi:
        raise ValueError(f"cutoff must be in (0, pi], got {cutoff}")
    yy, xx = _grid(size)
    r = torch.sqrt(xx**2 + yy**2)
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    kernel = cutoff * torch.special.bessel_j1(cutoff * safe_r) / (2 * math.pi * safe_r)
    kernel = torch.where(r > 0, kernel, torch.full_like(r, cutoff**2 / (4 * math.pi)))
    return (kernel / kernel.sum()).float()


def _random_beta(generator: torch.Generator, beta_range: tuple[float, float]) -> float:
    """Real-ESRGAN's shape draw: half the time below 1 (or at the low end), half the time above 1."""
    lo, hi = beta_range
    if _rand(generator) < 0.5:
        return _uniform(generator, lo, min(1.0, hi))
    return _uniform(generator, max(1.0, lo), hi)


def random_kernel(config: DegradationConfig, generator: torch.Generator, *, stage: int = 1) -> torch.Tensor:
    """A random blur kernel for round ``stage`` (1 or 2) of :func:`realesrgan_degrade`.

    The size is drawn from the stage's ``kernel_sizes``; with probability ``sinc_prob`` it is a sinc
    kernel (cutoff in [pi/3, pi], or [pi/5, pi] for sizes of 13 and up), otherwise a kernel of a type
    drawn with ``kernel_probs``: sigmas in ``blur_sigma``, rotation in [-pi, pi] for anisotropic types,
    shape ``beta`` from ``betag_range`` (generalized) or ``betap_range`` (plateau). Float32, sums to 1.
    """
    params = _stage(config, stage)
    size = _choice(generator, params.kernel_sizes)
    if _rand(generator) < params.sinc_prob:
        low = math.pi / 3 if size < 13 else math.pi / 5
        return sinc_kernel(_uniform(generator, low, math.pi), size)
    kind = _choice(generator, params.kernel_types, params.kernel_probs)
    family, _, isotropy = kind.rpartition("_")
    sigma_x = _uniform(generator, *params.blur_sigma)
    if isotropy == "iso":
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y = _uniform(generator, *params.blur_sigma)
        theta = _uniform(generator, -math.pi, math.pi)
    if family == "generalized":
        return bivariate_kernel(
            size,
            sigma_x,
            sigma_y,
            theta,
            kind="generalized",
            beta=_random_beta(generator, params.betag_range),
        )
    if family == "plateau":
        return bivariate_kernel(
            size, sigma_x, sigma_y, theta, kind="plateau", beta=_random_beta(generator, params.betap_range)
        )
    return bivariate_kernel(size, sigma_x, sigma_y, theta)


def filter_image(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter a (C, H, W) image with a 2-D kernel, same size out, reflected borders.

    Replicated borders stand in where the image is too small to reflect (pad >= side). The kernels
    here are point-symmetric, so correlation (what conv2d does) equals convolution.
    """
    channels, height, width = image.shape
    pad = kernel.shape[-1] // 2
    mode = "reflect" if pad < min(height, width) else "replicate"
    padded = F.pad(image[None], (pad, pad, pad, pad), mode=mode)
    weight = kernel.to(image)[None, None].expand(channels, 1, -1, -1)
    return F.conv2d(padded, weight, groups=channels)[0]


# ---------------------------------------------------------------------------------------------------
# Resizing.


def _resize(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(image.shape[-2:]) == size:
        return image
    options = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(image[None], size=size, mode=mode, **options)[0]


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's and Pillow's bicubic)."""
    ax = x.abs()
    near = (1.5 * ax**3 - 2.5 * ax**2 + 1) * (ax <= 1)
    far = (-0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return near + far


def _bicubic_matrix(in_len: int, out_len: int) -> torch.Tensor:
    """The (out_len, in_len) float64 matrix of MATLAB's ``imresize`` bicubic along one axis.

    Downscaling widens the kernel by the factor (antialiasing); samples past the edges are mirrored
    (MATLAB's symmetric padding) and their weights folded back onto the pixels they mirror.
    """
    scale = out_len / in_len
    width = 4.0 / scale if scale < 1 else 4.0
    x = torch.arange(1, out_len + 1, dtype=torch.float64)
    centre = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(centre - width / 2)
    taps = math.ceil(width) + 2
    index = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]
    distance = centre[:, None] - index
    weights = scale * _cubic(distance * scale) if scale < 1 else _cubic(distance)
    weights = weights / weights.sum(dim=1, keepdim=True)
    mirror = torch.cat([torch.arange(in_len), torch.arange(in_len - 1, -1, -1)])
    index = mirror[(index.long() - 1) % (2 * in_len)]
    return torch.zeros(out_len, in_len, dtype=torch.float64).scatter_add_(1, index, weights)


def _bicubic_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., H, W) images resized to ``size`` with MATLAB's ``imresize`` bicubic, float32, unclamped."""
    rows = _bicubic_matrix(images.shape[-2], size[0]).float().to(images.device)
    cols = _bicubic_matrix(images.shape[-1], size[1]).float().to(images.device)
    return torch.matmul(rows, torch.matmul(images.float(), cols.T))


def _as_batch(images: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    if images.ndim == 3:
        return images[None], True
    if images.ndim == 4:
        return images, False
    raise ValueError(f"{name} must be shaped (N, C, H, W) or (C, H, W), got {tuple(images.shape)}")


def _lq_size(hq: torch.Tensor, scale: int) -> tuple[int, int]:
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive whole number, got {scale}")
    height, width = hq.shape[-2:]
    if height % scale or width % scale:
        raise ValueError(f"HQ size {width}x{height} is not divisible by the scale {scale}")
    return height // scale, width // scale


def _quantise(images: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8-bit levels, as the LQ of a saved 8-bit image would be."""
    return torch.round(images.clamp(0, 1) * 255) / 255


def bicubic_degrade(hq: torch.Tensor, scale: int, *, quantise: bool = True) -> torch.Tensor:
    """Downsample by the whole factor ``scale`` with MATLAB-style antialiased bicubic (``imresize``).

    This is the "bicubic degradation" of the SR benchmarks. Input float (N, 3, H, W) or (3, H, W) in
    [0, 1] with H and W divisible by ``scale``; output float32 of H/scale x W/scale, clamped to [0, 1]
    and, unless ``quantise`` is False, rounded to 8-bit levels.
    """
    batch, single = _as_batch(hq, "hq")
    out = _bicubic_resize(batch, _lq_size(batch, scale))
    out = _quantise(out) if quantise else out.clamp(0, 1)
    return out[0] if single else out


# ---------------------------------------------------------------------------------------------------
# Noise and JPEG.


# BT.601 full-range colour transforms (JFIF's): the luma row also makes gray noise.
_RGB_TO_YCBCR = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=torch.float64
)
_YCBCR_TO_RGB = torch.tensor(
    [[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]], dtype=torch.float64
)


def _gray(image: torch.Tensor) -> torch.Tensor:
    """(1, H, W) luma of a (3, H, W) image with the BT.601 weights."""
    weights = _RGB_TO_YCBCR[0].to(image)
    return (image * weights[:, None, None]).sum(dim=0, keepdim=True)


def add_gaussian_noise(
    image: torch.Tensor, sigma: float, generator: torch.Generator, *, gray: bool = False
) -> torch.Tensor:
    """Add zero-mean Gaussian noise of standard deviation ``sigma`` (0..255 scale) to a (C, H, W) image.

    ``gray`` noise is the same in every channel (luminance noise); otherwise channels are independent.
    The result is clamped to [0, 1].
    """
    channels = 1 if gray else image.shape[0]
    noise = torch.randn((channels, *image.shape[1:]), generator=generator, dtype=torch.float32)
    return (image + noise.to(image) * (sigma / 255)).clamp(0, 1)


def add_poisson_noise(
    image: torch.Tensor, scale: float, generator: torch.Generator, *, gray: bool = False
) -> torch.Tensor:
    """Add signal-dependent Poisson (shot) noise to a (C, H, W) image, Real-ESRGAN style.

    The photon count per level is the number of distinct 8-bit values in the image rounded up to a
    power of two; the noise (Poisson sample minus signal) is multiplied by ``scale``. ``gray`` draws
    it once from the luma and adds it to every channel. The result is clamped to [0, 1].
    """
    signal = _gray(image) if gray else image
    signal = torch.round(signal.clamp(0, 1) * 255) / 255
    levels = torch.unique(torch.round(signal * 255)).numel()
    counts = 2 ** math.ceil(math.log2(max(levels, 1)))
    rate = (signal * counts).detach().to("cpu", torch.float32)
    sample = torch.poisson(rate, generator=generator).to(image) / counts
    noise = (sample - signal) * scale
    return (image + noise).clamp(0, 1)


def jpeg_compress(image: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG-encode and decode a (3, H, W) image in [0, 1] with Pillow at ``quality`` (1..100).

    Not differentiable (a Pillow round trip through 8-bit samples, 4:2:0 chroma), which is all data
    generation needs. Returns float32 in [0, 1] on the input's device.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    pixels = torch.round(image.detach().clamp(0, 1) * 255).to("cpu", torch.uint8)
    array = pixels.permute(1, 2, 0).contiguous().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        result = np.asarray(decoded.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(result).permute(2, 0, 1).contiguous().to(image.device)


# The standard JPEG quantisation tables (ITU T.81, Annex K), luminance transposed as Real-ESRGAN's
# code lays it out; the chrominance table is symmetric.
_LUMA_TABLE = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float64,
).T
_CHROMA_TABLE = torch.full((8, 8), 99.0, dtype=torch.float64)
_CHROMA_TABLE[:4, :4] = torch.tensor(
    [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]], dtype=torch.float64
)


def _dct_matrix() -> torch.Tensor:
    """The orthonormal 8-point DCT-II: coefficients = D @ block @ D.T."""
    n = torch.arange(8, dtype=torch.float64)
    matrix = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) / 2
    matrix[0] /= math.sqrt(2)
    return matrix


_DCT = _dct_matrix()


def _code_plane(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Quantise an (H, W) plane (0..255, H and W divisible by 8) in 8x8 DCT blocks and decode it."""
    height, width = plane.shape
    blocks = plane.reshape(height // 8, 8, width // 8, 8).transpose(1, 2) - 128
    dct = _DCT.to(plane)
    coefficients = dct @ blocks @ dct.T
    coefficients = torch.round(coefficients / table) * table
    blocks = dct.T @ coefficients @ dct + 128
    return blocks.transpose(1, 2).reshape(height, width)


def torch_jpeg(image: torch.Tensor, quality: float) -> torch.Tensor:
    """JPEG as Real-ESRGAN's training code computes it in torch, on a (3, H, W) image in [0, 1].

    A JPEG round trip in floating point: YCbCr, chroma averaged over 2x2, 8x8 DCT blocks (the image
    zero-padded to a multiple of 16) quantised by the standard tables scaled for ``quality`` (a real
    number in (0, 100], scaled as libjpeg does but not rounded to whole steps; steps below 1, from
    quality 96 up, are raised to 1 as libjpeg's), decoded with the chroma repeated over 2x2. Unlike
    a file's JPEG (:func:`jpeg_compress`) nothing is rounded to 8-bit levels and the quantisation
    steps are fractional. Returns float32 in [0, 1].
    """
    if not 0 < quality <= 100:
        raise ValueError(f"JPEG quality must be in (0, 100], got {quality}")
    height, width = image.shape[-2:]
    scale = (5000 / quality if quality < 50 else 200 - 2 * quality) / 100
    pixels = F.pad(image.detach().to(torch.float64).clamp(0, 1) * 255, (0, -width % 16, 0, -height % 16))
    ycbcr = torch.einsum("ij,jhw->ihw", _RGB_TO_YCBCR.to(pixels.device), pixels)
    ycbcr[1:] += 128
    luma_table, chroma_table = (
        (t * scale).clamp(min=1).to(pixels.device) for t in (_LUMA_TABLE, _CHROMA_TABLE)
    )
    luma = _code_plane(ycbcr[0], luma_table)
    chroma = F.avg_pool2d(ycbcr[1:][None], 2)[0]
    chroma = torch.stack([_code_plane(c, chroma_table) for c in chroma])
    chroma = chroma.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2) - 128
    decoded = torch.einsum("ij,jhw->ihw", _YCBCR_TO_RGB.to(pixels.device), torch.cat([luma[None], chroma]))
    return (decoded.clamp(0, 255) / 255)[:, :height, :width].float()


# ---------------------------------------------------------------------------------------------------
# The Real-ESRGAN pipeline.


def _random_factor(generator: torch.Generator, params: _Stage) -> float:
    direction = _choice(generator, ("up", "down", "keep"), params.resize_probs)
    lo, hi = params.resize_range
    if direction == "up":
        return _uniform(generator, 1.0, hi)
    if direction == "down":
        return _uniform(generator, lo, 1.0)
    return 1.0


def _scaled_size(height: float, width: float, factor: float) -> tuple[int, int]:
    return max(1, int(height * factor)), max(1, int(width * factor))


def _resize_by_factor(image: torch.Tensor, factor: float, mode: str) -> torch.Tensor:
    """Resize as ``interpolate(scale_factor=factor)``: sampled at ``factor``, not at the size's ratio.

    Area resizing pools over the whole image whatever the factor (so the aligned resize gives the
    same), and a size under 2 pixels has no stretch to show: both take the aligned resize.
    """
    size = _scaled_size(*image.shape[-2:], factor)
    if factor == 1.0 or mode == "area" or min(size) < 2:
        return _resize(image, size, mode)
    return F.interpolate(image[None], scale_factor=factor, mode=mode, align_corners=False)[0]


def _random_jpeg(
    generator: torch.Generator, config: DegradationConfig, params: _Stage
) -> Callable[[torch.Tensor], torch.Tensor]:
    """JPEG at a quality drawn now, from the stage's range: whole for Pillow, real as Real-ESRGAN's."""
    if config.jpeg == "torch":
        return partial(torch_jpeg, quality=_uniform(generator, *params.jpeg_range))
    return partial(jpeg_compress, quality=_randint(generator, *params.jpeg_range))


def _random_noise(image: torch.Tensor, generator: torch.Generator, params: _Stage) -> torch.Tensor:
    if _rand(generator) < params.gaussian_noise_prob:
        sigma = _uniform(generator, *params.noise_range)
        gray = _rand(generator) < params.gray_noise_prob
        return add_gaussian_noise(image, sigma, generator, gray=gray)
    scale = _uniform(generator, *params.poisson_scale_range)
    gray = _rand(generator) < params.gray_noise_prob
    return add_poisson_noise(image, scale, generator, gray=gray)


def _degrade_one(
    hq: torch.Tensor,
    lq_size: tuple[int, int],
    scale: int,
    config: DegradationConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    first, second = _stage(config, 1), _stage(config, 2)
    height, width = hq.shape[-2:]

    out = filter_image(hq, random_kernel(config, generator, stage=1))
    factor, mode = _random_factor(generator, first), _choice(generator, config.resize_modes)
    if config.resize_by_factor:
        out = _resize_by_factor(out, factor, mode)
    else:
        out = _resize(out, _scaled_size(height, width, factor), mode)
    out = _random_noise(out, generator, first)
    out = _random_jpeg(generator, config, first)(out)

    # No draw when the second round always happens, so the Real-ESRGAN default keeps its sequence.
    if config.second_order_prob >= 1.0 or _rand(generator) < config.second_order_prob:
        if _rand(generator) < config.second_blur_prob:
            out = filter_image(out, random_kernel(config, generator, stage=2))
        size = _scaled_size(height / scale, width / scale, _random_factor(generator, second))
        out = _resize(out, size, _choice(generator, config.resize_modes))
        out = _random_noise(out, generator, second)

    sinc = None
    if _rand(generator) < config.final_sinc_prob:
        cutoff = _uniform(generator, math.pi / 3, math.pi)
        sinc = sinc_kernel(cutoff, _choice(generator, config.final_kernel_sizes))
    compress = _random_jpeg(generator, config, second)
    mode = _choice(generator, config.resize_modes)
    if _rand(generator) < 0.5:
        out = _resize(out, lq_size, mode)
        if sinc is not None:
            out = filter_image(out, sinc)
        out = compress(out)
    else:
        out = compress(out)
        out = _resize(out, lq_size, mode)
        if sinc is not None:
            out = filter_image(out, sinc)
    return _quantise(out)


def realesrgan_degrade(
    hq: torch.Tensor, scale: int, config: DegradationConfig | None, generator: torch.Generator
) -> torch.Tensor:
    """Make the LQ input of ``hq`` with Real-ESRGAN's second-order degradation.

    ``hq``: float (N, 3, H, W) or (3, H, W) in [0, 1], H and W divisible by ``scale``. Returns float32
    (N, 3, H/scale, W/scale), clamped to [0, 1] and rounded to 8-bit levels. ``config`` None means the
    Real-ESRGAN defaults. Each image draws its own degradation from ``generator`` (a CPU generator).
    """
    config = config or DegradationConfig()
    batch, single = _as_batch(hq, "hq")
    if batch.shape[1] != 3:
        raise ValueError(f"hq must have 3 channels, got {batch.shape[1]}")
    lq_size = _lq_size(batch, scale)
    with torch.no_grad():
        out = torch.stack([_degrade_one(image.float(), lq_size, scale, config, generator) for image in batch])
    return out[0] if single else out


# ---------------------------------------------------------------------------------------------------
# Crops and flips.


def check_shrink_range(shrink: Sequence[float]) -> tuple[float, float]:
    """``shrink`` as (lo, hi) with 0 < lo <= hi <= 1, or a ValueError saying what is wrong."""
    if len(shrink) != 2 or not 0 < shrink[0] <= shrink[1] <= 1:
        raise ValueError(f"shrink must be [lo, hi] with 0 < lo <= hi <= 1, got {list(shrink)}")
    return shrink[0], shrink[1]


def random_shrink(
    image: torch.Tensor, shrink: tuple[float, float], min_side: int, generator: torch.Generator
) -> torch.Tensor:
    """A (C, H, W) image shrunk by a random factor drawn from ``shrink`` (MATLAB-style bicubic).

    Real-ESRGAN trains on DF2K together with copies shrunk by 0.75, 0.5 and 1/3: the same photos at
    smaller scales, sharper and with more content per crop. This draws the factor per sample instead.
    The factor is raised where needed so the short side stays at least ``min_side`` (the crop still
    fits). A factor of 1 returns the image itself; no draw is made when ``shrink`` is (1, 1), so runs
    without shrinking keep their random streams.
    """
    low, high = check_shrink_range(shrink)
    if low == high == 1:
        return image
    height, width = image.shape[-2:]
    factor = max(_uniform(generator, low, high), min_side / min(height, width))
    size = (max(min_side, round(height * factor)), max(min_side, round(width * factor)))
    if size == (height, width):
        return image
    return _bicubic_resize(image, size).clamp(0, 1)


def random_crop_flip(
    image: torch.Tensor, size: int | tuple[int, int], generator: torch.Generator, rotate: bool = False
) -> torch.Tensor:
    """A random ``size`` crop (int or (height, width)) of a (C, H, W) image, flipped left-right half the time.

    ``rotate`` also turns it by a random multiple of 90 degrees (with the flip: all eight symmetries
    of the square); for odd turns of a non-square size the crop is taken transposed, so the output is
    always ``size``. A (N, C, H, W) batch gets an independent crop per image.
    """
    if image.ndim == 4:
        return torch.stack([random_crop_flip(one, size, generator, rotate) for one in image])
    if image.ndim != 3:
        raise ValueError(f"image must be shaped (C, H, W) or (N, C, H, W), got {tuple(image.shape)}")
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    if crop_h < 1 or crop_w < 1:
        raise ValueError(f"crop size must be positive, got {size}")
    turns = _randint(generator, 0, 3) if rotate else 0
    if turns % 2:
        crop_h, crop_w = crop_w, crop_h
    height, width = image.shape[-2:]
    if crop_h > height or crop_w > width:
        raise ValueError(f"crop {crop_w}x{crop_h} does not fit in the image ({width}x{height})")
    top = _randint(generator, 0, height - crop_h)
    left = _randint(generator, 0, width - crop_w)
    out = image[:, top : top + crop_h, left : left + crop_w]
    if _rand(generator) < 0.5:
        out = out.flip(-1)
    if turns:
        out = torch.rot90(out, turns, dims=(-2, -1))
    return out.contiguous()
