"""`resshift eval` and `resshift train` through the command line."""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from trainconfigs import PIXEL_DIFFUSION, TINY_UNET, config_file

from resshift_cli.cli import main
from resshift_cli.training.config import dump_toml


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
    config = config_file(tmp_path)
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
    result = _invoke("train", config_file(tmp_path), override)
    assert result.exit_code == 2
    assert message in result.output


def test_train_init_from_a_missing_file(tmp_path: Path) -> None:
    result = _invoke("train", config_file(tmp_path), "--init", tmp_path / "missing.safetensors", "--quiet")
    assert result.exit_code in (2, 3)
    assert "missing.safetensors" in result.output


# ---------------------------------------------------------------------------------------------------
# `resshift train` keeps its promises: signals, bad images, bad paths, progress off a terminal.


def _train_process(config: Path, *overrides: str) -> subprocess.Popen[str]:
    """``resshift train`` in its own process group, as a shell starts a job."""
    command = [sys.executable, "-m", "resshift_cli", "train", str(config), *overrides]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _wait_for_steps(log: Path, process: subprocess.Popen[str], steps: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no {steps} logged steps: {process.communicate()}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "group"), [(signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGHUP, True)]
)
def test_train_signal_saves_a_checkpoint_and_exits_128_plus_n(
    tmp_path: Path, signum: int, group: bool
) -> None:
    """Ctrl-C and a closed terminal signal the whole job (the data worker too), SIGTERM the main
    process: each saves a checkpoint at the step in progress, says so in one line, exits 128+N,
    and --resume continues from that step."""
    config = config_file(tmp_path)
    run = ["train.steps=100000", "optim.schedule=constant", "data.workers=1", "train.checkpoint_every=100000"]
    process = _train_process(config, *run)
    out = tmp_path / "out"
    _wait_for_steps(out / "log.jsonl", process, 2)
    if group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    (checkpoint,) = (out / "checkpoints").iterdir()
    step = int(checkpoint.name.removeprefix("step-"))
    name = signal.Signals(signum).name
    assert last == f"interrupted by {name} at step {step}: saved {checkpoint}; continue with --resume"
    logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert logged[-1] == step  # every step up to the saved one was logged, none after it

    resumed = _invoke("train", config, *run[:3], f"train.steps={step + 1}", "--resume", "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == step + 1


def _broken_images(folder: Path) -> dict[str, Path]:
    """Beside the good images: a truncated PNG (its header is fine), a file of garbage with an
    image suffix, and an image smaller than the crop."""
    good = Image.open(folder / "img0.png")
    truncated = folder / "truncated.png"
    good.save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    garbage = folder / "garbage.jpg"
    garbage.write_bytes(b"not an image at all" * 20)
    small = folder / "small.png"
    good.resize((8, 8)).save(small)
    return {"truncated": truncated, "garbage": garbage, "small": small}


def test_train_names_and_skips_unreadable_images_even_with_workers(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    broken = _broken_images(tmp_path / "hq")
    val = _photos(tmp_path / "val")
    (val / "img1.png").write_bytes((val / "img1.png").read_bytes()[:300])
    run = ["train.steps=4", "train.batch_size=8", "data.workers=2", f"data.val={val}", "data.val_crop=32"]
    result = _invoke("train", config, *run)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    (val_line,) = [line for line in lines if "validation image" in line]
    assert val_line.startswith(f"validation image left out: {val / 'img1.png'} (") and "truncated" in val_line
    assert [line for line in lines if str(broken["garbage"]) in line] == [
        f"training image left out: {broken['garbage']} (not a readable image: UnidentifiedImageError)"
    ]
    assert [line for line in lines if str(broken["small"]) in line] == [
        f"training image left out: {broken['small']} (8x8, smaller than the 32-pixel crop)"
    ]
    (truncated,) = [line for line in lines if str(broken["truncated"]) in line]  # once, not per worker
    assert truncated.startswith(f"training image left out: cannot read {broken['truncated']}: ")
    assert "truncated" in truncated.split(": ", 2)[-1]


def test_train_with_every_image_undecodable_stops_with_one_line(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    for path in (tmp_path / "hq").iterdir():
        path.write_bytes(path.read_bytes()[:300])
    result = _invoke("train", config, "train.steps=2", "data.workers=1", "--quiet")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1] == "Error: none of the 2 training images can be decoded"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('output_dir=""', 'output_dir: expected a non-empty string, got ""'),
        ('data.val=""', 'data.val: expected a non-empty string, got ""'),
        ("output_dir={file}", "output_dir {file}: {file} is a file, not a folder"),
        ("output_dir={file}/run", "output_dir {file}/run: {file} is a file, not a folder"),
        ("data.train={file}", "{file}: not a folder of images"),
        ("data.val={tmp}/nowhere", "{tmp}/nowhere: not a folder of images"),
        ("train.device=gpu", "device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ],
)
def test_train_path_options_are_checked_first_with_one_line(
    tmp_path: Path, override: str, message: str
) -> None:
    """Each bad path is a usage error naming it, before any weights are looked for (the init model
    here is not on disk and offline), and nothing is created in the current folder."""
    file = tmp_path / "a-file"
    file.write_text("not a folder")
    config = config_file(tmp_path)
    fill = {"file": file, "tmp": tmp_path}
    registry = _unreachable_model_registry(tmp_path)
    before = sorted(Path.cwd().iterdir())
    result = _invoke(
        "train", config, override.format(**fill), f"model.registry={registry}", "--init", "nowhere", "-q"
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].endswith(message.format(**fill))
    assert "Traceback" not in result.output
    assert sorted(Path.cwd().iterdir()) == before
    assert file.read_text() == "not a folder"


def test_train_refuses_an_output_folder_it_cannot_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only file system (tests run as root, whom permissions do not stop): the probe write
    fails, and the run stops before anything else with one line."""
    from resshift_cli.training import trainer

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(trainer.tempfile, "TemporaryFile", read_only)
    result = _invoke("train", config_file(tmp_path), "-q")
    assert result.exit_code == 2
    message = f"output_dir {tmp_path / 'out'}: cannot write in {tmp_path} (Read-only file system)"
    assert result.stderr.strip().splitlines()[-1] == f"Error: {message}"
    assert not (tmp_path / "out").exists()


def _unreachable_model_registry(tmp_path: Path) -> Path:
    """A registry whose model ``nowhere`` lives only on a hub: not on disk, and offline in tests."""
    registry = tmp_path / "registry.toml"
    entry = {"task": "sr", "scale": 4, "steps": 4, "unet": TINY_UNET, "diffusion": PIXEL_DIFFUSION}
    entry |= {"repo_id": "nobody/nothing", "filename": "nowhere.safetensors"}
    registry.write_text(dump_toml({"models": {"nowhere": entry}}), encoding="utf-8")
    return registry


def test_train_hints_name_train_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = config_file(tmp_path)
    registry = _unreachable_model_registry(tmp_path)
    offline = _invoke("train", config, f"model.registry={registry}", "--init", "nowhere", "-q")
    assert offline.exit_code == 3
    (line,) = offline.stderr.strip().splitlines()
    assert "model 'nowhere' is not in the cache" in line and "give a weights file (model.init=PATH)" in line
    device = _invoke("train", config, "train.device=cuda:7", "-q")
    assert device.exit_code == 3
    assert device.stderr.strip().splitlines() == [
        "error: train.device = 'cuda:7' is not available here; use train.device=cpu (or auto)"
    ]
    for result in (offline, device):
        assert not re.search(r"--(?!init|resume|quiet)[a-z]", result.output)  # no option train lacks


def test_train_progress_reaches_a_pipe_and_the_log_is_timestamped(tmp_path: Path) -> None:
    result = _invoke("train", config_file(tmp_path), "train.steps=4", "train.log_every=2")
    assert result.exit_code == 0, result.output
    progress = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert len(progress) == 2
    for line, step in zip(progress, (2, 4), strict=True):
        assert re.fullmatch(
            rf"step {step}/4  loss \S+  lr \S+  \S+ s/step  elapsed \d+:\d\d:\d\d  left \d+:\d\d:\d\d", line
        ), line
    assert progress[-1].endswith("left 0:00:00")
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    stamps = [datetime.datetime.fromisoformat(r["time"].replace("Z", "+00:00")) for r in records]
    assert stamps == sorted(stamps)
    now = datetime.datetime.now(datetime.timezone.utc)
    assert all(now - datetime.timedelta(minutes=5) < t <= now for t in stamps)
