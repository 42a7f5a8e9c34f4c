"""Promises about weights files, through the real CLI on the tiny random-weight models.

A corrupt checkpoint stops a run with one line and exit 3, before any input is tried. That can be
promised for the checkpoints whose every byte is covered by a known digest:

- a registry entry with a ``sha256`` (the bundled ``lite`` is one; so is any file a user pins);
- a safetensors file this project wrote (conversions of upstream pickles, trained weights, exports):
  :func:`resshift_cli.checkpoints.save_safetensors` seals it with the sha256 of its own bytes.

It cannot be promised for a foreign file with no known digest: a safetensors file from elsewhere
is checked for its structure, keys, shapes, buffers and finite values, but a weight changed to
another finite number is a weight like any other (resshift_cli.checkpoints says what is checked
for each kind of file).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from reference import reference_path
from tinymodels import write_registry

from resshift_cli.checkpoints import read_state_dict, save_safetensors
from resshift_cli.cli import main
from resshift_cli.registry import load_registry

pytestmark = pytest.mark.shared  # needs ../shared

RESSHIFT = Path(sys.executable).parent / "resshift"
ORIGINAL_FILES = {"unet": "unet.safetensors", "autoencoder": "autoencoder.safetensors"}


def original(role: str) -> Path:
    """tiny-sr's own weights file for ``role`` ("unet" or "autoencoder")."""
    return reference_path("parity", "sr-tiny", ORIGINAL_FILES[role])


ENTRIES = {"unet": "models.tiny-sr", "autoencoder": "autoencoders.tiny-sr-vq"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The registry of the tiny models (tiny-sr, tiny-inpaint, tiny-face and their autoencoders)."""
    return write_registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """tiny-sr's two files as this project writes safetensors: the same tensors, sealed."""
    folder = tmp_path_factory.mktemp("sealed")
    out = {}
    for role in ORIGINAL_FILES:
        save_safetensors(read_state_dict(original(role)), folder / f"{role}.safetensors")
        out[role] = (folder / f"{role}.safetensors").read_bytes()
    return out


def invoke(*args: object, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(
        main, [str(a) for a in args], prog_name="resshift", env=env, catch_exceptions=False
    )


def write_image(path: Path, size: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def sr_with(folder: Path, tiny: Path, files: dict[str, bytes], pinned: bool) -> Result:
    """``resshift sr -q`` with tiny-sr's weights taken from ``files`` (written into ``folder``),
    pinned by their intact sha256 in a registry file when ``pinned``."""
    lines = []
    for role, data in files.items():
        path = folder / f"{role}.safetensors"
        path.write_bytes(data)
        lines.append(f"[{ENTRIES[role]}]\npath = {json.dumps(str(path))}")
        if pinned:
            lines.append(f'sha256 = "{hashlib.sha256(original(role).read_bytes()).hexdigest()}"')
    override = folder / "override.toml"
    override.write_text("\n".join(lines) + "\n")
    image = write_image(folder / "in.png", 16, seed=0)
    os.environ["RESSHIFT_REGISTRY"] = str(tiny)  # under the override: tiny-sr and its parameters
    try:
        return invoke(
            "sr", image, "-o", folder / "out.png", "-q", "--registry", override, "--model", "tiny-sr"
        )
    finally:
        del os.environ["RESSHIFT_REGISTRY"]


def corrupt(data: bytes, region: str, start: int, masks: bytes) -> bytes:
    """XOR a range of ``data`` with ``masks`` (all non-zero, so every byte in it changes), starting
    in the safetensors header, anywhere, or within the last 64 bytes."""
    header = 8 + int.from_bytes(data[:8], "little")
    at = {"header": start % header, "anywhere": start % len(data), "end": len(data) - 1 - start % 64}[region]
    out = bytearray(data)
    for i, mask in enumerate(masks[: len(data) - at]):
        out[at + i] ^= mask
    return bytes(out)


@pytest.mark.parametrize("pinned", [True, False], ids=["registry-sha256", "sealed"])
def test_intact_checkpoints_restore(
    tmp_path: Path, tiny: Path, sealed: dict[str, bytes], pinned: bool
) -> None:
    """The baseline of the property below: the same files unchanged restore the image."""
    files = {role: original(role).read_bytes() for role in ORIGINAL_FILES} if pinned else sealed
    result = sr_with(tmp_path, tiny, files, pinned)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out.png").is_file()


@pytest.mark.slow
@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    pinned=st.booleans(),
    role=st.sampled_from(sorted(ORIGINAL_FILES)),
    region=st.sampled_from(["header", "anywhere", "end"]),
    start=st.integers(0, 2**32),
    masks=st.lists(st.integers(1, 255), min_size=1, max_size=64).map(bytes),
)
def test_any_corrupt_byte_range_stops_the_run_with_one_line_and_exit_3(
    tiny: Path, sealed: dict[str, bytes], pinned: bool, role: str, region: str, start: int, masks: bytes
) -> None:
    """Changing any byte range of the UNet's or the autoencoder's file, pinned by the registry's
    sha256 or sealed by this project, gives exit 3, one ``error:`` line naming the file, and no
    output."""
    event("registry sha256" if pinned else "sealed")
    event(f"{role} {region}")
    files = {r: original(r).read_bytes() for r in ORIGINAL_FILES} if pinned else dict(sealed)
    files[role] = corrupt(files[role], region, start, masks)
    with tempfile.TemporaryDirectory() as tmp:
        result = sr_with(Path(tmp), tiny, files, pinned)
        assert result.exit_code == 3, result.stderr
        assert result.stdout == "" and "Traceback" not in result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith("error: ") and f"{role}.safetensors" in line
        assert not (Path(tmp) / "out.png").exists()


def test_corrupt_checkpoint_through_the_entry_point(
    tmp_path: Path, tiny: Path, sealed: dict[str, bytes]
) -> None:
    """As a shell sees it: exit status 3 and one line on stderr, for a sealed UNet with one flipped
    bit in the middle of its tensor data (where it used to load and fail every input later)."""
    unet = bytearray(sealed["unet"])
    unet[len(unet) // 2] ^= 0x01
    (tmp_path / "unet.safetensors").write_bytes(bytes(unet))
    image = write_image(tmp_path / "in.png", 16, seed=0)
    env = {k: v for k, v in os.environ.items() if k != "RESSHIFT_REGISTRY"}
    env.update(OMP_NUM_THREADS="1", NO_COLOR="1")
    done = subprocess.run(
        [
            *(str(RESSHIFT), "sr", str(image), "-o", str(tmp_path / "out.png"), "--registry", str(tiny)),
            *("--model", "tiny-sr", "--checkpoint", str(tmp_path / "unet.safetensors")),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 3, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("loading ")]
    assert errors == [
        f"error: {tmp_path / 'unet.safetensors'}: corrupt: its bytes do not match the sha256 sealed "
        "into it when it was written"
    ]
    assert not (tmp_path / "out.png").exists()


def test_a_wrong_digest_for_the_bundled_model_is_noticed(tmp_path: Path) -> None:
    """lite's weights are a local ``path`` with a ``sha256``: a digest that does not match stops
    the run (exit 3) and leaves the bundled file alone."""
    lite = load_registry(env={}).model("lite").source
    assert lite.path is not None and lite.sha256 is not None
    actual = hashlib.sha256(lite.path.read_bytes()).hexdigest()
    assert actual == lite.sha256
    wrong = "0" * 64
    override = tmp_path / "wrong.toml"
    override.write_text(f'[models.lite]\nsha256 = "{wrong}"\n')
    image = write_image(tmp_path / "in.png", 16, seed=1)
    result = invoke("sr", image, "-o", tmp_path / "out.png", "-q", "--model", "lite", "--registry", override)
    assert result.exit_code == 3
    assert result.stderr.splitlines() == [
        f"error: model 'lite': {lite.path} has sha256 {actual}, expected {wrong}; refusing to use it"
    ]
    assert lite.path.is_file() and not (tmp_path / "out.png").exists()


def test_face_file_and_batch_folder_together_restore_both(tmp_path: Path, tiny: Path) -> None:
    """``resshift face FILE --batch DIR``: the file is restored as well as the folder's faces."""
    single = write_image(tmp_path / "single" / "alone.png", 64, seed=2)
    write_image(tmp_path / "faces" / "a.png", 64, seed=3)
    write_image(tmp_path / "faces" / "b.png", 64, seed=4)
    out = tmp_path / "out"
    result = invoke(
        "face",
        single,
        "--batch",
        tmp_path / "faces",
        "-o",
        out,
        "--json",
        "--registry",
        tiny,
        "--model",
        "tiny-face",
    )
    assert result.exit_code == 0, result.stderr
    done = {
        Path(json.loads(line)["input"]).name: json.loads(line)["status"]
        for line in result.stdout.splitlines()
    }
    assert done == {"alone.png": "done", "a.png": "done", "b.png": "done"}
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "alone.png", "b.png"]
