"""`resshift eval` and `resshift train` through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_train import _config_file

from resshift_cli.cli import main


def _invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _photos(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(38, 50), (40, 40)]):
        y, x = np.mgrid[0:h, 0:w]
        smooth = (np.sin(x / 5.0 + i) + np.cos(y / 7.0)) * 60 + 128
        pixels = np.clip(smooth[..., None] + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def test_make_lr_then_score_bicubic_upscales(tmp_path: Path) -> None:
    gt = _photos(tmp_path / "gt")
    made = _invoke("eval", gt, "--make-lr", tmp_path / "lr", "--scale", "4")
    assert made.exit_code == 0, made.output
    sizes = {p.name: Image.open(p).size for p in (tmp_path / "lr").iterdir()}
    assert sizes == {"img0.png": (12, 9), "img1.png": (10, 10)}  # ground truth cropped to multiples of 4

    up = tmp_path / "up"
    up.mkdir()
    for path in (tmp_path / "lr").iterdir():
        lr = Image.open(path)
        lr.resize((lr.width * 4, lr.height * 4), Image.Resampling.BICUBIC).save(up / f"{path.stem}_x4.png")
    scored = _invoke("eval", up, gt, "--suffix", "_x4", "--modcrop", "4", "--crop-border", "4", "--json")
    assert scored.exit_code == 0, scored.output
    data = json.loads(scored.output)
    rgb, y = data["rgb"], data["y"]
    assert rgb["count"] == y["count"] == 2
    assert 10 < rgb["mean_psnr"] < 40 and 10 < y["mean_psnr"] < 40
    assert rgb["mean_psnr"] != y["mean_psnr"]
    # Without --modcrop the sizes differ and the pairs are errors: exit 1.
    assert _invoke("eval", up, gt, "--suffix", "_x4").exit_code == 1


def test_eval_table_of_identical_folders(tmp_path: Path) -> None:
    gt = _photos(tmp_path / "gt")
    result = _invoke("eval", gt, gt)
    assert result.exit_code == 0
    assert "RGB:" in result.output and "Y channel:" in result.output and "inf" in result.output


def test_eval_usage_errors(tmp_path: Path) -> None:
    gt = _photos(tmp_path / "gt")
    assert _invoke("eval", gt).exit_code == 2
    assert _invoke("eval", gt, gt, "--make-lr", tmp_path / "lr").exit_code == 2


def test_train_command_runs_and_overrides(tmp_path: Path) -> None:
    config = _config_file(tmp_path)
    result = _invoke("train", config, "train.steps=2", "train.checkpoint_every=2", "--quiet")
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert max(entry["step"] for entry in log) == 2
    resumed = _invoke("train", config, "train.steps=2", "train.checkpoint_every=2", "--resume", "--quiet")
    assert resumed.exit_code == 0, resumed.output
    changed = _invoke("train", config, "train.steps=3", "train.checkpoint_every=2", "--resume", "--quiet")
    assert changed.exit_code == 2 and "train.steps" in changed.output


@pytest.mark.parametrize(
    ("override", "message"), [("optim.lr=fast", "optim.lr"), ("nonsense.key=1", "nonsense")]
)
def test_train_config_errors_are_usage_errors(tmp_path: Path, override: str, message: str) -> None:
    result = _invoke("train", _config_file(tmp_path), override)
    assert result.exit_code == 2
    assert message in result.output


def test_train_init_from_a_missing_file(tmp_path: Path) -> None:
    result = _invoke("train", _config_file(tmp_path), "--init", tmp_path / "missing.safetensors", "--quiet")
    assert result.exit_code in (2, 3)
    assert "missing.safetensors" in result.output
