"""The bundled ``lite`` model: inside the package, registered with its hash, and restoring held-out
photos and the imagenet test set offline (empty cache, no network) better than bicubic upsampling."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cliutils import run_entry_point

from resshift_cli.imagefiles import load_image, save_image
from resshift_cli.metrics import psnr, ssim
from resshift_cli.pipelines.latent import LatentSpace
from resshift_cli.registry import BUNDLED_SR_MODEL, load_registry, package_dir
from resshift_cli.training.config import load_train_config
from resshift_cli.training.degradations import realesrgan_degrade

pytestmark = pytest.mark.shared  # needs ../shared

PROJECT = Path(__file__).resolve().parents[1]
# lite trains on traindata/bsds500 and holds Kodak out; the first images in name order, not chosen
# by how well the model does on them.
KODAK = sorted((PROJECT.parent / "shared" / "traindata" / "kodak").glob("*.png"))
CROP = 128


@pytest.fixture(scope="module")
def lite():
    return load_registry(env={}).model(BUNDLED_SR_MODEL)


def test_lite_weights_ship_inside_the_package_with_their_hash(lite) -> None:
    path = lite.source.path
    assert path is not None and path.is_file()
    assert path.resolve().is_relative_to(package_dir().resolve())
    assert path.stat().st_size <= 20_000_000  # 20 MB
    assert lite.source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert lite.source.repo_id is None and lite.source.url is None
    assert lite.autoencoder is None and lite.task == "sr" and lite.scale == 4


def test_the_built_wheel_contains_the_weights(tmp_path: Path, lite) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path,
            PROJECT,
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("resshift_cli-*.whl")
    relative = lite.source.path.resolve().relative_to(package_dir().resolve().parent)
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(relative.as_posix()) == lite.source.path.read_bytes()


def _y_scores(outputs: list[np.ndarray], truths: list[np.ndarray]) -> tuple[float, float]:
    pairs = list(zip(outputs, truths, strict=True))
    return (
        float(np.mean([psnr(o, t, crop_border=4, y_channel=True) for o, t in pairs])),
        float(np.mean([ssim(o, t, crop_border=4, y_channel=True) for o, t in pairs])),
    )


def _bicubic(lite, lq: np.ndarray) -> np.ndarray:
    """The model's own y0 (torch bicubic, as upstream), rounded to 8 bits as a saved file is."""
    upsample = LatentSpace.from_params(None, lite.diffusion).upsample
    up = upsample(torch.from_numpy(lq).permute(2, 0, 1)[None])[0].permute(1, 2, 0).clamp(0, 1).numpy()
    return np.round(up * 255) / 255


def _restore_offline(tmp_path: Path, inputs: Path, *options: str) -> Path:
    """``resshift sr INPUTS --model lite`` with a fresh HF home and HF_HUB_OFFLINE=1: nothing can
    come from a cache or the network."""
    out = tmp_path / "out"
    done = run_entry_point(
        tmp_path, "sr", inputs, "-o", out, "--model", "lite", *options, timeout=600, OMP_NUM_THREADS="2"
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.slow
def test_lite_restores_held_out_photos_offline_and_beats_bicubic(tmp_path: Path, lite) -> None:
    """All 24 held-out Kodak photos (never trained on), centre crops degraded as the recipe's
    training degrades (its Real-ESRGAN settings, fixed seeds): mean PSNR-Y and SSIM-Y above bicubic's."""
    degradation = load_train_config(PROJECT / "configs" / "lite.toml").data.realesrgan
    inputs = tmp_path / "lq"
    inputs.mkdir()
    truths, bicubic = [], []
    for index, path in enumerate(KODAK):
        rgb = load_image(path).rgb
        top, left = (rgb.shape[0] - CROP) // 2, (rgb.shape[1] - CROP) // 2
        hq = torch.from_numpy(np.ascontiguousarray(rgb[top : top + CROP, left : left + CROP]))
        lq = realesrgan_degrade(hq.permute(2, 0, 1), 4, degradation, torch.Generator().manual_seed(index))
        lq_rgb = lq.permute(1, 2, 0).numpy()
        save_image(inputs / f"{path.stem}.png", lq_rgb)
        truths.append(hq.numpy())
        bicubic.append(_bicubic(lite, lq_rgb))
    out = _restore_offline(tmp_path, inputs)
    restored = [load_image(out / f"{p.stem}.png").rgb for p in KODAK]
    lite_psnr, lite_ssim = _y_scores(restored, truths)
    bicubic_psnr, bicubic_ssim = _y_scores(bicubic, truths)
    assert lite_psnr > bicubic_psnr, (lite_psnr, bicubic_psnr)
    assert lite_ssim > bicubic_ssim, (lite_ssim, bicubic_ssim)


@pytest.mark.slow
@pytest.mark.parametrize("tta", [False, True])
def test_lite_beats_bicubic_on_the_imagenet_test_set(tmp_path: Path, lite, tta: bool) -> None:
    """testdata's 32 imagenet-val LQ images (Real-ESRGAN-degraded, x4) against their ground truth:
    mean PSNR-Y and SSIM-Y above bicubic's, with and without --tta (docs/lite.md: 24.46 vs 24.11 dB,
    0.633 vs 0.625). The +0.6 dB of issue 25 is not reached."""
    lq_dir = PROJECT.parent / "shared" / "testdata" / "sr" / "imagenet-val" / "lq"
    gt_dir = lq_dir.parent / "gt"
    out = _restore_offline(tmp_path, lq_dir, *(["--tta"] if tta else []))
    names = sorted(p.name for p in lq_dir.iterdir())
    assert len(names) == 32
    truths = [load_image(gt_dir / name).rgb for name in names]
    restored = [load_image(out / name).rgb for name in names]
    bicubic = [_bicubic(lite, load_image(lq_dir / name).rgb) for name in names]
    lite_psnr, lite_ssim = _y_scores(restored, truths)
    bicubic_psnr, bicubic_ssim = _y_scores(bicubic, truths)
    assert lite_psnr > bicubic_psnr, (lite_psnr, bicubic_psnr)
    assert lite_ssim > bicubic_ssim, (lite_ssim, bicubic_ssim)


def _photo(path: Path, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]] / 32
    waves = np.stack([np.sin(xx + seed), np.cos(yy), np.sin(xx + yy)], -1) * 0.4 + 0.5
    pixels = np.clip(waves + rng.normal(0, 0.03, waves.shape), 0, 1)
    save_image(path, pixels.astype(np.float32))


@pytest.mark.slow
def test_the_gpu_recipe_runs_on_the_cpu_with_tiny_settings(tmp_path: Path) -> None:
    """scripts/train-lite-gpu.sh end to end on the CPU, a tiny network for 3 steps: the weights come
    back in parts under 16 MiB with a registry entry, and restore an image once joined."""
    data = tmp_path / "data"
    (data / "bsds500").mkdir(parents=True)
    (data / "kodak-val").mkdir()
    for i in range(2):
        _photo(data / "bsds500" / f"{i}.jpg", (160, 130), i)
    _photo(data / "kodak-val" / "kodim01.png", (256, 256), 5)
    out = tmp_path / "out"
    tiny = [
        "model.unet.model_channels=32", "model.unet.swin_embed_dim=32", "train.batch_size=2",
        "train.device=cpu", "train.precision=fp32", "data.workers=0", "data.val_images=1",
        "train.log_every=1",
    ]  # fmt: skip
    env = {**os.environ, "DATA": str(data), "RUN": str(tmp_path / "run"), "OUT": str(out), "STEPS": "3"}
    env |= {"PYTHON": sys.executable, "BUDGET": "600", "OMP_NUM_THREADS": "1"}
    script = PROJECT / "scripts" / "train-lite-gpu.sh"
    done = subprocess.run(["bash", script, *tiny], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "config.toml", "lite.safetensors.part-00", "log.jsonl", "registry.toml", "train.log"
    ]  # fmt: skip
    assert "finished 3 steps" in (out / "train.log").read_text()
    (out / "lite.safetensors").write_bytes((out / "lite.safetensors.part-00").read_bytes())
    registry = load_registry(out / "registry.toml", env={})
    from resshift_cli.pipelines.loading import load_restorer

    restorer = load_restorer("lite-gpu", registry=registry, device="cpu")
    restored = restorer.restore(torch.rand(1, 3, 8, 8))
    assert restored.shape == (1, 3, 32, 32) and torch.isfinite(restored).all()
