"""PSNR/SSIM against values worked out by hand, the Y conversion, border crops and folder evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from resshift_cli.imagefiles import save_image
from resshift_cli.metrics import (
    EvalResult,
    evaluate_folders,
    format_table,
    psnr,
    rgb_to_y,
    ssim,
    to_255,
)


def _random_image(seed: int, size: tuple[int, int] = (24, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _direct_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two 2-D float arrays straight from the definition, window by window, without shortcuts."""
    size, sigma = 11, 1.5
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    weights = np.empty((size, size))
    for u in range(size):
        for v in range(size):
            weights[u, v] = math.exp(-((u - 5) ** 2 + (v - 5) ** 2) / (2 * sigma**2))
    weights /= weights.sum()
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            mu_x = mu_y = 0.0
            for u in range(size):
                for v in range(size):
                    mu_x += weights[u, v] * x[i + u, j + v]
                    mu_y += weights[u, v] * y[i + u, j + v]
            var_x = var_y = cov = 0.0
            for u in range(size):
                for v in range(size):
                    dx, dy = x[i + u, j + v] - mu_x, y[i + u, j + v] - mu_y
                    var_x += weights[u, v] * dx * dx
                    var_y += weights[u, v] * dy * dy
                    cov += weights[u, v] * dx * dy
            luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
            structure = (2 * cov + c2) / (var_x + var_y + c2)
            values.append(luminance * structure)
    return sum(values) / len(values)


# --- PSNR ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 5, 20])
def test_psnr_of_a_constant_offset(d):
    a = _random_image(0).clip(0, 200)
    b = a + np.uint8(d)
    assert psnr(a, b) == pytest.approx(20 * math.log10(255 / d), abs=1e-9)
    # The same offset on every channel moves Y by d * (65.481 + 128.553 + 24.966) / 255 = d * 219 / 255.
    assert psnr(a, b, y_channel=True) == pytest.approx(20 * math.log10(255 / (d * 219 / 255)), abs=1e-9)


def test_identical_images_give_inf_and_ssim_one():
    a = _random_image(1)
    assert psnr(a, a) == math.inf
    assert psnr(a, a.copy(), y_channel=True, crop_border=2) == math.inf
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, a, y_channel=True) == pytest.approx(1.0, abs=1e-12)


def test_input_types_share_one_scale():
    a8 = _random_image(2)
    b8 = _random_image(3)
    reference = psnr(a8, b8)
    assert psnr(a8.astype(np.uint16) * 257, b8.astype(np.uint16) * 257) == pytest.approx(reference, abs=1e-9)
    assert psnr(a8 / 255.0, b8.astype(np.float32) / 255) == pytest.approx(reference, abs=1e-4)
    assert psnr(a8, b8 / 255.0) == pytest.approx(reference, abs=1e-9)
    np.testing.assert_array_equal(to_255(np.array([0, 65535], dtype=np.uint16)), [0.0, 255.0])
    with pytest.raises(TypeError):
        to_255(np.zeros((2, 2, 3), dtype=np.int32))


def test_mismatched_or_malformed_inputs_raise():
    with pytest.raises(ValueError):
        psnr(_random_image(0, (10, 12)), _random_image(0, (12, 10)))
    with pytest.raises(ValueError):
        psnr(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError):
        ssim(_random_image(0, (10, 30)), _random_image(1, (10, 30)))
    with pytest.raises(ValueError):
        psnr(_random_image(0, (8, 8)), _random_image(1, (8, 8)), crop_border=4)


# --- Y channel -------------------------------------------------------------------------------------


def test_y_of_pure_colours():
    colours = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]])
    expected = [16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966, 16 + 219 * 128 / 255]
    np.testing.assert_allclose(rgb_to_y(colours.astype(np.float64))[0], expected, rtol=0, atol=1e-9)


# --- SSIM ------------------------------------------------------------------------------------------


def test_ssim_matches_the_direct_formula_on_12x12():
    a = _random_image(4, (12, 12))
    b = np.clip(a.astype(int) + np.random.default_rng(5).integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    per_channel = [_direct_ssim(a[..., c].astype(float), b[..., c].astype(float)) for c in range(3)]
    assert ssim(a, b) == pytest.approx(np.mean(per_channel), abs=1e-10)
    y_a, y_b = rgb_to_y(a.astype(float)), rgb_to_y(b.astype(float))
    assert ssim(a, b, y_channel=True) == pytest.approx(_direct_ssim(y_a, y_b), abs=1e-10)
    assert 0 < ssim(a, b) < 1


def test_ssim_of_two_flat_images_is_the_luminance_term():
    a = np.full((16, 16, 3), 100, np.uint8)
    b = np.full((16, 16, 3), 140, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 100 * 140 + c1) / (100**2 + 140**2 + c1), abs=1e-12)


def test_border_crop_changes_what_is_compared():
    a = _random_image(6, (32, 32))
    b = a.copy()
    b[:4] = 255 - b[:4]
    b[:, -4:] = 0
    assert math.isfinite(psnr(a, b)) and ssim(a, b) < 0.99
    assert math.isfinite(psnr(a, b, crop_border=3))
    assert psnr(a, b, crop_border=4) == math.inf
    assert ssim(a, b, crop_border=4) == pytest.approx(1.0)
    # The crop is on each side: crop_border=4 compares the central 24x24.
    c = a.copy()
    c[4, 4] ^= 1
    assert math.isfinite(psnr(a, c, crop_border=4)) and psnr(a, c, crop_border=5) == math.inf


# --- folders ---------------------------------------------------------------------------------------


def _write(path, array):
    Image.fromarray(array).save(path)


@pytest.fixture
def folders(tmp_path):
    out, gt = tmp_path / "out", tmp_path / "gt"
    out.mkdir()
    gt.mkdir()
    a, b, c = _random_image(10, (20, 24)), _random_image(11, (20, 20)), _random_image(12, (16, 16))
    _write(gt / "a.png", a)
    _write(out / "a_x4.png", a)
    _write(gt / "b.bmp", b)
    _write(out / "b_x4.png", b // 2 + 5)
    _write(gt / "c.png", c)
    _write(out / "c_x4.png", _random_image(13, (16, 18)))
    _write(gt / "d.png", c)
    _write(out / "extra_x4.png", c)
    (out / "notes.txt").write_text("not an image")
    return out, gt, b


def test_evaluate_folders_matches_by_stem_with_a_suffix(folders):
    out, gt, b = folders
    result = evaluate_folders(out, gt, suffix="_x4", y_channel=False)
    assert [row.name for row in result.rows] == ["a", "b", "c"]
    a_row, b_row, c_row = result.rows
    assert a_row.psnr == math.inf and a_row.ssim == pytest.approx(1.0) and a_row.error is None
    assert b_row.output == out / "b_x4.png" and b_row.ground_truth == gt / "b.bmp"
    assert b_row.psnr == pytest.approx(psnr(b // 2 + 5, b))
    assert b_row.ssim == pytest.approx(ssim(b // 2 + 5, b))
    assert c_row.psnr is None and "size differs" in c_row.error
    assert [p.name for p in result.unmatched_outputs] == ["extra_x4.png"]
    assert [p.name for p in result.unmatched_ground_truth] == ["d.png"]
    assert len(result.scored) == 2 and result.mean_psnr == math.inf
    assert result.mean_ssim == pytest.approx((1.0 + b_row.ssim) / 2)


def test_evaluate_folders_without_suffix_and_with_y_and_crop(folders):
    out, gt, b = folders
    plain = evaluate_folders(out, gt)
    assert plain.rows == [] and len(plain.unmatched_outputs) == 4
    assert plain.mean_psnr is None and plain.mean_ssim is None
    result = evaluate_folders(out, gt, suffix="_x4", crop_border=2, y_channel=True)
    assert result.rows[1].psnr == pytest.approx(psnr(b // 2 + 5, b, crop_border=2, y_channel=True))


def test_evaluate_folders_reports_unreadable_and_ambiguous_files(tmp_path):
    out, gt = tmp_path / "out", tmp_path / "gt"
    out.mkdir()
    gt.mkdir()
    image = _random_image(20, (16, 16))
    _write(gt / "x.png", image)
    (out / "x.png").write_bytes(b"not really a png")
    _write(gt / "y.png", image)
    _write(gt / "y.bmp", image)
    _write(out / "y.png", image)
    result = evaluate_folders(out, gt)
    assert [row.name for row in result.rows] == ["x", "y"]
    assert all(row.error for row in result.rows)
    assert "ambiguous" in result.rows[1].error
    assert result.scored == [] and result.mean_psnr is None
    with pytest.raises(NotADirectoryError):
        evaluate_folders(tmp_path / "missing", gt)


def test_sixteen_bit_ground_truth_is_compared_on_the_same_scale(tmp_path):
    out, gt = tmp_path / "out", tmp_path / "gt"
    out.mkdir()
    gt.mkdir()
    image = _random_image(30, (16, 16))
    save_image(gt / "p.png", image / 255.0, bit_depth=16)
    _write(out / "p.png", image)
    result = evaluate_folders(out, gt)
    assert result.rows[0].psnr == math.inf


def test_table_and_json(folders):
    out, gt, _ = folders
    result = evaluate_folders(out, gt, suffix="_x4", crop_border=4)
    table = format_table(result)
    lines = table.splitlines()
    assert "PSNR (Y)" in lines[0] and "SSIM (Y)" in lines[0]
    assert any(line.startswith("a ") and "inf" in line for line in lines)
    assert any(line.startswith("c ") and "error: size differs" in line for line in lines)
    assert any(line.startswith("mean of 2") for line in lines)
    assert "crop border: 4 px" in table and "extra_x4.png" in table and "d.png" in table

    data = json.loads(result.to_json())
    assert data["mean_psnr"] == "inf" and data["count"] == 2 and data["crop_border"] == 4
    assert data["images"][0]["psnr"] == "inf"
    assert data["images"][1]["psnr"] == pytest.approx(result.rows[1].psnr)
    assert data["images"][2]["error"].startswith("size differs")
    assert data["unmatched_ground_truth"] == [str(gt / "d.png")]
    assert isinstance(EvalResult(rows=[]).to_json(), str)
