"""On-the-fly training degradations: kernels, noise, JPEG, bicubic and the Real-ESRGAN pipeline, crops.

Statistics are checked on synthetic images with known answers; "it really degrades" on a few real
photos from /work/shared/traindata (BSDS500 training photos, never the test or evaluation sets).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from resshift_cli.imagefiles import load_image
from resshift_cli.training.degradations import (
    KERNEL_TYPES,
    DegradationConfig,
    add_gaussian_noise,
    add_poisson_noise,
    bicubic_degrade,
    bivariate_kernel,
    jpeg_compress,
    random_crop_flip,
    random_kernel,
    random_shrink,
    realesrgan_degrade,
    sinc_kernel,
    torch_jpeg,
)

TRAINDATA = Path("/work/shared/traindata/bsds500")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _photos(count: int, size: int = 128) -> torch.Tensor:
    """Centre crops of the first ``count`` BSDS500 training photos, (count, 3, size, size)."""
    if not TRAINDATA.is_dir():
        pytest.skip(f"{TRAINDATA} is not available")
    crops = []
    for path in sorted(TRAINDATA.glob("*.jpg"))[:count]:
        rgb = torch.from_numpy(load_image(path).rgb).permute(2, 0, 1)
        top, left = (rgb.shape[1] - size) // 2, (rgb.shape[2] - size) // 2
        crops.append(rgb[:, top : top + size, left : left + size])
    return torch.stack(crops)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / F.mse_loss(a, b)))


def _upsample(lq: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(lq, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)


# --- configuration ---------------------------------------------------------------------------------


def test_config_defaults_are_realesrgan():
    config = DegradationConfig()
    assert config.kernel_sizes == (7, 9, 11, 13, 15, 17, 19, 21)
    assert config.kernel_types == KERNEL_TYPES
    assert config.kernel_probs == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert (config.blur_sigma, config.blur_sigma2) == ((0.2, 3.0), (0.2, 1.5))
    assert (config.betag_range, config.betap_range) == ((0.5, 4.0), (1.0, 2.0))
    assert (config.sinc_prob, config.sinc_prob2, config.final_sinc_prob) == (0.1, 0.1, 0.8)
    assert (config.resize_probs, config.resize_range) == ((0.2, 0.7, 0.1), (0.15, 1.5))
    assert (config.resize_probs2, config.resize_range2) == ((0.3, 0.4, 0.3), (0.3, 1.2))
    assert (config.noise_range, config.noise_range2) == ((1.0, 30.0), (1.0, 25.0))
    assert (config.poisson_scale_range, config.poisson_scale_range2) == ((0.05, 3.0), (0.05, 2.5))
    assert (config.gray_noise_prob, config.gray_noise_prob2) == (0.4, 0.4)
    assert (config.jpeg_range, config.jpeg_range2) == ((30, 95), (30, 95))
    assert (config.second_order_prob, config.second_blur_prob) == (1.0, 0.8)
    assert config.resize_modes == ("area", "bilinear", "bicubic")
    # Real-ESRGAN's code differs from the paper in two places; the defaults keep the paper's.
    assert (config.jpeg, config.resize_by_factor) == ("pillow", False)


def test_config_is_frozen_overridable_and_validated():
    config = DegradationConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sinc_prob = 0.5  # type: ignore[misc]
    custom = dataclasses.replace(config, jpeg_range=[60, 90], noise_range2=(2.0, 5.0))
    assert custom.jpeg_range == (60, 90) and custom.noise_range2 == (2.0, 5.0)
    for bad in (
        {"kernel_probs": (0.5, 0.5)},
        {"kernel_sizes": (7, 8)},
        {"resize_probs2": (0.5, 0.5, 0.5)},
        {"jpeg_range": (30, 101)},
        {"blur_sigma": (3.0, 0.2)},
        {"blur_sigma2": (0.0, 1.0)},
        {"resize_range": (1.2, 1.5)},
        {"final_sinc_prob": 1.5},
        {"second_order_prob": -0.1},
        {"resize_modes": ("nearest",)},
        {"kernel_types": ("iso", "box"), "kernel_probs": (0.5, 0.5)},
        {"jpeg": "libjpeg"},
        {"resize_by_factor": "yes"},
    ):
        with pytest.raises(ValueError):
            DegradationConfig(**bad)


# --- kernels ---------------------------------------------------------------------------------------


def test_isotropic_gaussian_matches_closed_form():
    sigma, size = 1.3, 7
    kernel = bivariate_kernel(size, sigma, sigma).double()
    offsets = np.arange(size) - size // 2
    one_d = np.exp(-(offsets**2) / (2 * sigma**2))
    expected = np.outer(one_d, one_d) / one_d.sum() ** 2
    np.testing.assert_allclose(kernel.numpy(), expected, rtol=1e-6, atol=1e-9)


def test_anisotropic_gaussian_follows_its_axes():
    # sigma_x along the rotated x axis: at theta = 90 degrees the long axis is vertical.
    flat = bivariate_kernel(11, 3.0, 0.5, 0.0)
    turned = bivariate_kernel(11, 3.0, 0.5, math.pi / 2)
    assert flat[5, 0] > flat[0, 5]
    torch.testing.assert_close(turned, flat.T, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("stage", [1, 2])
def test_random_kernels_sum_to_one_and_have_odd_sizes(stage):
    config = DegradationConfig()
    g = _gen(stage)
    sizes = set()
    for _ in range(300):
        kernel = random_kernel(config, g, stage=stage)
        assert kernel.dtype == torch.float32 and kernel.ndim == 2
        assert kernel.shape[0] == kernel.shape[1] and kernel.shape[0] % 2 == 1
        assert 7 <= kernel.shape[0] <= 21
        sizes.add(kernel.shape[0])
        assert float(kernel.double().sum()) == pytest.approx(1.0, abs=1e-5)
        # Every family is point-symmetric about the centre.
        torch.testing.assert_close(kernel, kernel.flip(0, 1), rtol=1e-5, atol=1e-7)
    assert sizes == set(config.kernel_sizes)


@pytest.mark.parametrize("kind", ["iso", "generalized_iso", "plateau_iso", "sinc"])
def test_isotropic_kernels_have_the_symmetries_of_the_square(kind):
    if kind == "sinc":
        config = DegradationConfig(sinc_prob=1.0)
    else:
        probs = tuple(1.0 if t == kind else 0.0 for t in KERNEL_TYPES)
        config = DegradationConfig(kernel_probs=probs)
    g = _gen(3)
    for _ in range(20):
        kernel = random_kernel(config, g)
        assert float(kernel.double().sum()) == pytest.approx(1.0, abs=1e-5)
        for symmetric in (kernel.flip(0), kernel.flip(1), kernel.T):
            torch.testing.assert_close(kernel, symmetric, rtol=1e-5, atol=1e-7)


def test_generalized_and_plateau_shapes():
    gauss = bivariate_kernel(21, 2.0, 2.0)
    assert torch.allclose(bivariate_kernel(21, 2.0, 2.0, kind="generalized", beta=1.0), gauss)
    # A larger beta flattens the top and sharpens the fall-off; a plateau kernel has heavy tails.
    flat_top = bivariate_kernel(21, 2.0, 2.0, kind="generalized", beta=4.0)
    assert flat_top[10, 11] / flat_top[10, 10] > gauss[10, 11] / gauss[10, 10]
    plateau = bivariate_kernel(21, 2.0, 2.0, kind="plateau", beta=1.0)
    assert plateau[10, 0] / plateau[10, 10] > gauss[10, 0] / gauss[10, 10]
    with pytest.raises(ValueError):
        bivariate_kernel(8, 1.0, 1.0)
    with pytest.raises(ValueError):
        bivariate_kernel(7, 1.0, 1.0, kind="box")


def test_sinc_kernel_is_a_symmetric_low_pass():
    kernel = sinc_kernel(math.pi / 3, 21)
    assert float(kernel.double().sum()) == pytest.approx(1.0, abs=1e-6)
    for symmetric in (kernel.flip(0), kernel.flip(1), kernel.T):
        torch.testing.assert_close(kernel, symmetric)
    assert (kernel < 0).any(), "an ideal low-pass rings: some taps are negative"
    response = torch.fft.fft2(kernel.double(), s=(64, 64)).abs()
    assert float(response[0, 0]) == pytest.approx(1.0)
    # Pass band below the cutoff (pi/3 = 10.7 of 64 bins), stop band well above it.
    assert float(response[0, 4]) > 0.9
    assert float(response[0, 20:44].max()) < 0.1
    assert float(response[20:44, 20:44].max()) < 0.1


# --- noise and JPEG --------------------------------------------------------------------------------


@pytest.mark.parametrize("gray", [False, True])
def test_gaussian_noise_has_the_requested_sigma(gray):
    flat = torch.full((3, 128, 128), 0.5)
    noisy = add_gaussian_noise(flat, 12.0, _gen(5), gray=gray)
    noise = (noisy - flat) * 255
    assert float(noise.std()) == pytest.approx(12.0, rel=0.03)
    assert abs(float(noise.mean())) < 0.3
    if gray:
        assert torch.equal(noise[0], noise[1]) and torch.equal(noise[1], noise[2])
    else:
        assert not torch.equal(noise[0], noise[1])


def test_poisson_noise_variance_grows_with_the_signal():
    image = torch.full((3, 128, 128), 0.2)
    image[:, :, 64:] = 0.6
    scale = 0.05
    noise = add_poisson_noise(image, scale, _gen(6)) - image
    # Two levels -> 2 counts per unit; the noise variance is scale**2 * signal / counts.
    for region, signal in ((noise[:, :, :64], 0.2), (noise[:, :, 64:], 0.6)):
        assert float(region.var()) == pytest.approx(scale**2 * signal / 2, rel=0.06)
        assert abs(float(region.mean())) < 2e-4
    gray = add_poisson_noise(image, scale, _gen(6), gray=True) - image
    assert torch.equal(gray[0], gray[2])


def test_jpeg_quality_is_monotonic_on_a_photo():
    photo = _photos(1)[0]
    scores = [_psnr(jpeg_compress(photo, q), photo) for q in (10, 30, 50, 70, 90, 95)]
    assert scores == sorted(scores), scores
    assert scores[-1] - scores[0] > 6
    out = jpeg_compress(photo, 50)
    assert out.shape == photo.shape and out.dtype == torch.float32
    assert torch.equal(out, torch.round(out * 255) / 255)


def _gray_image(levels: torch.Tensor) -> torch.Tensor:
    """A (3, H, W) grey image from an (H, W) tensor of 0..255 levels: luma = the level, chroma = 0."""
    return (levels / 255).expand(3, -1, -1).clone()


def test_torch_jpeg_quantises_with_fractional_steps_of_libjpegs_quality_scale():
    # A flat grey block has one DCT coefficient, DC = 8 (Y - 128), quantised by the luma table's
    # 16 times the quality scale: 5000 / 37.5 / 100 = 4/3 at quality 37.5, a step of 21.333 where
    # libjpeg's whole-number table has 21. Y - 128 = 3.9: 31.2 / 21.333 = 1.46 -> 1 -> Y = 128 + 2.667
    # (with the step 21: 130.625).
    out = torch_jpeg(_gray_image(torch.full((16, 16), 131.9)), 37.5)
    torch.testing.assert_close(out * 255, torch.full((3, 16, 16), 128 + 64 / 3 / 8), rtol=0, atol=1e-3)
    # Y - 128 = 9 at quality 25 (scale 2, step 32): 72 / 32 = 2.25 -> 2 -> Y = 136; nothing is rounded
    # to 8-bit levels, so at quality 95 (step 1.6) Y = 140.35 stays fractional: 8 x 12.35 / 1.6
    # = 61.75 -> 62 -> Y = 128 + 12.4.
    out = torch_jpeg(_gray_image(torch.full((16, 16), 137.0)), 25)
    torch.testing.assert_close(out * 255, torch.full((3, 16, 16), 136.0), rtol=0, atol=1e-3)
    out = torch_jpeg(_gray_image(torch.full((16, 16), 140.35)), 95)
    torch.testing.assert_close(out * 255, torch.full((3, 16, 16), 140.4), rtol=0, atol=1e-3)


def test_torch_jpeg_quantises_horizontal_frequencies_with_the_transposed_luma_table():
    # Y = 128 + A cos((2x + 1) pi / 16) along x has one coefficient, at (row 0, column 1), of
    # 4 sqrt(2) A. Real-ESRGAN's table is the standard one transposed, so its step there is 12, not 11:
    # 20.4 / 12 = 1.7 -> 2 -> amplitude 24 / (4 sqrt(2)); with 11 it would be 22 / (4 sqrt(2)).
    amplitude = 20.4 / (4 * math.sqrt(2))
    wave = torch.cos((2 * torch.arange(8.0) + 1) * math.pi / 16).repeat(2)
    out = torch_jpeg(_gray_image(128 + amplitude * wave.expand(16, 16)), 50) * 255
    expected = 128 + 24 / (4 * math.sqrt(2)) * wave.expand(16, 16)
    torch.testing.assert_close(out, expected.expand(3, -1, -1), rtol=0, atol=1e-3)


def test_torch_jpeg_shapes_ranges_and_quality():
    photo = _photos(1)[0, :, :60, :75]
    scores = [_psnr(torch_jpeg(photo, q), photo) for q in (10, 30, 50, 70, 90, 95)]
    assert scores == sorted(scores), scores
    out = torch_jpeg(photo, 37.5)
    assert out.shape == photo.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    for bad in (0, 100.5):
        with pytest.raises(ValueError):
            torch_jpeg(photo, bad)


# --- bicubic ---------------------------------------------------------------------------------------


def test_bicubic_degrade_shapes_and_values():
    hq = torch.rand(2, 3, 32, 48, generator=_gen(1))
    lq = bicubic_degrade(hq, 4)
    assert lq.shape == (2, 3, 8, 12) and lq.dtype == torch.float32
    assert float(lq.min()) >= 0 and float(lq.max()) <= 1
    assert torch.equal(lq, torch.round(lq * 255) / 255)
    assert bicubic_degrade(hq[0], 4).shape == (3, 8, 12)
    with pytest.raises(ValueError):
        bicubic_degrade(torch.rand(1, 3, 30, 32), 4)


def test_bicubic_matches_matlab_imresize_rules():
    # Constant stays constant; a linear ramp is sampled at the output pixel centres (interior).
    constant = torch.full((1, 3, 24, 24), 0.25)
    assert torch.allclose(bicubic_degrade(constant, 3, quantise=False), constant[..., :8, :8])
    ramp = torch.linspace(0, 1, 64).expand(1, 3, 16, 64)
    out = bicubic_degrade(ramp, 4, quantise=False)[0, 0, 0]
    centres = ((torch.arange(16) + 0.5) * 4 - 0.5) / 63
    torch.testing.assert_close(out[2:-2], centres[2:-2], rtol=0, atol=1e-6)
    # Away from the borders it equals PyTorch's antialiased bicubic (the same Keys a = -0.5 kernel).
    hq = torch.rand(1, 3, 64, 64, generator=_gen(2))
    ours = bicubic_degrade(hq, 4, quantise=False)
    torch_aa = F.interpolate(hq, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(ours[..., 3:-3, 3:-3], torch_aa[..., 3:-3, 3:-3], rtol=0, atol=1e-5)


# --- Real-ESRGAN pipeline --------------------------------------------------------------------------


def test_realesrgan_shapes_ranges_and_levels():
    hq = torch.rand(3, 3, 64, 96, generator=_gen(7))
    before = hq.clone()
    lq = realesrgan_degrade(hq, 4, DegradationConfig(), _gen(8))
    assert lq.shape == (3, 3, 16, 24) and lq.dtype == torch.float32
    assert float(lq.min()) >= 0 and float(lq.max()) <= 1
    assert torch.equal(lq, torch.round(lq * 255) / 255)
    assert torch.equal(hq, before), "the HQ input must not be modified"
    assert realesrgan_degrade(hq[0], 2, None, _gen(8)).shape == (3, 32, 48)
    with pytest.raises(ValueError):
        realesrgan_degrade(torch.rand(1, 3, 62, 64), 4, None, _gen(0))


def test_realesrgan_is_deterministic_under_a_seed():
    hq = torch.rand(4, 3, 48, 48, generator=_gen(9))
    first = realesrgan_degrade(hq, 4, None, _gen(123))
    again = realesrgan_degrade(hq, 4, None, _gen(123))
    other = realesrgan_degrade(hq, 4, None, _gen(124))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Images of a batch get different degradations.
    same = hq[:1].expand(2, -1, -1, -1)
    pair = realesrgan_degrade(same, 4, None, _gen(5))
    assert not torch.equal(pair[0], pair[1])


def test_realesrgan_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    realesrgan_degrade(torch.rand(1, 3, 32, 32, generator=_gen(1)), 4, None, _gen(2))
    assert torch.equal(torch.rand(3), expected)


def test_realesrgan_degrades_more_than_bicubic_on_photos():
    hq = _photos(4)
    bicubic = _psnr(_upsample(bicubic_degrade(hq, 4), 4), hq)
    real = _psnr(_upsample(realesrgan_degrade(hq, 4, None, _gen(11)), 4), hq)
    assert real < bicubic - 1.0, (real, bicubic)


_IDENTITY = {
    "kernel_sizes": (1,),
    "kernel_sizes2": (1,),
    "sinc_prob": 0.0,
    "sinc_prob2": 0.0,
    "final_sinc_prob": 0.0,
    "resize_probs": (0.0, 0.0, 1.0),
    "resize_probs2": (0.0, 0.0, 1.0),
    "resize_modes": ("area",),
    "gaussian_noise_prob": 1.0,
    "gaussian_noise_prob2": 1.0,
    "noise_range": (0.0, 0.0),
    "noise_range2": (0.0, 0.0),
    "jpeg_range": (100, 100),
    "jpeg_range2": (100, 100),
}
"""No blur (kernels as narrow as possible), no resize, no noise, top JPEG quality, no sinc."""


def test_realesrgan_identity_config_is_close_to_plain_resize():
    # What is left is close to a plain downscale.
    config = DegradationConfig(**_IDENTITY)
    hq = _photos(2, size=64)
    lq = realesrgan_degrade(hq, 4, config, _gen(0))
    assert _psnr(lq, F.avg_pool2d(hq, 4)) > 35


def test_resize_by_factor_shrinks_the_content_towards_the_top_left():
    # A horizontal ramp through a first-round bilinear resize by a factor in [0.9, 1), then the
    # plain (aligned) final resize: aligned, the LQ is the ramp sampled at its pixel centres; sampled
    # at the factor but cut to the rounded-down size, the content is shrunk towards x = 0, so the
    # values fall short of the ramp by more and more to the right.
    fields = {**_IDENTITY, "resize_probs": (0.0, 1.0, 0.0), "resize_range": (0.9, 1.0)}
    fields |= {"resize_modes": ("bilinear",), "jpeg": "torch"}
    ramp = (torch.arange(64.0) + 0.5).div(64).expand(16, 3, 64, 64)
    centres = (torch.arange(16.0) + 0.5).div(16)
    for by_factor in (False, True):
        config = DegradationConfig(resize_by_factor=by_factor, **fields)
        lq = realesrgan_degrade(ramp, 4, config, _gen(4))[:, :, 8].mean(dim=(0, 1))
        shortfall = (centres - lq)[1:-1] * 255
        if by_factor:
            assert float(shortfall[-1]) > float(shortfall[0]) + 2, shortfall
        else:
            assert float(shortfall.abs().max()) < 1, shortfall


def test_second_order_prob_decides_whether_the_second_round_happens():
    # Everything else as mild as possible (see the identity test below), and a second round that
    # drowns the image in noise: each LQ shows whether its second round ran.
    fields = {**_IDENTITY, "noise_range2": (120.0, 120.0), "gray_noise_prob2": 0.0}
    hq = _photos(12, size=64)
    plain = F.avg_pool2d(hq, 4)

    def second_rounds(probability: float) -> list[bool]:
        lq = realesrgan_degrade(hq, 4, DegradationConfig(second_order_prob=probability, **fields), _gen(3))
        return [_psnr(one, reference) < 20 for one, reference in zip(lq, plain, strict=True)]

    assert not any(second_rounds(0.0))
    assert all(second_rounds(1.0))
    assert 0 < sum(second_rounds(0.5)) < 12


# --- crops and flips -------------------------------------------------------------------------------


def _symmetries(window: torch.Tensor) -> list[torch.Tensor]:
    return [torch.rot90(w, k, dims=(-2, -1)) for w in (window, window.flip(-1)) for k in range(4)]


def test_random_crop_flip_takes_a_window_of_the_image():
    image = torch.arange(3 * 20 * 30, dtype=torch.float32).reshape(3, 20, 30)
    g = _gen(4)
    flipped = 0
    for _ in range(20):
        crop = random_crop_flip(image, 8, g)
        assert crop.shape == (3, 8, 8)
        corner = crop[0].min()  # values grow along rows and columns: the minimum is the top-left corner
        top, left = divmod(int(corner), 30)
        window = image[:, top : top + 8, left : left + 8]
        assert torch.equal(crop, window) or torch.equal(crop, window.flip(-1))
        flipped += torch.equal(crop, window.flip(-1))
    assert 0 < flipped < 20


def test_random_crop_flip_with_rotation_keeps_the_size():
    image = torch.arange(3 * 20 * 30, dtype=torch.float32).reshape(3, 20, 30)
    g = _gen(5)
    seen = set()
    for _ in range(40):
        crop = random_crop_flip(image, (6, 10), g, rotate=True)
        assert crop.shape == (3, 6, 10)
        top, left = divmod(int(crop[0].min()), 30)
        candidates = [image[:, top : top + h, left : left + w] for h, w in ((6, 10), (10, 6))]
        matches = [
            i
            for c in candidates
            for i, s in enumerate(_symmetries(c))
            if s.shape == crop.shape and torch.equal(s, crop)
        ]
        assert matches
        seen.update(matches)
    assert len(seen) > 4


def test_random_crop_flip_is_deterministic_and_checks_sizes():
    image = torch.rand(2, 3, 40, 40, generator=_gen(0))
    a = random_crop_flip(image, 16, _gen(9), rotate=True)
    b = random_crop_flip(image, 16, _gen(9), rotate=True)
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)
    with pytest.raises(ValueError):
        random_crop_flip(image[0], 41, _gen(0))


def test_random_shrink_is_pillows_bicubic_away_from_the_borders():
    image = 0.25 + 0.5 * torch.rand(3, 60, 90, generator=_gen(0))
    out = random_shrink(image, (0.5, 0.5), 16, _gen(1))
    assert out.shape == (3, 30, 45) and out.dtype == torch.float32
    # Pillow's float-mode bicubic (Keys a = -0.5, widened when shrinking) as an independent reference;
    # the borders differ by design (mirrored here, clamped in Pillow).
    want = np.stack(
        [np.asarray(Image.fromarray(c.numpy(), mode="F").resize((45, 30), Image.BICUBIC)) for c in image]
    )
    np.testing.assert_allclose(out.numpy()[:, 3:-3, 3:-3], want[:, 3:-3, 3:-3], atol=1e-5)


def test_random_shrink_draws_in_its_range_and_keeps_the_crop_inside():
    image = torch.rand(3, 100, 150, generator=_gen(0))
    heights = set()
    for seed in range(30):
        out = random_shrink(image, (0.5, 0.9), 64, _gen(seed))
        height, width = out.shape[-2:]
        assert 64 <= height <= 90 and abs(width / height - 1.5) < 0.03
        assert float(out.min()) >= 0 and float(out.max()) <= 1
        assert torch.equal(out, random_shrink(image, (0.5, 0.9), 64, _gen(seed)))
        heights.add(height)
    assert len(heights) > 10 and min(heights) == 64  # drawn factors below 0.64 are raised to fit 64
    # No shrinking: the image itself, and the generator is left as it was.
    g = _gen(3)
    assert random_shrink(image, (1.0, 1.0), 64, g) is image
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=_gen(3)))
    for bad in [(0.0, 0.5), (0.8, 0.5), (0.5, 1.2), (0.5,)]:
        with pytest.raises(ValueError, match="shrink must be"):
            random_shrink(image, bad, 64, _gen(0))


def test_crop_then_degrade_gives_an_lq_of_exactly_one_quarter():
    photo = _photos(1, size=200)[0]
    g = _gen(10)
    hq = random_crop_flip(photo, 96, g, rotate=True)[None]
    lq = realesrgan_degrade(hq, 4, None, g)
    assert hq.shape == (1, 3, 96, 96) and lq.shape == (1, 3, 24, 24)
