"""Running the command line in tests: in this process or as the installed script, on the tiny
random-weight models of :mod:`tinymodels`, and the images and records the tests make and read."""

from __future__ import annotations

import functools
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from click.testing import CliRunner, Result
from PIL import Image
from tinymodels import tiny_restorer

from resshift_cli import Restorer
from resshift_cli.cli import main

RESSHIFT = Path(sys.executable).parent / "resshift"
TINY = {"sr": "tiny-sr", "inpaint": "tiny-inpaint", "face": "tiny-face"}
RECORD_KEYS = {"input", "output", "status", "seconds", "size", "output_size", "error", "notices"}


def invoke(*args: object) -> Result:
    """Run ``resshift ARGS...`` in this process."""
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="resshift", catch_exceptions=False)


def restore(task: str, registry: Path, *args: object) -> Result:
    """``resshift TASK ARGS... --registry REGISTRY --model tiny-TASK``."""
    return invoke(task, *args, "--registry", registry, "--model", TINY[task])


def subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of this test (empty HF cache, offline) for a subprocess, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("RESSHIFT_REGISTRY", "HF_HUB_CACHE")}
    env.update(
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        NO_COLOR="1",
        COLUMNS="200",
    )
    env.update(extra)
    return env


def run_entry_point(
    tmp_path: Path, *args: object, timeout: float = 120, **extra: str
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``resshift`` entry point (``extra``: environment variables)."""
    return subprocess.run(
        [str(RESSHIFT), *map(str, args)],
        capture_output=True,
        text=True,
        env=subprocess_env(tmp_path, **extra),
        timeout=timeout,
        check=False,
    )


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Random 8-bit pixels, H x W x C (H x W for one channel)."""
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write(path: Path, pixels: np.ndarray, **params: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **params)
    return path


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def records(stdout: str) -> list[dict[str, Any]]:
    """The --json records: every stdout line must be one JSON object."""
    return [json.loads(line) for line in stdout.splitlines()]


def png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit RGB PNG (Pillow cannot write one), unfiltered."""
    height, width, _ = pixels.shape
    rows = pixels.astype(">u2").view(np.uint8).reshape(height, -1)
    data = zlib.compress(np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes())

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )
    return path


def png_header(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR."""
    width, height, depth, colour = struct.unpack(">IIBB", path.read_bytes()[16:26])
    return width, height, depth, colour


@functools.cache
def _tiny(case_name: str) -> Restorer:
    return tiny_restorer(case_name)


def sample(
    case_name: str, pixels: np.ndarray, seed: int = 12345, hole: np.ndarray | None = None
) -> np.ndarray:
    """The in-process sample for 8-bit RGB ``pixels`` on the 0..255 scale, not rounded (float64).

    For inpainting, the hole (H x W bool) is blacked out in the input and given to the network as
    the mask (+1 = hole, -1 = keep).
    """
    lq = torch.from_numpy(pixels.astype(np.float32) / np.float32(255)).permute(2, 0, 1)[None]
    kwargs: dict[str, Any] = {}
    if hole is not None:
        holes = torch.from_numpy(hole.astype(np.float32))[None, None]
        lq = lq * (1 - holes)
        kwargs["mask"] = holes * 2 - 1
    out = _tiny(case_name).sample(lq * 2 - 1, generator=torch.Generator().manual_seed(seed), **kwargs)
    unit = (out.clamp(-1, 1) + 1) / 2
    return (unit * 255)[0].permute(1, 2, 0).double().numpy()


def assert_rounds_to(actual: np.ndarray, expected: np.ndarray, margin: float = 0.005) -> None:
    """``actual`` (8-bit) is ``expected`` (float, 0..255) rounded, except that a value within
    ``margin`` of a rounding boundary (k + 0.5) may go either way.

    The CLI's restorer keeps the models in the channels_last layout, whose convolution kernels sum
    in another order than the contiguous models here: the results differ by up to 7.5e-6 (0.002
    on this scale), enough to flip a value that close to a boundary (about 1 sample in 10000),
    never more. With the restorer's ``optimize=False`` the two agree to float rounding.
    """
    assert actual.shape == expected.shape
    ambiguous = np.abs(expected - np.floor(expected) - 0.5) < margin
    exact = np.rint(expected)
    assert (actual[~ambiguous] == exact[~ambiguous]).all(), np.argwhere((actual != exact) & ~ambiguous)[:5]
    either = (actual == np.floor(expected)) | (actual == np.ceil(expected))
    assert either[ambiguous].all()
