"""Reliability: every bad input gets a clear one-line error, nothing is ever lost or half-written.

Real files throughout (odd and corrupt images made with Pillow or by hand, real bad checkpoints),
the tiny random-weight models of :mod:`tinymodels`, and the installed ``resshift`` script in a
subprocess where the exit code or a signal is the point.
"""

# Case -> test that proves it. "here" is this file; I = test_imagefiles.py, C = test_cli.py,
# H = test_hub.py, K = test_checkpoints.py, R = test_registry.py.
#
# Bad images and masks (one-line error or notice, documented exit code, the batch goes on)
#   not an image, truncated, zero bytes  I::test_not_an_image, I::test_truncated_file, I::test_zero_byte_file,
#                                        I::test_broken_headers; C::test_entry_point_json_and_partial_failure;
#                                        here test_bad_and_odd_images_in_one_batch (CLI, subprocess)
#   CMYK, P + transparency, LA,          I::test_cmyk_becomes_rgb, I::test_gray_with_alpha,
#   I;16, I, F                           I::test_palette_with_transparency_keeps_alpha,
#                                        I::test_i16_modes_scale_by_65535,
#                                        I::test_i_mode_scales_by_65535_and_clips,
#                                        I::test_f_mode_is_clipped_to_unit_range; CLI: here (the batch test)
#   animated (first frame, notice)       I::test_animated_gif_gives_first_frame_and_a_notice,
#                                        I::test_animated_png_gives_first_frame_and_a_notice; CLI: here
#   decompression bomb, --max-pixels     I::test_bomb_is_refused_before_decoding, C::test_max_pixels;
#                                        100000x100000 IHDR: here test_declared_giant_png_is_refused and
#                                        test_bad_and_odd_images_in_one_batch
#   tiny and odd sizes (1x1, 3x1000)     here test_bad_and_odd_images_in_one_batch, test_mask_all_hole
#   mask of the wrong size, no hole      C::test_inpaint_batch_with_a_mask_directory
#   mask that is all hole                here test_mask_all_hole
#   non-image files in directories       here test_bad_and_odd_images_in_one_batch (listed in the summary)
#   symlink loops under --recursive      here test_symlink_loop_under_recursive
#   an unforeseen error in one image     here test_an_unexpected_error_fails_one_image_only
#   damaged but readable (Pillow warns)  here test_bad_and_odd_images_in_one_batch (a one-line notice),
#                                        test_loader_on_random_and_mutated_bytes (no warning escapes)
# Outputs
#   a.png and a.jpg never overwrite      C::test_inputs_that_would_share_an_output_are_kept_apart; three-way
#                                        clashes, outputs onto other inputs: here
#                                        test_outputs_never_land_on_each_other_or_on_other_inputs
#   an input is never overwritten        C::test_output_onto_its_own_input_is_refused; --overwrite goes
#                                        through temp + rename: here
#                                        test_overwriting_an_input_goes_through_a_temp_file
#   unwritable output directory          here test_unwritable_output_directory; I::test_unwritable_directory
#   full disk                            here test_full_disk; I::test_failed_write_keeps_old_output
#   Ctrl-C during a batch, re-run        here test_ctrl_c_keeps_finished_outputs_and_a_rerun_completes;
#                                        C::test_interrupt_exits_130_and_keeps_finished_outputs;
#                                        here test_ctrl_c_right_after_the_temp_file_is_created_leaves_nothing
#   -o inside a --recursive input        here test_outputs_inside_the_input_directory_are_not_inputs
# Weights
#   missing file                         C::test_model_unavailable_exit_3, K::test_bad_files
#   truncated or corrupted checkpoint    K::test_truncated_checkpoint, K::test_bad_files; CLI: here
#                                        test_bad_checkpoints_exit_3
#   another architecture (model, keys)   K::test_mismatch_names_model_and_keys; CLI: here
#                                        test_bad_checkpoints_exit_3
#   sha256 mismatch (refused, removed)   H::test_sha256_mismatch_of_a_download_is_refused_and_removed,
#                                        H::test_sha256_mismatch_of_a_hub_file_is_refused_and_removed,
#                                        H::test_corrupted_cached_file_is_refused_and_removed;
#                                        CLI: here test_sha256_mismatch_through_the_cli
#   pickle carrying code                 K::test_pickle_with_code_is_refused_and_never_run,
#                                        H::test_pickle_with_code_is_refused, C::test_weights_convert;
#                                        sr --checkpoint: here test_pickle_with_code_is_refused_by_sr
#   download interrupted, resumed        H::test_interrupted_download_leaves_no_complete_file_and_resumes,
#                                        H::test_complete_part_file_is_finished_without_download
#   download restarted                   here test_download_restarts_when_the_part_file_cannot_be_continued
#   Ctrl-C during weights fetch          here test_ctrl_c_during_weights_fetch
#   hub unreachable, offline             H::test_unreachable_network_is_one_line,
#                                        H::test_offline_and_not_cached_is_one_line, C::test_weights_fetch,
#                                        C::test_model_unavailable_exit_3
#   user registry file with errors       R::test_validation_error_names_file_entry_and_key,
#                                        R::test_toml_syntax_error_names_file_and_line, C::test_weights_list;
#                                        through sr, and parameters that build no network: here
#                                        test_registry_errors_exit_3
# Exit codes and summaries
#   documented in README and --help      here test_exit_codes_are_documented; C::test_help_of_every_command
#   2, 3, 130                            C::test_usage_errors_exit_2, C::test_model_unavailable_exit_3,
#                                        the Ctrl-C tests above
#   the summary lists every failure      here test_bad_and_odd_images_in_one_batch, test_full_disk
# Proof by random input (hypothesis)
#   loader: ImageError or a good image   here test_loader_on_random_and_mutated_bytes
#   CLI: no traceback, no partial output here test_cli_on_mutated_images

from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cliutils import RESSHIFT, invoke, noise, records, restore, run_entry_point, subprocess_env, write
from hubfiles import publish, registry_for, sha256
from hubserver import HubServer
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from reference import SHARED, missing, reference_path
from safetensors.torch import load_file
from tinymodels import _table, registry_entries

from resshift_cli import hub, imagefiles
from resshift_cli.hub import ChecksumError, fetch
from resshift_cli.imagefiles import ImageError, load_image
from resshift_cli.pipelines import tasks

pytestmark = pytest.mark.shared  # needs ../shared

TESTDATA = SHARED / "testdata"

# Fixtures of test_cli (autouse: an empty HF cache and offline, one torch thread; the tiny-model
# registry) and of test_hub (a local hub server, HF_HOME pointing at it), used here as they are.


# Helpers -------------------------------------------------------------------------------------------


def chunk(kind: bytes, body: bytes) -> bytes:
    """A PNG chunk with its length and CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def giant_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A PNG of a few dozen bytes whose header declares ``width`` x ``height`` RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def tiff_with_a_tag_past_the_end(path: Path, pixels: np.ndarray) -> Path:
    """A readable TIFF whose ImageDescription tag claims more bytes than the file has: Pillow
    skips the tag with a UserWarning."""
    Image.fromarray(pixels).save(path, tiffinfo={270: "a description long enough to live elsewhere"})
    data = bytearray(path.read_bytes())
    (ifd,) = struct.unpack("<I", data[4:8])
    (count,) = struct.unpack("<H", data[ifd : ifd + 2])
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if struct.unpack("<H", data[entry : entry + 2])[0] == 270:
            data[entry + 4 : entry + 8] = struct.pack("<I", 10**6)
    path.write_bytes(bytes(data))
    return path


def leftovers(directory: Path) -> list[Path]:
    """Temporary or hidden files anywhere under ``directory``: what an interrupted write leaves."""
    return [p for p in directory.rglob("*") if p.name.startswith(".") or p.name.endswith((".tmp", ".part"))]


def decoded_size(path: Path) -> tuple[int, int]:
    """The size of an image file after decoding every pixel (a half-written file fails here)."""
    with Image.open(path) as im:
        im.load()
        return im.size


def assert_one_line_errors(stderr: str, failed: dict[Path, str]) -> None:
    """Each failed input has exactly one ``error:`` line and one summary line, both with its
    reason; there are no other errors and no traceback."""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == len(failed), errors
    assert f"{len(failed)} failed:" in lines
    for source, reason in failed.items():
        mine = [line for line in errors if line.startswith(f"error: {source}: ")]
        assert len(mine) == 1 and reason in mine[0], (source, errors)
        summary = [line for line in lines if line.startswith(f"  {source}: ")]
        assert len(summary) == 1 and reason in summary[0], (source, lines)


# Bad images and masks ------------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_and_odd_images_in_one_batch(tmp_path: Path, registry: Path) -> None:
    """Through the installed script: every unreadable file fails alone with one line, every odd mode
    and size is restored, animations give their first frame with a notice, non-image files are
    listed in the summary; exit 1, no traceback, no partial or temporary file."""
    src = tmp_path / "in"
    whole = write(src / "whole.png", noise(16, 16, seed=1))
    (src / "not-an-image.png").write_text("these are not the pixels you are looking for\n" * 4)
    (src / "truncated.png").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    jpeg = write(tmp_path / "whole.jpg", noise(16, 16, seed=2), quality=90)
    (src / "truncated.jpg").write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    (src / "empty.png").write_bytes(b"")
    giant_png(src / "giant.png")

    Image.fromarray(noise(16, 16, seed=3)).convert("CMYK").save(src / "cmyk.jpg", quality=95)
    palette = Image.fromarray(noise(16, 16, seed=4)).quantize(16)
    palette.save(src / "palette.png", transparency=0)
    write(src / "la.png", noise(16, 16, channels=2, seed=5))
    values = np.random.default_rng(6).integers(0, 65536, (16, 16))
    Image.frombytes("I;16", (16, 16), values.astype("<u2").tobytes()).save(src / "i16.png")
    Image.fromarray(values.astype(np.int32) - 100).save(src / "i32.tif")
    Image.fromarray(np.random.default_rng(7).random((16, 16), dtype=np.float32)).save(src / "float.tif")
    modes = {n: Image.open(src / n).mode for n in ("cmyk.jpg", "la.png", "i16.png", "i32.tif", "float.tif")}
    assert modes == {"cmyk.jpg": "CMYK", "la.png": "LA", "i16.png": "I;16", "i32.tif": "I", "float.tif": "F"}
    assert "transparency" in Image.open(src / "palette.png").info
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 10, 10), (10, 250, 10), (10, 10, 250))]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    frames[0].save(src / "anim.png", save_all=True, append_images=frames[1:])
    tiff_with_a_tag_past_the_end(src / "damaged.tif", noise(16, 16, seed=10))
    write(src / "one.png", noise(1, 1, seed=8))
    write(src / "thin.png", noise(1000, 3, seed=9))
    (src / "notes.txt").write_text("not an image")
    (src / "data.csv").write_text("a,b\n1,2\n")

    out = tmp_path / "out"
    proc = run_entry_point(
        tmp_path, "sr", src, "-o", out, "--registry", registry, "--model", "tiny-sr", "--json"
    )
    assert proc.returncode == 1, proc.stderr
    by_name = {Path(r["input"]).name: r for r in records(proc.stdout)}
    failed = {
        "not-an-image.png": "not an image file",
        "truncated.png": "truncated",
        "truncated.jpg": "cannot read",
        "empty.png": "the file is empty (0 bytes)",
        "giant.png": "100000x100000 is 10,000,000,000 pixels, above the limit",
    }
    done = {
        # name: (output name, decoded mode, decoded size)
        "whole.png": ("whole.png", "RGB", (64, 64)),
        "cmyk.jpg": ("cmyk.jpg", "RGB", (64, 64)),
        "palette.png": ("palette.png", "RGBA", (64, 64)),
        "la.png": ("la.png", "LA", (64, 64)),
        "i16.png": ("i16.png", "I;16", (64, 64)),
        "i32.tif": ("i32.tif", "I;16", (64, 64)),
        "float.tif": ("float.tif", "I;16", (64, 64)),
        "damaged.tif": ("damaged.tif", "RGB", (64, 64)),
        "anim.gif": ("anim.png", "RGB", (64, 64)),
        "anim.png": ("anim-png.png", "RGB", (64, 64)),
        "one.png": ("one.png", "RGB", (4, 4)),
        "thin.png": ("thin.png", "RGB", (12, 4000)),
    }
    assert set(by_name) == set(failed) | set(done)
    assert_one_line_errors(proc.stderr, {src / name: reason for name, reason in failed.items()})
    for name in failed:
        assert by_name[name]["status"] == "failed"
    outputs = {}
    for name, (output, mode, size) in done.items():
        record = by_name[name]
        assert record["status"] == "done", record
        path = Path(record["output"])
        outputs[name] = path
        assert path == out / output
        with Image.open(path) as im:
            assert (im.mode, im.size) == (mode, size), name
        assert decoded_size(path) == size
    # anim.gif and anim.png would both write anim.png: kept apart (see done above).
    assert "would both write" in proc.stderr
    for name in ("anim.gif", "anim.png"):
        assert any("3 frames; only the first is used" in n for n in by_name[name]["notices"])
    assert any("CMYK" in n for n in by_name["cmyk.jpg"]["notices"])
    # Pillow's warning about the damaged tag is a one-line notice, not Python's two-line warning.
    assert by_name["damaged.tif"]["notices"] == ["Tag data larger than file. Skipping tag 270"]
    # Each notice names its input once, at the start of the line.
    assert f"note: {src / 'damaged.tif'}: Tag data larger than file. Skipping tag 270\n" in proc.stderr
    assert proc.stderr.count(str(src / "damaged.tif")) == 1
    assert "Warning" not in proc.stderr and "warnings.warn" not in proc.stderr
    assert "note:" in proc.stderr and "3 frames" in proc.stderr
    # The summary lists the non-image files by name.
    summary = proc.stderr[proc.stderr.index("ignored, not image files:") :]
    assert f"  {src / 'data.csv'}\n  {src / 'notes.txt'}\n" in summary
    assert "12 restored, 5 failed, 2 non-image files ignored" in summary
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in outputs.values())
    assert leftovers(out) == []


def test_declared_giant_png_is_refused(tmp_path: Path) -> None:
    """A PNG declaring 100000x100000 pixels (which Pillow itself calls a bomb) is refused with one
    line naming the limit, before any pixel is decoded; a small real PNG over --max-pixels likewise."""
    giant = giant_png(tmp_path / "giant.png")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(giant)
    with pytest.raises(ImageError) as caught:
        load_image(giant)
    message = str(caught.value)
    assert "\n" not in message and str(giant) in message
    assert "above the limit of 268,435,456" in message and "--max-pixels" in message
    with pytest.raises(ImageError, match="above the limit of 10,000"):
        load_image(giant, max_pixels=10_000)


def test_mask_all_hole(tmp_path: Path, registry: Path) -> None:
    """A mask that is all hole generates the whole image, with a notice; 1x1 images work too."""
    pixels = noise(64, 64, seed=11)
    src = write(tmp_path / "in" / "a.png", pixels)
    write(tmp_path / "in" / "b.png", noise(1, 1, seed=12))
    write(tmp_path / "masks" / "a.png", np.full((64, 64), 255, np.uint8))
    write(tmp_path / "masks" / "b.png", np.full((1, 1), 255, np.uint8))
    result = restore(
        "inpaint", registry, tmp_path / "in", "--mask", tmp_path / "masks", "-o", tmp_path / "out", "--json"
    )
    assert result.exit_code == 0, result.stderr
    for record in records(result.stdout):
        assert record["status"] == "done"
        assert record["notices"] == ["the mask covers the whole image; everything is generated"]
    assert f"note: {src}: the mask covers the whole image" in result.stderr
    out = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert out.shape == (64, 64, 3) and (out != pixels).mean() > 0.5
    assert decoded_size(tmp_path / "out" / "b.png") == (1, 1)


def test_symlink_loop_under_recursive(tmp_path: Path, registry: Path) -> None:
    """A directory symlinked into itself: --recursive finishes and restores each image once."""
    tree = tmp_path / "tree"
    write(tree / "a.png", noise(8, 8, seed=1))
    write(tree / "sub" / "b.png", noise(8, 8, seed=2))
    os.symlink(tree, tree / "sub" / "loop")
    os.symlink(tree / "sub", tree / "again")
    result = restore("sr", registry, tree, "-o", tmp_path / "out", "--recursive", "--json")
    assert result.exit_code == 0, result.stderr
    inputs = sorted(Path(r["input"]).name for r in records(result.stdout))
    assert inputs == ["a.png", "b.png"]
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png"))
    assert len(written) == 2 and "a.png" in written


# Outputs -------------------------------------------------------------------------------------------


def test_outputs_never_land_on_each_other_or_on_other_inputs(
    tmp_path: Path,
    registry: Path,
) -> None:
    """Three inputs named a.png (and an a.bmp) get four outputs; an output that would land on
    another input (a.jpg -> a.png beside it) is renamed, even with --overwrite; no input changes."""
    sizes = {"c1": (8, 8), "c2": (8, 12), "c3": (12, 8)}
    sources = [
        write(tmp_path / d / "a.png", noise(h, w, seed=i)) for i, (d, (h, w)) in enumerate(sizes.items())
    ]
    sources.append(write(tmp_path / "c1" / "a.bmp", noise(4, 4, seed=9)))
    result = restore("sr", registry, *sources, "-o", tmp_path / "out", "--ext", "png", "--json")
    assert result.exit_code == 0, result.stderr
    outputs = {r["input"]: Path(r["output"]) for r in records(result.stdout)}
    assert len(set(outputs.values())) == 4
    for source in sources:
        h, w = np.asarray(Image.open(source)).shape[:2]
        assert decoded_size(outputs[str(source)]) == (4 * w, 4 * h), source

    same = tmp_path / "same"
    jpg = write(same / "a.jpg", noise(8, 8, seed=5), quality=95)
    png = write(same / "a.png", noise(4, 4, seed=6))
    before = jpg.read_bytes()
    in_place = restore("sr", registry, same, "-o", same, "--ext", "png", "--json", "--overwrite")
    assert in_place.exit_code == 0, in_place.stderr
    assert f"the output of {jpg} would overwrite the input {png}; writing a-jpg.png" in in_place.stderr
    assert jpg.read_bytes() == before
    assert decoded_size(same / "a-jpg.png") == (32, 32)
    # a.png is its own output here, and --overwrite allows that: restored from the original 4x4.
    assert decoded_size(png) == (16, 16)


def test_overwriting_an_input_goes_through_a_temp_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    registry: Path,
) -> None:
    """With --overwrite an input that is its own output is replaced by rename from a temporary file
    beside it; without, it is refused and unchanged."""
    src = write(tmp_path / "a.png", noise(8, 8))
    before = src.read_bytes()
    refused = restore("sr", registry, src, "-o", tmp_path)
    assert refused.exit_code == 1 and src.read_bytes() == before
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def recording_replace(source: Any, target: Any) -> None:
        renames.append((Path(source), Path(target)))
        real_replace(source, target)

    monkeypatch.setattr(imagefiles.os, "replace", recording_replace)
    result = restore("sr", registry, src, "-o", tmp_path, "--overwrite")
    assert result.exit_code == 0, result.stderr
    ((temp, target),) = [(t, d) for t, d in renames if d == src]
    assert target == src and temp.parent == tmp_path and temp.name.startswith(".a.png.")
    assert temp.name.endswith(".tmp") and not temp.exists()
    assert decoded_size(src) == (32, 32)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_unwritable_output_directory(tmp_path: Path, registry: Path) -> None:
    """Tests run as root, so a file standing where a directory must go makes it unwritable: the
    inputs bound for it fail with one line naming that file, the others are written."""
    write(tmp_path / "in" / "a.png", noise(8, 8, seed=1))
    write(tmp_path / "in" / "sub" / "b.png", noise(8, 8, seed=2))
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_text("a file, not a directory")
    result = restore("sr", registry, tmp_path / "in", "-o", out, "--recursive")
    assert result.exit_code == 1
    reason = f"cannot create its directory ({out / 'sub'} is a file, not a directory)"
    assert_one_line_errors(result.stderr, {tmp_path / "in" / "sub" / "b.png": reason})
    assert decoded_size(out / "a.png") == (32, 32)
    assert (out / "sub").read_text() == "a file, not a directory"
    assert leftovers(out) == []

    blocked = restore("sr", registry, tmp_path / "in", "-o", out / "sub" / "deeper", "-r")
    assert blocked.exit_code == 1
    assert blocked.stderr.count("is a file, not a directory") == 4  # 2 errors, 2 summary lines
    assert (out / "sub").read_text() == "a file, not a directory"


def test_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: Path) -> None:
    """The disk fills up after the first output: later images fail with one line each, the first
    output is complete, an output of an earlier run is left as it was, and no partial file stays."""
    for name in "abc":
        write(tmp_path / "in" / f"{name}.png", noise(8, 8, seed=ord(name)))
    out = tmp_path / "out"
    earlier = write(out / "c.png", noise(4, 4, seed=99))
    earlier_bytes = earlier.read_bytes()
    real_save = Image.Image.save
    saves: list[int] = []

    def disk_fills_up(self: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        saves.append(1)
        if len(saves) == 1:
            real_save(self, fp, *args, **kwargs)
            return
        fp.write(b"\x89PNG\r\n\x1a\n partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", disk_fills_up)
    result = restore("sr", registry, tmp_path / "in", "-o", out, "--overwrite")
    assert result.exit_code == 1
    reason = "the disk is full (no space left on device)"
    assert_one_line_errors(result.stderr, {tmp_path / "in" / n: reason for n in ("b.png", "c.png")})
    assert decoded_size(out / "a.png") == (32, 32)
    assert earlier.read_bytes() == earlier_bytes
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]
    assert leftovers(out) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "said"),
    [
        (signal.SIGINT, "interrupted after "),
        (signal.SIGTERM, "terminated by SIGTERM after "),
        (signal.SIGHUP, "terminated by SIGHUP after "),
    ],
)
def test_ctrl_c_keeps_finished_outputs_and_a_rerun_completes(
    tmp_path: Path, registry: Path, signum: int, said: str
) -> None:
    """A real SIGINT, SIGTERM or SIGHUP to a batch once its first output appears: exit 128 + N,
    one line saying how far it got, finished outputs complete, no temporary file anywhere; the
    re-run (no --overwrite) skips those and restores the rest."""
    for i in range(4):
        write(tmp_path / "in" / f"{i}.png", noise(48, 48, seed=i))
    out = tmp_path / "out"
    args = ["sr", tmp_path / "in", "-o", out, "--tile", "16", "--registry", registry, "--model", "tiny-sr"]
    proc = subprocess.Popen(
        [str(RESSHIFT), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(tmp_path),
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "0.png").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (out / "0.png").exists() and proc.poll() is None, "no output appeared before the end"
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signum, stderr
    assert said in stderr and "finished outputs are kept" in stderr
    assert "Traceback" not in stderr
    assert leftovers(out) == []
    finished = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "0.png" in finished and len(finished) < 4
    for name in finished:
        assert decoded_size(out / name) == (192, 192)

    rerun = run_entry_point(tmp_path, *args, "--json")
    assert rerun.returncode == 0, rerun.stderr
    status = {Path(r["input"]).name: r["status"] for r in records(rerun.stdout)}
    assert status == {f"{i}.png": "skipped" if f"{i}.png" in finished else "done" for i in range(4)}
    for name, data in finished.items():
        assert (out / name).read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == [f"{i}.png" for i in range(4)]
    assert all(decoded_size(out / f"{i}.png") == (192, 192) for i in range(4))
    assert leftovers(out) == []


def test_outputs_inside_the_input_directory_are_not_inputs(
    tmp_path: Path,
    registry: Path,
) -> None:
    """-o inside a --recursive input directory: a re-run skips the done work and does not take the
    outputs for new inputs."""
    photos = tmp_path / "photos"
    write(photos / "a.png", noise(8, 8))
    first = restore("sr", registry, photos, "-o", photos / "x4", "-r")
    assert first.exit_code == 0, first.stderr
    again = restore("sr", registry, photos, "-o", photos / "x4", "-r", "--json")
    assert again.exit_code == 0, again.stderr
    assert [(Path(r["input"]).name, r["status"]) for r in records(again.stdout)] == [("a.png", "skipped")]
    assert sorted(str(p.relative_to(photos)) for p in photos.rglob("*")) == ["a.png", "x4", "x4/a.png"]


def test_ctrl_c_right_after_the_temp_file_is_created_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C at the earliest moment, as the temporary file comes into being: it is removed."""
    real_open = open

    def open_then_interrupted(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        real_open(file, mode, *args, **kwargs).close()
        raise KeyboardInterrupt

    monkeypatch.setattr(imagefiles, "open", open_then_interrupted, raising=False)
    with pytest.raises(KeyboardInterrupt):
        imagefiles.save_image(tmp_path / "out.png", np.zeros((4, 4, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_an_unexpected_error_fails_one_image_only(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    registry: Path,
) -> None:
    """A bug that raises for one image (here a RuntimeError from the model) fails that image with
    one line asking for a report; the batch goes on and no traceback is printed."""
    for name in "abc":
        write(tmp_path / "in" / f"{name}.png", noise(8, 8, seed=ord(name)))
    real = tasks.restore_prepared
    calls: list[int] = []

    def broken_for_b(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("something no test foresaw\nsecond line")
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks, "restore_prepared", broken_for_b)
    result = restore("sr", registry, tmp_path / "in", "-o", tmp_path / "out")
    assert result.exit_code == 1
    reason = "internal error (RuntimeError: something no test foresaw); please report it"
    assert_one_line_errors(result.stderr, {tmp_path / "in" / "b.png": reason})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]


# Weights -------------------------------------------------------------------------------------------


class _Touch:
    """Unpickling this creates a file: code a checkpoint must never get to run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _bad_checkpoint(kind: str, tmp_path: Path) -> tuple[list[object], str]:
    """Arguments that name a bad checkpoint of ``kind``, and what the error must say."""
    unet = reference_path("parity", "sr-tiny", "unet.safetensors")
    data = unet.read_bytes()
    target = tmp_path / f"{kind}.safetensors"
    if kind == "truncated":
        target.write_bytes(data[: len(data) // 2])
        return ["--checkpoint", target], "not a readable safetensors file"
    if kind == "corrupt-header":
        target.write_bytes(b"\xff" * 8 + data[8:])
        return ["--checkpoint", target], "not a readable safetensors file"
    if kind == "truncated-pth":
        pth = tmp_path / "cut.pth"
        torch.save(load_file(str(unet)), pth)
        pth.write_bytes(pth.read_bytes()[:300])
        return ["--checkpoint", pth], "not a readable PyTorch checkpoint"
    if kind == "zero-bytes":
        (tmp_path / "empty.pth").write_bytes(b"")
        return ["--checkpoint", tmp_path / "empty.pth"], "not a readable PyTorch checkpoint"
    if kind == "other-architecture":
        face = reference_path("parity", "face-tiny", "unet.safetensors")
        return [
            "--checkpoint",
            face,
        ], "checkpoint does not fit the UNet of 'tiny-sr' (3 missing: input_blocks.3.1.blocks.1.attn_mask, "
    if kind == "unet-as-autoencoder":
        return [
            "--autoencoder",
            unet,
        ], "checkpoint does not fit the autoencoder 'tiny-sr-vq' (153 missing: encoder.conv_in.weight, "
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "truncated",
        "corrupt-header",
        "truncated-pth",
        "zero-bytes",
        "other-architecture",
        "unet-as-autoencoder",
    ],
)
def test_bad_checkpoints_exit_3(tmp_path: Path, registry: Path, kind: str) -> None:
    """Each bad weights file stops the run before any image with exit 3 and one error line that
    names the file or the model (and the first mismatched keys)."""
    args, message = _bad_checkpoint(kind, tmp_path)
    src = write(tmp_path / "a.png", noise(8, 8))
    result = restore("sr", registry, src, "-o", tmp_path / "out", *args)
    assert result.exit_code == 3
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_pickle_with_code_is_refused_by_sr(tmp_path: Path, registry: Path) -> None:
    """``sr --checkpoint evil.pth`` whose payload would create a file: exit 3, the payload never
    runs, nothing is converted into the cache."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    weights = load_file(str(reference_path("parity", "sr-tiny", "unet.safetensors")))
    torch.save({"state_dict": weights, "payload": _Touch(marker)}, evil)
    src = write(tmp_path / "a.png", noise(8, 8))
    result = restore("sr", registry, src, "-o", tmp_path / "out.png", "--checkpoint", evil)
    assert result.exit_code == 3
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "refused: it holds" in errors[0] and "weights_only" in errors[0]
    assert not marker.exists() and not (tmp_path / "out.png").exists()
    converted = tmp_path / "hf-home" / "resshift" / "converted"
    assert not converted.exists() or not any(converted.iterdir())
    torch.load(evil, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


def test_sha256_mismatch_through_the_cli(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    registry: Path,
) -> None:
    """A cached download that no longer matches the registry's sha256: exit 3, one line, and the
    bad cache entry is deleted (so the next fetch downloads it again)."""
    unet = reference_path("parity", "sr-tiny", "unet.safetensors")
    url = "https://example.invalid/releases/tiny-unet.safetensors"
    entry = {k: v for k, v in registry_entries()["models"]["tiny-sr"].items() if k != "path"}
    entry.update(url=url, sha256=hashlib.sha256(unet.read_bytes()).hexdigest())
    own = tmp_path / "download.toml"
    own.write_text("\n".join(_table("models.dl-sr", entry)) + "\n")
    cached = hub._download_path(url)
    cached.parent.mkdir(parents=True)
    data = bytearray(unet.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))
    monkeypatch.setenv("RESSHIFT_REGISTRY", str(registry))
    src = write(tmp_path / "a.png", noise(8, 8))
    result = invoke("sr", src, "-o", tmp_path / "out.png", "--registry", own, "--model", "dl-sr")
    assert result.exit_code == 3
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert f"model 'dl-sr': {cached} has sha256" in errors[0] and "deleted the cached copy" in errors[0]
    assert not cached.exists() and not (tmp_path / "out.png").exists()


def test_download_restarts_when_the_part_file_cannot_be_continued(
    tmp_path: Path,
    server: HubServer,
    hf_home: Path,
) -> None:
    """A .part file longer than the file (416), a server that ignores Range, and a .part file whose
    bytes are wrong: the first two restart from zero and finish right; the third is refused by its
    sha256 and deleted, and the next fetch downloads the file afresh."""
    unet, _ = publish(server, tmp_path, hub=False)
    weights = registry_for(tmp_path, server.url, model=f'sha256 = "{sha256(unet)}"')
    final = hub._download_path(f"{server.url}/releases/unet.safetensors")
    part = final.with_name(final.name + ".part")
    final.parent.mkdir(parents=True)

    part.write_bytes(b"x" * (len(unet) + 10))
    assert fetch("tiny", weights, quiet=True)["tiny"] == final
    assert final.read_bytes() == unet and not part.exists()

    final.unlink()
    server.ignore_range.add("/releases/unet.safetensors")
    server.requests.clear()
    part.write_bytes(unet[:100])
    assert fetch("tiny", weights, quiet=True)["tiny"] == final
    assert final.read_bytes() == unet and not part.exists()
    assert [r.range for r in server.requests if r.path == "/releases/unet.safetensors"] == ["bytes=100-"]

    final.unlink()
    server.ignore_range.clear()
    part.write_bytes(b"\0" * 100)
    with pytest.raises(ChecksumError) as caught:
        fetch("tiny", weights, quiet=True)
    assert "\n" not in str(caught.value) and "deleted it" in str(caught.value)
    assert not part.exists() and not final.exists()
    assert fetch("tiny", weights, quiet=True)["tiny"] == final
    assert final.read_bytes() == unet


def test_ctrl_c_during_weights_fetch(monkeypatch: pytest.MonkeyPatch, registry: Path) -> None:
    """Ctrl-C during ``weights fetch``: exit 130 with one line, no traceback."""

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "fetch", interrupted)
    result = invoke("weights", "fetch", "tiny-sr", "--registry", registry)
    assert result.exit_code == 130
    assert result.stderr.splitlines() == ["interrupted; an unfinished download resumes on the next run"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[models.tiny-sr\nscale = 4\n", "invalid TOML"),
        ('[models.tiny-sr]\nscale = "four"\n', "models.tiny-sr.scale: expected an integer"),
        ("[models.tiny-sr.unet]\nmodel_channel = 4\n", "models.tiny-sr.unet: these parameters do not build"),
        ('[models.tiny-sr.diffusion]\nkappa = "x"\n', "models.tiny-sr.diffusion: these parameters do not"),
    ],
    ids=["syntax", "type", "unknown-unet-key", "bad-diffusion-value"],
)
def test_registry_errors_exit_3(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    registry: Path,
    text: str,
    message: str,
) -> None:
    """A user registry file with an error stops ``sr`` with exit 3 and one line naming the file,
    the entry and the key, also when the error is a network parameter only torch can check."""
    monkeypatch.setenv("RESSHIFT_REGISTRY", str(registry))
    bad = tmp_path / "mine.toml"
    bad.write_text(text)
    src = write(tmp_path / "a.png", noise(8, 8))
    result = invoke("sr", src, "-o", tmp_path / "out.png", "--registry", bad, "--model", "tiny-sr")
    assert result.exit_code == 3
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and str(bad) in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out.png").exists()


# Exit codes ---------------------------------------------------------------------------------------


def test_exit_codes_are_documented() -> None:
    """README and every restore command's --help give the same exit codes: 0, 1, 2, 3, 130."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Exit codes") :].split("\n## ", 1)[0]
    assert "## Reliability" in readme
    for command in ("sr", "inpaint", "face"):
        help_text = invoke(command, "--help").stdout
        codes = help_text[help_text.index("Exit codes:") :]
        for code in ("0", "1", "2", "3", "130"):
            assert re.search(rf"^ +{code} +\S", codes, re.MULTILINE), (command, code)
            assert f"`{code}`" in section, code


# Random and mutated input (hypothesis) ------------------------------------------------------------


def _shared_images(*folders: str) -> list[Path]:
    """The test images under ``folders`` of ../shared/testdata (none where it is missing: the tests
    drawing from them then skip, or fail where ../shared is required)."""
    return sorted(p for folder in folders for p in (TESTDATA / folder).rglob("*") if p.is_file())


@functools.cache
def _read(path: Path) -> bytes:
    return path.read_bytes()


def fix_png_crcs(data: bytearray) -> None:
    """Recompute the CRC of every whole PNG chunk, so that a mutation reaches the decoder instead of
    failing the checksum (other formats are left alone)."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return
    at = 8
    while at + 12 <= len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        end = at + 8 + length
        if end + 4 > len(data):
            return
        data[end : end + 4] = struct.pack(">I", zlib.crc32(data[at + 4 : end]))
        at = end + 4


MUTATIONS = ["intact", "flip-valid", "flip-header", "flip", "cut", "overwrite", "insert", "random"]
"""The first is the simplest, which hypothesis tries early: every run sees a complete image too."""


@st.composite
def mutated(draw: st.DrawFn, sources: tuple[Path, ...]) -> tuple[str, bytes]:
    """(file suffix, bytes): a real image as it is, with bytes flipped (anywhere, or in the header
    where sizes and modes are, or with PNG checksums made valid again), cut, overwritten or
    inserted, or plain random bytes."""
    if not sources:
        missing(TESTDATA)
    path = draw(st.sampled_from(sources))
    data = bytearray(_read(path))
    kind = draw(st.sampled_from(MUTATIONS))
    event(kind)
    if kind == "random":
        return path.suffix, draw(st.binary(max_size=2048))
    if kind == "cut":
        return path.suffix, bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind.startswith("flip"):
        top = min(len(data), 64) if kind == "flip-header" else len(data)
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, top - 1))] ^= draw(st.integers(1, 255))
        if kind == "flip-valid":
            fix_png_crcs(data)
    elif kind in ("overwrite", "insert"):
        at = draw(st.integers(0, len(data)))
        noise_bytes = draw(st.binary(min_size=1, max_size=64))
        data[at : at + (len(noise_bytes) if kind == "overwrite" else 0)] = noise_bytes
    return path.suffix, bytes(data)


LOADER_SOURCES = tuple(_shared_images("sr", "inpaint", "face"))
LOADER_LIMIT = 1 << 22  # keeps a mutated header that declares a big image from using much memory
CLI_SOURCES = tuple(_shared_images("sr/imagenet-val/lq"))  # 64x64: the tiny model takes ~0.1 s


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutated(LOADER_SOURCES))
def test_loader_on_random_and_mutated_bytes(case: tuple[str, bytes]) -> None:
    """The loader returns a well-formed image or raises ImageError with one line naming the file;
    nothing else ever escapes, not even a warning."""
    suffix, data = case
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        path = Path(tmp) / f"input{suffix}"
        path.write_bytes(data)
        try:
            image = load_image(path, max_pixels=LOADER_LIMIT)
        except ImageError as exc:
            event("ImageError")
            message = str(exc)
            assert "\n" not in message and str(path) in message
            return
        finally:
            assert escaped == [], [str(w.message) for w in escaped]
    height, width = image.rgb.shape[:2]
    assert image.rgb.shape == (height, width, 3) and image.rgb.dtype == np.float32
    assert 0 < height * width <= LOADER_LIMIT
    assert np.isfinite(image.rgb).all() and image.rgb.min() >= 0 and image.rgb.max() <= 1
    if image.alpha is not None:
        assert image.alpha.shape == (height, width) and 0 <= image.alpha.min() <= image.alpha.max() <= 1
    assert image.bit_depth in (8, 16)


@pytest.mark.slow
@settings(
    max_examples=12,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=mutated(CLI_SOURCES))
def test_cli_on_mutated_images(registry: Path, case: tuple[str, bytes]) -> None:
    """``resshift sr`` on a mutated image: exit 0 with a complete output of 4x the decoded size, or
    exit 1 with one error line and no output at all; never a traceback, never a temporary file."""
    suffix, data = case
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"input{suffix}"
        src.write_bytes(data)
        out = Path(tmp) / "out"
        result = restore("sr", registry, src, "-o", out, "--max-pixels", 16384, "--json")
        assert "Traceback" not in result.stdout + result.stderr
        event(f"exit {result.exit_code}")
        (record,) = records(result.stdout)
        if result.exit_code == 0:
            assert record["status"] == "done"
            width, height = record["size"]
            assert record["output_size"] == [4 * width, 4 * height]
            assert decoded_size(Path(record["output"])) == (4 * width, 4 * height)
            assert [p.name for p in out.iterdir()] == ["input.png"]
        else:
            assert result.exit_code == 1, result.stderr
            assert record["status"] == "failed"
            assert_one_line_errors(result.stderr, {src: record["error"]})
            assert not out.exists() or not any(out.iterdir())


# Paths, signals, sizes, numbers, order of checks (the second pass) --------------------------------

PATH_PARTS = ("in", "out", "new", "newer", "link", "..", ".")


@st.composite
def output_paths(draw: st.DrawFn) -> tuple[str, str]:
    """A relative ``-o`` through existing, missing and symlinked folders, with ``..`` anywhere,
    ending in a file or folder name; and a --suffix, some holding a separator or ``..``."""
    parts = draw(st.lists(st.sampled_from(PATH_PARTS), max_size=5))
    last = draw(st.sampled_from(["a.png", "b.png", "c.png", "a.jpg", "out", "in", ".."]))
    suffix = draw(st.sampled_from(["", "_x4", "/..", "/../../in/a", "..", "/", "x/y"]))
    return "/".join([*parts, last]), suffix


@pytest.mark.slow
@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=output_paths(), overwrite_inputs=st.booleans())
@example(case=("out/new/../a.png", ""), overwrite_inputs=False)
@example(case=("out/new/../b.png", ""), overwrite_inputs=False)
@example(case=("new/newer/../../in/a.png", ""), overwrite_inputs=False)
@example(case=("out/link/../in/c.png", ""), overwrite_inputs=False)
@example(case=("link/new/..", ""), overwrite_inputs=True)
@example(case=("out/new", "/../../b"), overwrite_inputs=True)
@example(case=("out/new", "/../../../in/c"), overwrite_inputs=True)
def test_no_output_path_replaces_an_input_or_an_existing_file(
    registry: Path, monkeypatch: pytest.MonkeyPatch, case: tuple[str, str], overwrite_inputs: bool
) -> None:
    """Whatever relative -o and --suffix (``..``, symlinks, folders that do not exist yet), a run
    without --overwrite never replaces an input or a file that exists, never writes outside its
    sandbox (the paths climb at most seven levels), leaves no temporary file, and fails with a
    usage error or a one-line error, never a traceback."""
    output, suffix = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp, *"1234567") / "work"
        inputs = root / "in"
        write(inputs / "a.png", noise(8, 8, seed=1))
        write(inputs / "c.png", noise(8, 8, seed=2))
        write(root / "out" / "b.png", noise(8, 8, seed=3))
        write(root / "out" / "a.png", noise(8, 8, seed=4))
        (root / "out" / "link").symlink_to(inputs, target_is_directory=True)
        (root / "link").symlink_to(root / "out", target_is_directory=True)
        before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}
        monkeypatch.chdir(root)
        given_inputs = [inputs] if overwrite_inputs else [inputs / "a.png"]
        result = restore("sr", registry, *given_inputs, "-o", output, "--suffix", suffix, "--json")
        assert "Traceback" not in result.stdout + result.stderr
        event(f"exit {result.exit_code}")
        assert result.exit_code in (0, 1, 2), result.stderr
        for path, data in before.items():
            assert path.read_bytes() == data, f"{path} was replaced by -o {output!r} --suffix {suffix!r}"
        written = {p for p in Path(tmp).rglob("*") if p.is_file() and not p.is_symlink()} - set(before)
        for path in written:
            assert path.is_relative_to(tmp) and not path.name.startswith("."), path


def test_suffix_with_a_separator_and_empty_output_are_usage_errors(tmp_path: Path, registry: Path) -> None:
    """A --suffix holding a path separator would write outside -o; -o "" would mean the current
    folder: both are usage errors naming the option, and nothing is written."""
    src = write(tmp_path / "in" / "a.png", noise(8, 8))
    for args in (["-o", tmp_path / "out", "--suffix", "/../x"], ["-o", ""]):
        result = restore("sr", registry, src, *args)
        assert result.exit_code == 2, result.stderr
        assert "--suffix" in result.stderr or "'-o'" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_the_same_input_given_three_times_is_restored_once(tmp_path: Path, registry: Path) -> None:
    src = write(tmp_path / "in" / "a.png", noise(8, 8))
    result = restore(
        "sr", registry, src, src, tmp_path / "in" / ".." / "in" / "a.png", "-o", tmp_path / "out", "--json"
    )
    assert result.exit_code == 0, result.stderr
    assert len(records(result.stdout)) == 1
    assert f"{src} was given 3 times; it is restored once" in result.stderr


def test_a_killed_runs_temporary_files_are_removed_by_the_next(tmp_path: Path, registry: Path) -> None:
    """After SIGKILL a hidden temporary file stays beside the outputs; the next run over the same
    outputs removes it (its process is gone), and leaves one of a live process alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".a.png.{dead.pid}-0123abcd.tmp"
    stale.write_bytes(b"")
    live = out / f".a.png.{os.getpid()}-0123abcd.tmp"
    live.write_bytes(b"")
    write(out / "b.png", noise(32, 32))  # exists, so its input is skipped
    stale_of_skipped = out / f".b.png.{dead.pid}-89abcdef.tmp"
    stale_of_skipped.write_bytes(b"")
    write(tmp_path / "in" / "a.png", noise(8, 8))
    write(tmp_path / "in" / "b.png", noise(8, 8))
    result = restore("sr", registry, tmp_path / "in", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert not stale.exists() and not stale_of_skipped.exists()
    assert live.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(["a.png", "b.png", live.name])


def test_interrupt_message_of_an_overwrite_run() -> None:
    """After Ctrl-C in an --overwrite run, a rerun as it was would redo everything: the message says
    how to do only the rest instead of promising that existing outputs are skipped."""
    from resshift_cli.batch import Interrupted

    plain = Interrupted(2, 5, signum=signal.SIGINT).message()
    again = Interrupted(2, 5, signum=signal.SIGTERM, overwrite=True).message()
    assert plain.startswith("interrupted after 2 of 5 images") and "existing outputs are skipped" in plain
    assert again.startswith("terminated by SIGTERM after 2 of 5 images")
    assert "skipped" not in again and "without --overwrite" in again


@pytest.mark.parametrize("seed", [2**64, -1, 10**30])
def test_seed_out_of_range_is_a_usage_error(tmp_path: Path, registry: Path, seed: int) -> None:
    src = write(tmp_path / "a.png", noise(8, 8))
    result = restore("sr", registry, src, "-o", tmp_path / "out.png", "--seed", seed)
    assert result.exit_code == 2 and "--seed" in result.stderr
    assert not (tmp_path / "out.png").exists()


def test_largest_seed_works_with_tiles(tmp_path: Path, registry: Path) -> None:
    """Per-tile seeds (seed + tile index) wrap around at 2**64 instead of overflowing."""
    src = write(tmp_path / "a.png", noise(40, 40))
    result = restore("sr", registry, src, "-o", tmp_path / "out.png", "--seed", 2**64 - 1, "--tile", 16)
    assert result.exit_code == 0, result.stderr


SIDES = st.integers(min_value=1, max_value=8)


@st.composite
def small_runs(draw: st.DrawFn) -> tuple[str, tuple[int, int], list[str]]:
    """A task, an image of 1 to 8 pixels a side, and any mix of the restore options."""
    task = draw(st.sampled_from(["sr", "inpaint", "face"]))
    options: list[str] = []
    if task == "sr" and draw(st.booleans()):
        options.append("--tta")
    if draw(st.booleans()):
        options += ["--tile", str(draw(st.integers(1, 40)))]
    if draw(st.booleans()):
        options += ["--tile-overlap", str(draw(st.integers(0, 64)))]
    if draw(st.booleans()):
        options += ["--batch-size", str(draw(st.integers(1, 4)))]
    if draw(st.booleans()):
        options += ["--seed", str(draw(st.sampled_from([0, 1, 2**63, 2**64 - 1])))]
    options += ["--ext", draw(st.sampled_from(["auto", "png", "jpg", "webp"]))]
    return task, (draw(SIDES), draw(SIDES)), options


@pytest.mark.slow
@settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=small_runs())
def test_every_option_on_images_of_one_to_eight_pixels(
    registry: Path, case: tuple[str, tuple[int, int], list[str]]
) -> None:
    """Every task with any mix of options on an image whose sides are 1 to 8 pixels restores it
    (exit 0, an output of the model's size) or, for a bad mix, gives a usage error; never a
    traceback or an internal error."""
    task, (width, height), options = case
    event(task)
    with tempfile.TemporaryDirectory() as tmp:
        src = write(Path(tmp) / "in.png", noise(height, width, seed=width * 8 + height))
        args: list[object] = [src, "-o", Path(tmp) / "out", *options, "--json"]
        if task == "inpaint":
            hole = np.zeros((height, width), np.uint8)
            hole[: max(1, height // 2)] = 255
            args += ["--mask", write(Path(tmp) / "mask.png", hole)]
        result = restore(task, registry, *args)
        assert "Traceback" not in result.stdout + result.stderr
        assert result.exit_code in (0, 2), result.stderr
        if result.exit_code == 0:
            (record,) = records(result.stdout)
            scale = 4 if task == "sr" else 1
            assert record["output_size"] == [scale * width, scale * height]
            assert decoded_size(Path(record["output"])) == (scale * width, scale * height)


def test_inputs_are_checked_before_the_weights(tmp_path: Path) -> None:
    """Offline with no cached weights, a wrong-size mask, an unreadable mask and an empty face are
    reported as what they are (exit 1), not as missing weights (exit 3): inputs are checked first."""
    image = write(tmp_path / "a.png", noise(16, 16))
    small_mask = write(tmp_path / "small.png", noise(8, 8, channels=1))
    broken_mask = tmp_path / "broken.png"
    broken_mask.write_bytes(b"not a mask")
    empty_face = tmp_path / "face.png"
    empty_face.write_bytes(b"")
    cases = [
        (["inpaint", image, "--mask", small_mask], "mask is 8x8 but the image is 16x16"),
        (["inpaint", image, "--mask", broken_mask], f"cannot read {broken_mask}"),
        (["face", empty_face], "the file is empty (0 bytes)"),
    ]
    for args, reason in cases:
        result = invoke(*args, "-o", tmp_path / "out.png")
        assert result.exit_code == 1, result.stderr
        assert reason in result.stderr
        assert "cache" not in result.stderr and "loading" not in result.stderr
    assert not (tmp_path / "out.png").exists()


def test_a_newline_in_a_file_name_stays_on_one_line(tmp_path: Path, registry: Path) -> None:
    bad = tmp_path / "in" / "two\nlines.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not an image")
    result = restore("sr", registry, tmp_path / "in", "-o", tmp_path / "out")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'in' / 'two'}\\nlines.png: {errors[0].split('png: ', 1)[1]}"]
    assert "two\nlines" not in result.stderr
