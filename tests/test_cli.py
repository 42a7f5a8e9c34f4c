"""The ``resshift`` command line, end to end, on the tiny random-weight reference models.

Most runs go through click's CliRunner in this process; a handful go through the installed
``resshift`` entry point in a subprocess, where the exit code is what a shell sees. The models come
from a user registry written by :mod:`tinymodels`; the Hugging Face cache is an empty temporary
directory and the hub is offline, so nothing is downloaded and the real models are "not cached".
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cliutils import (
    RECORD_KEYS,
    assert_rounds_to,
    invoke,
    noise,
    png16,
    png_header,
    read,
    records,
    restore,
    run_entry_point,
    sample,
    subprocess_env,
    write,
)
from PIL import Image
from reference import reference_path
from safetensors import safe_open
from safetensors.torch import load_file
from tinymodels import write_registry

from resshift_cli.imagefiles import LoadedImage, load_image
from resshift_cli.pipelines import loading, tasks
from resshift_cli.pipelines.latent import LatentSpace
from resshift_cli.pipelines.options import RunOptions

pytestmark = pytest.mark.shared  # needs ../shared

# Help and version ------------------------------------------------------------------------------

COMMANDS = [
    [],
    ["sr"],
    ["inpaint"],
    ["face"],
    ["weights"],
    ["weights", "list"],
    ["weights", "fetch"],
    ["weights", "verify"],
    ["weights", "path"],
    ["weights", "convert"],
]


def test_help_and_version_do_not_import_torch(tmp_path: Path) -> None:
    """``--help`` of every command and ``--version`` run without importing torch."""
    script = f"""
import contextlib, io, json, sys
from resshift_cli.cli import main
results = []
for argv in {[[*c, "--help"] for c in COMMANDS] + [["--version"]]!r}:
    sys.argv = ["resshift", *argv]
    out, code = io.StringIO(), "returned without exiting"
    with contextlib.redirect_stdout(out):
        try:
            main()
        except SystemExit as exc:
            code = exc.code
    results.append([argv, code, "torch" in sys.modules, out.getvalue()[:40]])
print(json.dumps(results))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=subprocess_env(tmp_path),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])
    assert len(results) == len(COMMANDS) + 1
    for argv, code, torch_loaded, head in results:
        assert code in (0, None), argv
        assert not torch_loaded, f"{argv} imported torch"
        assert head.startswith("Usage:" if argv != ["--version"] else "resshift"), (argv, head)


RESTORE_OPTIONS = [
    "--output",
    "--model",
    "--checkpoint",
    "--autoencoder",
    "--registry",
    "--recursive",
    "--seed",
    "--tile",
    "--tile-overlap",
    "--batch-size",
    "--device",
    "--precision",
    "--fp32",
    "--suffix",
    "--ext",
    "--overwrite",
    "--max-pixels",
    "--quiet",
    "--json",
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "resshift")
def test_help_of_every_command(command: list[str]) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Usage: {' '.join(['resshift', *command])} ")
    if command and command[0] in ("sr", "inpaint", "face"):
        for option in RESTORE_OPTIONS:
            assert option in result.stdout, option
        assert "Exit codes:" in result.stdout
    if command == ["inpaint"]:
        assert "--mask" in result.stdout
    if command == ["face"]:
        assert "--batch" in result.stdout


def test_short_help_flag_and_version() -> None:
    assert invoke("sr", "-h").stdout == invoke("sr", "--help").stdout
    for flag in ("--version", "-V"):
        result = invoke(flag)
        assert result.exit_code == 0
        assert result.stdout.strip() == f"resshift, version {version('resshift-cli')}"


# Super-resolution: the output is the model's sample ---------------------------------------------


@pytest.mark.parametrize("seed", [None, 7])
def test_sr_output_equals_in_process_sample(tmp_path: Path, registry: Path, seed: int | None) -> None:
    """The CLI writes the in-process sample for the same seed (default 12345), rounded to 8 bits.

    For an image that fits one tile the CLI draws its noise from a CPU generator seeded the same
    way, in the same order and shape, and clamps and maps to [0, 1] the same way; the only
    difference is the summation order of its optimised kernels (see :func:`assert_rounds_to`).
    """
    pixels = noise(24, 32)
    src = write(tmp_path / "in.png", pixels)
    args = [] if seed is None else ["--seed", seed]
    result = restore("sr", registry, src, "-o", tmp_path / "out.png", *args)
    assert result.exit_code == 0, result.stderr
    out = read(tmp_path / "out.png")
    assert out.shape == (96, 128, 3)
    assert_rounds_to(out, sample("sr-tiny", pixels, 12345 if seed is None else seed))


@pytest.mark.slow
def test_sr_tta_is_the_mean_of_the_eight_views_turned_back(tmp_path: Path, registry: Path) -> None:
    """--tta: each flip/rotation of the input is sampled (same seed) and turned back, then averaged."""
    pixels = noise(24, 32, seed=5)
    src = write(tmp_path / "in.png", pixels)
    result = restore("sr", registry, src, "-o", tmp_path / "out.png", "--tta")
    assert result.exit_code == 0, result.stderr
    views = []
    for mirrored in (False, True):
        for turns in range(4):
            view = np.rot90(pixels, turns)[:, ::-1] if mirrored else np.rot90(pixels, turns)
            out = sample("sr-tiny", np.ascontiguousarray(view))
            views.append(np.rot90(out[:, ::-1] if mirrored else out, -turns))
    expected = np.mean(views, axis=0)
    assert np.abs(expected - views[0]).max() > 1  # the views differ: the test can tell them apart
    assert_rounds_to(read(tmp_path / "out.png"), expected)


def test_tta_progress_counts_every_view() -> None:
    class Upscaler:
        def restore(self, image: torch.Tensor, *, on_progress: Any = None, **_: Any) -> torch.Tensor:
            for done in (1, 2):
                on_progress(done, 2)
            return image.repeat_interleave(2, -1).repeat_interleave(2, -2)

    seen: list[tuple[int, int]] = []
    image = LoadedImage(noise(4, 6).astype(np.float32) / 255, None, False, 8, None, "PNG")
    out = tasks.super_resolve(Upscaler(), image, RunOptions(tta=True), lambda d, t: seen.append((d, t)))
    assert seen == [(done, 16) for done in range(1, 17)]
    np.testing.assert_allclose(out.rgb, image.rgb.repeat(2, 0).repeat(2, 1), atol=1e-6)


@pytest.mark.slow
def test_entry_point_json_and_partial_failure(tmp_path: Path, registry: Path) -> None:
    """Through the installed script: one good and one corrupt input give exit 1, the good output
    (the model's sample), one JSON record per input on stdout and the failure in the summary."""
    pixels = noise(16, 24, seed=3)
    good = write(tmp_path / "in" / "a.png", pixels)
    bad = tmp_path / "in" / "b.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    out = tmp_path / "out"
    proc = run_entry_point(
        tmp_path, "sr", good, bad, "-o", out, "--model", "tiny-sr", "--json", RESSHIFT_REGISTRY=str(registry)
    )
    assert proc.returncode == 1, proc.stderr
    assert_rounds_to(read(out / "a.png"), sample("sr-tiny", pixels))
    assert not (out / "b.png").exists()
    # An input whose header is unreadable fails before the model is loaded, so its record comes first.
    second, first = records(proc.stdout)
    assert set(first) == set(second) == RECORD_KEYS
    assert first["input"] == str(good) and first["output"] == str(out / "a.png")
    assert first["status"] == "done" and first["size"] == [24, 16] and first["output_size"] == [96, 64]
    assert isinstance(first["seconds"], float) and first["seconds"] > 0
    assert second["input"] == str(bad) and second["status"] == "failed"
    assert "cannot read" in second["error"]
    summary = proc.stderr[proc.stderr.index("1 failed:") :]
    assert f"{bad}: cannot read" in summary
    assert summary.count(str(bad)) == 1 and str(bad) not in second["error"]  # named once, not twice
    assert "Traceback" not in proc.stderr


def test_entry_point_success_exit_code(tmp_path: Path, registry: Path) -> None:
    src = write(tmp_path / "a.png", noise(16, 16))
    proc = run_entry_point(
        tmp_path, "sr", src, "-o", tmp_path / "b.png", "--registry", registry, "--model", "tiny-sr"
    )
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "b.png").size == (64, 64)
    assert "1 restored" in proc.stderr


# Inputs and outputs ---------------------------------------------------------------------------


def test_output_is_a_file_for_one_input_else_a_directory(tmp_path: Path, registry: Path) -> None:
    a = write(tmp_path / "a.png", noise(16, 16, seed=1))
    b = write(tmp_path / "b.png", noise(16, 16, seed=2))
    assert restore("sr", registry, a, "-o", tmp_path / "single.png").exit_code == 0
    assert Image.open(tmp_path / "single.png").size == (64, 64)
    # One input, -o without an image suffix: a directory.
    assert restore("sr", registry, a, "-o", tmp_path / "one").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["a.png"]
    # Several inputs: a directory; outputs keep their names.
    assert restore("sr", registry, a, b, "-o", tmp_path / "many").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["a.png", "b.png"]
    np.testing.assert_array_equal(read(tmp_path / "many" / "a.png"), read(tmp_path / "single.png"))
    assert_rounds_to(read(tmp_path / "many" / "b.png"), sample("sr-tiny", noise(16, 16, seed=2)))


def test_directories_recursive_suffix_and_ext(tmp_path: Path, registry: Path) -> None:
    src = tmp_path / "photos"
    write(src / "a.png", noise(16, 16, seed=1))
    write(src / "sub" / "b.jpg", noise(16, 16, seed=2), quality=95)
    (src / "notes.txt").write_text("not an image")

    flat = restore("sr", registry, src, "-o", tmp_path / "flat")
    assert flat.exit_code == 0, flat.stderr
    assert sorted(str(p.relative_to(tmp_path / "flat")) for p in (tmp_path / "flat").rglob("*")) == ["a.png"]
    assert "1 non-image files ignored" in flat.stderr

    deep = restore(
        "sr", registry, src, "-o", tmp_path / "deep", "--recursive", "--suffix", "_x4", "--ext", "webp"
    )
    assert deep.exit_code == 0, deep.stderr
    outputs = sorted(str(p.relative_to(tmp_path / "deep")) for p in (tmp_path / "deep").rglob("*.*"))
    assert outputs == ["a_x4.webp", "sub/b_x4.webp"]
    for name in outputs:
        with Image.open(tmp_path / "deep" / name) as im:
            assert (im.format, im.size) == ("WEBP", (64, 64))

    # --ext auto keeps the input's format; jpg forces JPEG.
    auto = restore("sr", registry, src, "-o", tmp_path / "auto", "-r")
    assert auto.exit_code == 0
    assert Image.open(tmp_path / "auto" / "sub" / "b.jpg").format == "JPEG"
    assert restore("sr", registry, src / "a.png", "-o", tmp_path / "j", "--ext", "jpg").exit_code == 0
    assert Image.open(tmp_path / "j" / "a.jpg").format == "JPEG"


def test_inputs_that_would_share_an_output_are_kept_apart(tmp_path: Path, registry: Path) -> None:
    write(tmp_path / "in" / "a.png", noise(16, 16, seed=1))
    write(tmp_path / "in" / "a.bmp", noise(16, 16, seed=2))
    result = restore("sr", registry, tmp_path / "in", "-o", tmp_path / "out", "--ext", "png")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a-png.png", "a.png"]
    assert "would both write" in result.stderr
    assert_rounds_to(read(tmp_path / "out" / "a.png"), sample("sr-tiny", noise(16, 16, seed=2)))


def test_existing_outputs_are_skipped_unless_overwrite(tmp_path: Path, registry: Path) -> None:
    src = write(tmp_path / "a.png", noise(16, 16))
    out = write(tmp_path / "out" / "a.png", np.zeros((4, 4, 3), np.uint8))
    before = out.read_bytes()

    skipped = restore("sr", registry, src, "-o", tmp_path / "out", "--json")
    assert skipped.exit_code == 0
    assert out.read_bytes() == before
    (record,) = records(skipped.stdout)
    assert record["status"] == "skipped" and record["output"] == str(out)
    assert "skipped" in skipped.stderr and "--overwrite" in skipped.stderr
    assert "loading" not in skipped.stderr  # nothing to do: the model is not loaded

    redone = restore("sr", registry, src, "-o", tmp_path / "out", "--overwrite", "--json")
    assert redone.exit_code == 0
    assert records(redone.stdout)[0]["status"] == "done"
    assert_rounds_to(read(out), sample("sr-tiny", noise(16, 16)))


def test_output_onto_its_own_input_is_refused(tmp_path: Path, registry: Path) -> None:
    src = write(tmp_path / "a.png", noise(16, 16))
    before = src.read_bytes()
    result = restore("sr", registry, src, "-o", tmp_path)
    assert result.exit_code == 1
    assert src.read_bytes() == before
    assert "would overwrite the input" in result.stderr


# Exit codes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sr", "missing.png", "-o", "out"], "input not found"),
        (["sr", "empty", "-o", "out"], "no input images found"),
        (["sr", "text", "-o", "out"], "1 non-image files ignored"),
        (["sr", "a.png", "b.png", "-o", "taken.png"], "need an output directory"),
        (["sr", "-o", "out"], "Missing argument"),
        (["sr", "a.png"], "Missing option '-o'"),
        (["sr", "a.png", "-o", "out", "--ext", "gif"], "Invalid value for '--ext'"),
        (["sr", "a.png", "-o", "out", "--tile", "0"], "Invalid value for '--tile'"),
        (["sr", "a.png", "-o", "out", "--batch-size", "0"], "Invalid value for '--batch-size'"),
        (["sr", "a.png", "-o", "out", "--precision", "fp8"], "Invalid value for '--precision'"),
        (["sr", "a.png", "-o", "out", "--device", "gpu"], "Invalid value for '--device'"),
        (["sr", "a.png", "-o", "out", "--seed", "x"], "Invalid value for '--seed'"),
        (["inpaint", "a.png", "-o", "out"], "Missing option '--mask'"),
        (["inpaint", "a.png", "--mask", "nomask.png", "-o", "out"], "mask not found"),
        (["inpaint", "a.png", "b.png", "--mask", "taken.png", "-o", "out"], "need --mask DIR"),
        (["sr", "a.png", "b.png", "-o", "new.png"], "need an output directory"),
        (["face", "-o", "out"], "give face images, or --batch DIR"),
        (["face", "--batch", "a.png", "-o", "out"], "Invalid value for '--batch'"),
        (["weights", "convert", "missing.pth", "out.safetensors"], "does not exist"),
        (["nonsense"], "No such command"),
    ],
)
def test_usage_errors_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a.png", noise(16, 16))
    write(tmp_path / "b.png", noise(16, 16))
    write(tmp_path / "taken.png", noise(4, 4))
    write(tmp_path / "masks" / "a.png", noise(16, 16, channels=1))
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.txt").write_text("hello")
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_mask_fails_only_its_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a.png", noise(64, 64))
    write(tmp_path / "b.png", noise(64, 64))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[20:40, 20:40] = 255
    write(tmp_path / "masks" / "a.png", mask)
    result = restore("inpaint", registry, "a.png", "b.png", "--mask", "masks", "-o", "out")
    assert result.exit_code == 1
    assert "no mask for b.png" in result.stderr
    assert (tmp_path / "out" / "a.png").exists() and not (tmp_path / "out" / "b.png").exists()


def test_usage_error_exit_code_of_the_entry_point(tmp_path: Path) -> None:
    proc = run_entry_point(tmp_path, "sr", tmp_path / "missing.png", "-o", tmp_path / "out")
    assert proc.returncode == 2
    assert "input not found" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--model", "tiny-face"], "model 'tiny-face' is for 'face', not 'sr'"),
        (["--model", "tiny-sr", "--checkpoint", "missing.safetensors"], "model file not found"),
        (["--model", "tiny-sr", "--autoencoder", "missing.safetensors"], "autoencoder file not found"),
        (["--model", "tiny-sr", "--device", "cuda"], "CUDA is not available"),
        (["--model", "tiny-sr", "--device", "cuda:1"], "CUDA is not available"),
        (["--model", "tiny-sr", "--device", "mps"], "MPS is not available"),
        (["--model", "tiny-sr", "--registry", "missing.toml"], "registry file not found"),
        ([], "'realsr-v3' is not in the cache"),
    ],
)
def test_model_unavailable_exit_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: Path, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESSHIFT_REGISTRY", str(registry))
    write(tmp_path / "a.png", noise(16, 16))
    result = invoke("sr", "a.png", "-o", "out", *args)
    assert result.exit_code == 3
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_cuda_exit_code_of_the_entry_point(tmp_path: Path, registry: Path) -> None:
    src = write(tmp_path / "a.png", noise(16, 16))
    proc = run_entry_point(
        tmp_path,
        "sr",
        src,
        "-o",
        tmp_path / "b.png",
        "--device",
        "cuda",
        "--registry",
        registry,
        "--model",
        "tiny-sr",
    )
    assert proc.returncode == 3
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("loading")]
    assert lines == ["error: device 'cuda' requested but CUDA is not available here; use --device cpu"]
    assert not (tmp_path / "b.png").exists()


def _interrupt_call(monkeypatch: pytest.MonkeyPatch, n: int) -> list[int]:
    """Make the ``n``-th restoration raise KeyboardInterrupt (as Ctrl-C would); returns the call log."""
    real = tasks.restore_prepared
    calls: list[int] = []

    def interrupted(*args: Any, **kwargs: Any) -> list[tasks.Restored]:
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks, "restore_prepared", interrupted)
    return calls


def test_interrupt_exits_130_and_keeps_finished_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: Path
) -> None:
    for i in range(3):
        write(tmp_path / "in" / f"{i}.png", noise(16, 16, seed=i))
    calls = _interrupt_call(monkeypatch, 2)
    result = restore("sr", registry, tmp_path / "in", "-o", tmp_path / "out")
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines()[-1] == (
        "interrupted after 1 of 3 images; finished outputs are kept "
        "(run the same command again to do the rest: existing outputs are skipped)"
    )
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["0.png"]
    assert len(calls) == 2


def test_interrupt_before_any_output_says_nothing_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: Path
) -> None:
    write(tmp_path / "in" / "0.png", noise(16, 16, seed=0))
    _interrupt_call(monkeypatch, 1)
    result = restore("sr", registry, tmp_path / "in", "-o", tmp_path / "out")
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines()[-1] == "interrupted; no output was written"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_interrupt_under_torchrun_names_the_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: Path
) -> None:
    """Every rank prints its own line for its own share, so the line says which rank it is."""
    from resshift_cli.distributed import World

    for i in range(4):
        write(tmp_path / "in" / f"{i}.png", noise(16, 16, seed=i))
    monkeypatch.setattr(World, "from_env", classmethod(lambda cls: cls(1, 2, 1)))
    monkeypatch.setattr(World, "start", lambda self, device_type: None)  # no process group in a test
    monkeypatch.setattr(World, "stop", lambda self: None)
    _interrupt_call(monkeypatch, 2)
    result = restore("sr", registry, tmp_path / "in", "-o", tmp_path / "out")
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines()[-1] == (
        "rank 1: interrupted after 1 of 2 images; finished outputs are kept "
        "(run the same command again to do the rest: existing outputs are skipped)"
    )
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["1.png"]  # rank 1's share: 1.png, 3.png


# Options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "name", "shown"),
    [
        ([], "auto", "fp32"),
        (["--precision", "auto"], "auto", "fp32"),
        (["--precision", "fp32"], "fp32", "fp32"),
        (["--precision", "fp16"], "fp16", "fp16"),
        (["--precision", "bf16"], "bf16", "bf16"),
        (["--precision", "bf16", "--fp32"], "fp32", "fp32"),
        (["--fp32"], "fp32", "fp32"),
    ],
)
def test_precision_reaches_the_model(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    registry: Path,
    args: list[str],
    name: str,
    shown: str,
) -> None:
    """What the model is loaded with, for each precision option (auto is fp32 on the CPU)."""
    seen: dict[str, Any] = {}

    def fake_load(*_args: Any, **kwargs: Any) -> None:
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(loading, "load_restorer", fake_load)
    src = write(tmp_path / "a.png", noise(16, 16))
    result = restore("sr", registry, src, "-o", tmp_path / "b.png", "--device", "cpu", *args)
    assert result.exit_code == 3 and "stop here" in result.stderr
    assert seen["precision"] == name
    assert seen["device"] == torch.device("cpu")
    assert f"loading tiny-sr on cpu ({shown})" in result.stderr


def test_bf16_runs_under_autocast(tmp_path: Path, registry: Path) -> None:
    pixels = noise(16, 16)
    src = write(tmp_path / "a.png", pixels)
    result = restore("sr", registry, src, "-o", tmp_path / "bf16.png", "--precision", "bf16")
    assert result.exit_code == 0
    assert "loading tiny-sr on cpu (bf16)" in result.stderr
    out = read(tmp_path / "bf16.png")
    assert out.shape == (64, 64, 3)
    assert not np.array_equal(out, np.rint(sample("sr-tiny", pixels)))


def test_quiet_prints_errors_only(tmp_path: Path, registry: Path) -> None:
    good = write(tmp_path / "in" / "a.png", noise(16, 16))
    ok = restore("sr", registry, good, "-o", tmp_path / "q1", "--quiet")
    assert ok.exit_code == 0
    assert ok.stderr == "" and ok.stdout == ""
    assert (tmp_path / "q1" / "a.png").exists()

    (tmp_path / "in" / "b.png").write_bytes(b"broken")
    failed = restore("sr", registry, tmp_path / "in", "-o", tmp_path / "q2", "-q")
    assert failed.exit_code == 1
    lines = failed.stderr.splitlines()
    assert lines and all("b.png" in line or line == "1 failed:" for line in lines), lines
    assert any(line.startswith("error:") for line in lines)


def test_max_pixels(tmp_path: Path, registry: Path) -> None:
    small = write(tmp_path / "in" / "a.png", noise(16, 16))
    write(tmp_path / "in" / "b.png", noise(16, 24))
    result = restore("sr", registry, tmp_path / "in", "-o", tmp_path / "out", "--max-pixels", 300, "--json")
    assert result.exit_code == 1
    refused, done = records(result.stdout)  # refused from its header, before the model runs
    assert done["input"] == str(small) and done["status"] == "done"
    assert refused["status"] == "failed" and "above the limit of 300" in refused["error"]
    assert "--max-pixels" in refused["error"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]


def test_registry_from_the_environment_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RESSHIFT_REGISTRY is read; its [defaults] choose the model when --model is not given."""
    reg = write_registry(tmp_path, defaults=True)
    monkeypatch.setenv("RESSHIFT_REGISTRY", str(reg))
    pixels = noise(16, 16)
    src = write(tmp_path / "a.png", pixels)
    result = invoke("sr", src, "-o", tmp_path / "b.png", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert "loading tiny-sr on cpu (fp32)" in result.stderr
    assert_rounds_to(read(tmp_path / "b.png"), sample("sr-tiny", pixels))


def test_checkpoint_and_autoencoder_files_replace_the_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: Path
) -> None:
    """--checkpoint (here an upstream-style .pth) and --autoencoder win over the registry paths,
    which point nowhere in an override file merged over the tiny registry."""
    monkeypatch.setenv("RESSHIFT_REGISTRY", str(registry))
    override = tmp_path / "override.toml"
    override.write_text(
        '[models.tiny-sr]\npath = "nowhere/unet.safetensors"\n\n'
        '[autoencoders.tiny-sr-vq]\npath = "nowhere/ae.safetensors"\n'
    )
    unet = load_file(str(reference_path("parity", "sr-tiny", "unet.safetensors")))
    pth = tmp_path / "unet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in unet.items()}}, pth)
    ae = reference_path("parity", "sr-tiny", "autoencoder.safetensors")
    pixels = noise(16, 16)
    src = write(tmp_path / "a.png", pixels)
    base = ["sr", src, "-o", tmp_path / "b.png", "--registry", override, "--model", "tiny-sr"]

    no_model = invoke(*base)
    assert no_model.exit_code == 3 and "nowhere/unet.safetensors" in no_model.stderr
    no_ae = invoke(*base, "--checkpoint", pth)
    assert no_ae.exit_code == 3 and "nowhere/ae.safetensors" in no_ae.stderr
    both = invoke(*base, "--checkpoint", pth, "--autoencoder", ae)
    assert both.exit_code == 0, both.stderr
    assert_rounds_to(read(tmp_path / "b.png"), sample("sr-tiny", pixels))


# Tiling -------------------------------------------------------------------------------------------


@pytest.fixture
def encoder_inputs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Shapes of every batch the autoencoder encodes (the upsampled LQ), recorded."""
    shapes: list[tuple[int, ...]] = []
    real = LatentSpace.encode

    def spy(self: LatentSpace, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(LatentSpace, "encode", spy)
    return shapes


def test_tiles(tmp_path: Path, registry: Path, encoder_inputs: list[tuple[int, ...]]) -> None:
    """--tile smaller than the image runs tiled (no encoder call sees more than a tile) with the
    right output size; --batch-size 2 puts two tiles in one call and gives the same output as
    --batch-size 1; a tile larger than the image is the untiled run."""
    pixels = noise(32, 40)
    src = write(tmp_path / "a.png", pixels)

    assert restore("sr", registry, src, "-o", tmp_path / "whole.png").exit_code == 0
    assert encoder_inputs == [(1, 3, 128, 160)]
    assert_rounds_to(read(tmp_path / "whole.png"), sample("sr-tiny", pixels))

    encoder_inputs.clear()
    tiled = restore("sr", registry, src, "-o", tmp_path / "t1.png", "--tile", 16, "--tile-overlap", 8)
    assert tiled.exit_code == 0, tiled.stderr
    assert len(encoder_inputs) > 1
    assert all(s[0] == 1 and s[2] <= 64 and s[3] <= 64 for s in encoder_inputs), encoder_inputs
    one = read(tmp_path / "t1.png")
    assert one.shape == (128, 160, 3)

    encoder_inputs.clear()
    assert (
        restore(
            "sr",
            registry,
            src,
            "-o",
            tmp_path / "t2.png",
            "--tile",
            16,
            "--tile-overlap",
            8,
            "--batch-size",
            2,
        ).exit_code
        == 0
    )
    assert max(s[0] for s in encoder_inputs) == 2
    two = read(tmp_path / "t2.png")
    # Batched kernels sum in another order: float differences of ~1e-6 may flip a rounding.
    difference = np.abs(one.astype(int) - two.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01

    encoder_inputs.clear()
    assert restore("sr", registry, src, "-o", tmp_path / "big.png", "--tile", 45).exit_code == 0
    assert encoder_inputs == [(1, 3, 128, 160)]
    np.testing.assert_array_equal(read(tmp_path / "big.png"), read(tmp_path / "whole.png"))


def test_tile_overlap_changes_the_tiling(
    tmp_path: Path, registry: Path, encoder_inputs: list[tuple[int, ...]]
) -> None:
    src = write(tmp_path / "a.png", noise(32, 40))
    counts = []
    for overlap in (0, 8):
        encoder_inputs.clear()
        result = restore(
            "sr", registry, src, "-o", tmp_path / f"o{overlap}.png", "--tile", 16, "--tile-overlap", overlap
        )
        assert result.exit_code == 0
        counts.append(len(encoder_inputs))
        assert Image.open(tmp_path / f"o{overlap}.png").size == (160, 128)
    # 32x40 in 16-pixel tiles: 2 x 3 tiles without overlap, more when tiles step by less.
    assert counts[0] == 6 and counts[1] > counts[0]


# Image kinds through sr ----------------------------------------------------------------------------


def test_rgba_in_rgba_out(tmp_path: Path, registry: Path) -> None:
    rgb = noise(16, 16)
    alpha = np.zeros((16, 16), np.uint8)
    alpha[:, 8:] = 255
    src = write(tmp_path / "rgba.png", np.dstack([rgb, alpha]))
    assert restore("sr", registry, src, "-o", tmp_path / "out.png").exit_code == 0
    with Image.open(tmp_path / "out.png") as im:
        assert (im.mode, im.size) == ("RGBA", (64, 64))
        out = np.asarray(im)
    # Colour is restored as if there were no alpha; alpha is scaled to the output size.
    assert_rounds_to(out[..., :3], sample("sr-tiny", rgb))
    assert (out[:, :24, 3] == 0).all() and (out[:, 40:, 3] == 255).all()


def test_gray_in_gray_out(tmp_path: Path, registry: Path) -> None:
    gray = noise(16, 16, channels=1)
    src = write(tmp_path / "gray.png", gray)
    assert restore("sr", registry, src, "-o", tmp_path / "out.png").exit_code == 0
    with Image.open(tmp_path / "out.png") as im:
        assert (im.mode, im.size) == ("L", (64, 64))
        out = np.asarray(im).astype(np.float64)
    # The luminance (ITU-R 601) of the colour restoration, up to the rounding of both.
    colour = sample("sr-tiny", np.repeat(gray[..., None], 3, axis=2))
    luma = colour @ np.array([0.299, 0.587, 0.114])
    assert np.abs(out - luma).max() <= 0.51


def test_16_bit_in_16_bit_out(tmp_path: Path, registry: Path) -> None:
    values = np.random.default_rng(5).integers(0, 65536, (16, 16, 3), dtype=np.uint16)
    rgb16 = png16(tmp_path / "rgb16.png", values)
    gray16 = write(tmp_path / "gray16.png", values[..., 0])
    result = restore("sr", registry, rgb16, gray16, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert png_header(tmp_path / "out" / "rgb16.png") == (64, 64, 16, 2)
    assert png_header(tmp_path / "out" / "gray16.png") == (64, 64, 16, 0)
    # All 16 bits carry information, not an 8-bit image scaled up (multiples of 257).
    out = np.rint(load_image(tmp_path / "out" / "rgb16.png").rgb * 65535).astype(np.int64)
    assert (out % 257 != 0).mean() > 0.5
    with Image.open(tmp_path / "out" / "gray16.png") as im:
        assert (np.asarray(im).astype(np.int64) % 257 != 0).mean() > 0.5


# Inpainting ----------------------------------------------------------------------------------------


def test_inpaint_fills_the_hole_and_keeps_the_rest(tmp_path: Path, registry: Path) -> None:
    pixels = noise(64, 64, seed=4)
    hole = np.zeros((64, 64), bool)
    hole[16:40, 20:44] = True
    src = write(tmp_path / "a.png", pixels)
    mask = write(tmp_path / "mask.png", hole.astype(np.uint8))  # 0/1 works as 0/255 does
    result = restore("inpaint", registry, src, "--mask", mask, "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.stderr
    out = read(tmp_path / "out.png")
    np.testing.assert_array_equal(out[~hole], pixels[~hole])
    assert_rounds_to(out[hole], sample("inpaint-tiny", pixels, hole=hole)[hole])
    assert not np.array_equal(out[hole], pixels[hole])


def test_inpaint_batch_with_a_mask_directory(tmp_path: Path, registry: Path) -> None:
    """Masks are matched by file stem (any image format); a mask of the wrong size fails only
    its own input."""
    hole = np.zeros((64, 64), np.uint8)
    hole[8:24, 8:24] = 255
    for i, name in enumerate("abc"):
        write(tmp_path / "in" / f"{name}.png", noise(64, 64, seed=i))
    write(tmp_path / "masks" / "a.png", hole)
    write(tmp_path / "masks" / "b.bmp", np.zeros((64, 64), np.uint8))
    write(tmp_path / "masks" / "c.png", hole[:32, :32])
    result = restore(
        "inpaint", registry, tmp_path / "in", "--mask", tmp_path / "masks", "-o", tmp_path / "out", "--json"
    )
    assert result.exit_code == 1
    c, a, b = records(result.stdout)  # the wrong mask is found from headers, before the model runs
    assert (a["status"], b["status"], c["status"]) == ("done", "done", "failed")
    assert c["error"] == "mask is 32x32 but the image is 64x64"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    # An empty mask leaves the image as it is, and says so.
    np.testing.assert_array_equal(read(tmp_path / "out" / "b.png"), noise(64, 64, seed=1))
    assert "the mask has no hole" in " ".join(b["notices"])
    kept = read(tmp_path / "out" / "a.png")
    outside = hole == 0
    np.testing.assert_array_equal(kept[outside], noise(64, 64, seed=0)[outside])
    assert f"{tmp_path / 'in' / 'c.png'}: mask is 32x32" in result.stderr


# Faces ---------------------------------------------------------------------------------------------


def test_face_single_and_batch(tmp_path: Path, registry: Path) -> None:
    """A face of the model's size (64 for tiny-face) is its sample; other sizes are resized to it
    and back, with a notice."""
    aligned = noise(64, 64, seed=6)
    write(tmp_path / "faces" / "aligned.png", aligned)
    write(tmp_path / "faces" / "other.png", noise(48, 40, seed=7))

    single = restore("face", registry, tmp_path / "faces" / "aligned.png", "-o", tmp_path / "one.png")
    assert single.exit_code == 0, single.stderr
    assert_rounds_to(read(tmp_path / "one.png"), sample("face-tiny", aligned))
    assert "resized" not in single.stderr

    batch = restore("face", registry, "--batch", tmp_path / "faces", "-o", tmp_path / "out", "--json")
    assert batch.exit_code == 0, batch.stderr
    first, second = records(batch.stdout)
    assert first["output_size"] == [64, 64] and second["output_size"] == [40, 48]
    assert Image.open(tmp_path / "out" / "other.png").size == (40, 48)
    np.testing.assert_array_equal(read(tmp_path / "out" / "aligned.png"), read(tmp_path / "one.png"))
    assert first["notices"] == []
    assert second["notices"] == [
        "the face model expects aligned 64x64 faces; resized 40x48 to 64x64 and back"
    ]
    assert "resized 40x48 to 64x64 and back" in batch.stderr


def test_face_model_for_another_task_is_refused(tmp_path: Path, registry: Path) -> None:
    src = write(tmp_path / "a.png", noise(64, 64))
    result = invoke("face", src, "-o", tmp_path / "b.png", "--registry", registry, "--model", "tiny-inpaint")
    assert result.exit_code == 3
    assert "model 'tiny-inpaint' is for 'inpaint', not 'face'" in result.stderr


# Weights ---------------------------------------------------------------------------------------------


def _lines(output: str) -> dict[str, str]:
    return {line.split()[0]: line for line in output.splitlines() if line.strip()}


def test_weights_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: Path) -> None:
    result = invoke("weights", "list", "--registry", registry)
    assert result.exit_code == 0
    lines = _lines(result.stdout)
    assert {"tiny-sr", "tiny-inpaint", "tiny-face", "tiny-sr-vq", "realsr-v3", "vq-f4"} <= lines.keys()
    assert lines["tiny-sr"].split()[:5] == ["tiny-sr", "sr", "x4", "4", "steps"]
    # Entries with a registry path are files on disk, not downloads; the bundled lite is one.
    assert "on disk" in lines["tiny-sr"] and "on disk" in lines["tiny-face-vq"] and "on disk" in lines["lite"]
    assert "not downloaded" in lines["realsr-v3"] and "[default for sr]" in lines["realsr-v3"]
    (tmp_path / "gone.toml").write_text('[models.realsr-v3]\npath = "nowhere.safetensors"\n')
    gone = _lines(invoke("weights", "list", "--registry", tmp_path / "gone.toml").stdout)
    assert "file missing" in gone["realsr-v3"]
    assert lines["tiny-inpaint"].split()[:3] == ["tiny-inpaint", "inpaint", "x1"]

    monkeypatch.setenv("RESSHIFT_REGISTRY", str(write_registry(tmp_path, defaults=True)))
    from_env = _lines(invoke("weights", "list").stdout)
    assert "[default for face]" in from_env["tiny-face"] and "default" not in from_env["faceir"]

    broken = tmp_path / "broken.toml"
    broken.write_text("[models.tiny-sr]\nscale = 3\n")
    invalid = invoke("weights", "list", "--registry", broken)
    assert invalid.exit_code == 3
    assert invalid.stderr.splitlines() == [
        f"error: {broken}: models.tiny-sr.scale: 3 disagrees with diffusion.sf = 4"
    ]


def test_weights_path(registry: Path) -> None:
    result = invoke("weights", "path", "tiny-sr", "--registry", registry)
    assert result.exit_code == 0
    assert result.stdout.strip() == str(reference_path("parity", "sr-tiny", "unet.safetensors"))
    assert invoke("weights", "path", "tiny-face-vq", "--registry", registry).stdout.strip() == str(
        reference_path("parity", "face-tiny", "autoencoder.safetensors")
    )
    missing = invoke("weights", "path", "realsr-v3")
    assert missing.exit_code == 1 and "not on disk" in missing.stderr
    unknown = invoke("weights", "path", "nope")
    assert unknown.exit_code == 3 and "unknown weights 'nope'" in unknown.stderr


def test_weights_fetch(registry: Path) -> None:
    result = invoke("weights", "fetch", "tiny-inpaint", "--registry", registry)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"tiny-inpaint: {reference_path('parity', 'inpaint-tiny', 'unet.safetensors')}",
        f"tiny-inpaint-vq: {reference_path('parity', 'inpaint-tiny', 'autoencoder.safetensors')}",
    ]
    assert invoke("weights", "fetch", "tiny-sr", "-q", "--registry", registry).stdout == ""
    offline = invoke("weights", "fetch", "realsr-v3")
    assert offline.exit_code == 3 and "not in the cache" in offline.stderr
    assert invoke("weights", "fetch", "nope").exit_code == 3


def test_weights_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: Path) -> None:
    unet_file = reference_path("parity", "sr-tiny", "unet.safetensors")
    with safe_open(str(unet_file), "pt") as f:
        count = len(list(f.keys()))
    one = invoke("weights", "verify", "tiny-sr", "--registry", registry)
    assert one.exit_code == 0
    assert one.stdout.startswith("ok") and f"loads, {count} tensors" in one.stdout

    everything = invoke("weights", "verify", "--registry", registry)
    assert everything.exit_code == 0
    verified = {line.split()[1].rstrip(":") for line in everything.stdout.splitlines()}
    assert verified == {
        "tiny-sr",
        "tiny-inpaint",
        "tiny-face",
        "tiny-sr-vq",
        "tiny-inpaint-vq",
        "tiny-face-vq",
        "lite",
    }

    # Only the bundled model is on disk with the built-in registry, and its hash is known.
    bundled = invoke("weights", "verify").stdout.splitlines()
    assert len(bundled) == 1 and bundled[0].startswith("ok") and "lite: sha256 ok" in bundled[0]
    absent = invoke("weights", "verify", "realsr-v3")
    assert absent.exit_code == 1 and absent.stdout.startswith("FAIL") and "not downloaded" in absent.stdout

    digest = hashlib.sha256(unet_file.read_bytes()).hexdigest()
    monkeypatch.setenv("RESSHIFT_REGISTRY", str(registry))
    good = tmp_path / "good.toml"
    good.write_text(f'[models.tiny-sr]\nsha256 = "{digest}"\n')
    checked = invoke("weights", "verify", "tiny-sr", "--registry", good)
    assert checked.exit_code == 0 and "sha256 ok" in checked.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[models.tiny-sr]\nsha256 = "{"0" * 64}"\n')
    refused = invoke("weights", "verify", "tiny-sr", "--registry", bad)
    assert refused.exit_code == 1 and refused.stdout.startswith("FAIL") and digest in refused.stdout
    assert unet_file.is_file()  # a file the registry names by path is reported, never deleted

    # Nothing on disk at all (the bundled file moved away): said so, and not an error.
    monkeypatch.delenv("RESSHIFT_REGISTRY")
    gone = tmp_path / "gone.toml"
    gone.write_text(f'[models.lite]\npath = "{(tmp_path / "missing.safetensors").as_posix()}"\n')
    empty = invoke("weights", "verify", "--registry", gone)
    assert empty.exit_code == 0 and empty.stdout == "no weights on disk to verify\n"


def test_weights_convert(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    src = tmp_path / "model.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tensors.items()}}, src)
    dst = tmp_path / "model.safetensors"
    result = invoke("weights", "convert", src, dst)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(dst)
    converted = load_file(str(dst))
    assert converted.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(converted[key], value) and converted[key].dtype == value.dtype

    wrong = invoke("weights", "convert", src, tmp_path / "model.bin")
    assert wrong.exit_code == 3 and "must end in .safetensors" in wrong.stderr

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"x": _Touch(marker)}, evil)
    refused = invoke("weights", "convert", evil, tmp_path / "evil.safetensors")
    assert refused.exit_code == 3 and "refused" in refused.stderr
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()


class _Touch:
    """Unpickling this creates a file: what weights_only=True must refuse to run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))
