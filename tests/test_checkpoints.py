"""Checkpoints load safely (no arbitrary unpickling), unwrapped, strictly, with actionable errors."""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from resshift_cli.checkpoints import (
    SEAL_KEY,
    CheckpointError,
    compact_state_dict,
    load_into,
    read_state_dict,
    save_safetensors,
)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Conv2d(4, 2, 1))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"_orig_mod.module.{k}": v for k, v in sd.items()}},
    ],
    ids=["plain", "state_dict", "module", "orig_mod+module"],
)
@pytest.mark.parametrize("suffix", [".pth", ".ckpt", ".pt"])
def test_wrapped_pickles_load_strictly(tmp_path: Path, wrap, suffix: str) -> None:
    source = _model()
    path = tmp_path / f"w{suffix}"
    torch.save(wrap(source.state_dict()), path)
    target = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Conv2d(4, 2, 1))
    load_into(target, read_state_dict(path), "test model")
    for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_safetensors_roundtrip(tmp_path: Path) -> None:
    source = _model()
    path = tmp_path / "w.safetensors"
    save_safetensors(source.state_dict(), path)
    loaded = read_state_dict(path)
    assert loaded.keys() == source.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_loading_in_a_layout_takes_the_file_tensors_cast_and_laid_out(tmp_path: Path) -> None:
    source = _model()
    half = {k: v.half() for k, v in source.state_dict().items()}
    save_file(half, str(tmp_path / "m.safetensors"))
    target = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Conv2d(4, 2, 1))
    load_into(target, read_state_dict(tmp_path / "m.safetensors"), memory_format=torch.channels_last)
    for key, value in target.state_dict().items():
        assert value.dtype == torch.float32, key  # the model's dtype, not the file's
        assert torch.equal(value, half[key].float()), key
    assert target[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not target[0].weight.is_contiguous()
    assert isinstance(target[0].weight, torch.nn.Parameter) and target[0].weight.requires_grad
    x = torch.randn(1, 3, 8, 8)
    reference = _model()
    reference.load_state_dict({k: v.float() for k, v in half.items()})
    assert torch.allclose(target(x), reference(x), atol=1e-6)


def test_saved_files_get_the_usual_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        save_safetensors(_model().state_dict(), tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644


class _Payload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pickle_with_code_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with path.open("wb") as fh:
        pickle.dump({"state_dict": {"w": _Payload(str(marker))}}, fh)
    # The payload is live: plain unpickling would create the marker file.
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(path)
    assert not marker.exists()


def test_mismatch_names_model_and_keys(tmp_path: Path) -> None:
    sd = _model().state_dict()
    sd.pop("0.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["2.weight"] = torch.zeros(2, 4, 3, 3)
    with pytest.raises(CheckpointError) as info:
        load_into(_model(), sd, "unet of 'realsr-v3'")
    message = str(info.value)
    assert "unet of 'realsr-v3'" in message
    assert "1 missing: 0.bias" in message
    assert "1 unexpected: extra.weight" in message
    assert "1 wrongly shaped: 2.weight (checkpoint (2, 4, 3, 3), model (2, 4, 1, 1))" in message
    assert "\n" not in message


def test_many_missing_keys_are_counted_not_listed() -> None:
    big = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(10)])
    expected = r"20 missing: 0\.weight, 0\.bias, 1\.weight, 1\.bias, 2\.weight, \.\.\. \(15 more\)"
    with pytest.raises(CheckpointError, match=expected):
        load_into(big, {}, "big")


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.pth", None, "not found"),
        ("empty.pth", b"", "not a readable PyTorch checkpoint"),
        ("junk.safetensors", b"\x00" * 40, "not a readable safetensors"),
        ("weights.onnx", b"x", "unknown checkpoint type"),
    ],
)
def test_bad_files(tmp_path: Path, name: str, content: bytes | None, match: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        read_state_dict(path)


def test_truncated_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in _model().state_dict().items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        read_state_dict(path)
    pth = tmp_path / "w.pth"
    torch.save(_model().state_dict(), pth)
    pth.write_bytes(pth.read_bytes()[:200])
    with pytest.raises(CheckpointError):
        read_state_dict(pth)


def test_compact_state_dict_narrows_for_storage_and_loads_back(tmp_path: Path) -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3)
            self.register_buffer("small", torch.arange(-5, 300))  # int64 in the model
            self.register_buffer("medium", torch.tensor([-40000, 70000]))
            self.register_buffer("large", torch.tensor([2**40]))
            self.register_buffer("flags", torch.tensor([True, False]))

    net = Net()
    stored = compact_state_dict(net.state_dict(), torch.float16)
    dtypes = {k: v.dtype for k, v in stored.items()}
    assert dtypes == {
        "conv.weight": torch.float16,
        "conv.bias": torch.float16,
        "small": torch.int16,
        "medium": torch.int32,
        "large": torch.int64,
        "flags": torch.bool,
    }
    save_safetensors(stored, tmp_path / "w.safetensors")
    fresh = Net()
    load_into(fresh, read_state_dict(tmp_path / "w.safetensors"))
    for key, value in net.state_dict().items():
        loaded = fresh.state_dict()[key]
        assert loaded.dtype == value.dtype, key
        expected = value.half().to(value.dtype) if value.is_floating_point() else value
        assert torch.equal(loaded, expected), key


# Corrupt files are refused when read ---------------------------------------------------------------


def _flip(path: Path, start: int, masks: bytes) -> None:
    """XOR the bytes from ``start`` with ``masks`` (all non-zero): every byte in the range changes."""
    data = bytearray(path.read_bytes())
    for i, mask in enumerate(masks[: len(data) - start]):
        data[start + i] ^= mask
    path.write_bytes(bytes(data))


def test_saved_files_are_sealed_with_their_own_sha256(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    digest = save_safetensors(_model().state_dict(), path)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {SEAL_KEY: f"resshift-sha256:{digest}"}
    data = path.read_bytes()
    assert hashlib.sha256(data.replace(digest.encode(), b"0" * 64)).hexdigest() == digest


@settings(max_examples=300, deadline=None, database=None)
@given(start=st.integers(0, 10**6), masks=st.lists(st.integers(1, 255), min_size=1, max_size=64).map(bytes))
def test_any_change_to_a_sealed_file_is_refused(start: int, masks: bytes) -> None:
    """Changing any byte range of a file :func:`save_safetensors` wrote (header, seal, tensor data)
    makes reading it fail with one CheckpointError line."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        save_safetensors(_model().state_dict(), path)
        _flip(path, start % path.stat().st_size, masks)
        with pytest.raises(CheckpointError) as exc:
            read_state_dict(path)
        assert "\n" not in str(exc.value) and str(path) in str(exc.value)


def test_every_single_byte_of_a_sealed_file_is_covered(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_safetensors(_model().state_dict(), path)
    data = path.read_bytes()
    for at in range(len(data)):
        path.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :])
        with pytest.raises(CheckpointError):
            read_state_dict(path)


def test_a_torch_zip_checkpoint_with_changed_tensor_bytes_is_refused(tmp_path: Path) -> None:
    """torch's zip reader does not check the CRC-32 of its records; reading does."""
    path = tmp_path / "w.pth"
    weight = torch.full((64,), 0.5)
    torch.save({"w": weight}, path)
    data = path.read_bytes()
    at = data.index(weight.numpy().tobytes())
    path.write_bytes(data[:at] + b"\x00\x00\x80\x3e" + data[at + 4 :])  # 0.5 -> 0.25: finite, plausible
    with pytest.raises(CheckpointError, match=r"corrupt: zip record .*data/0 fails its CRC-32 check$"):
        read_state_dict(path)


def test_a_zip_record_marked_as_a_folder_is_refused(tmp_path: Path) -> None:
    """torch reads such a record as nothing (zeros), while the CRC of its bytes still checks out."""
    path = tmp_path / "w.pth"
    torch.save({"w": torch.arange(10)}, path)
    data = bytearray(path.read_bytes())
    entry = data.rindex(b"PK\x01\x02", 0, data.rindex(b"data/0") + 1)  # its central directory record
    data[entry + 38] |= 0x10  # external attributes: MS-DOS directory
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"zip record .*data/0 is marked as a folder"):
        read_state_dict(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_non_finite_weights_are_refused(tmp_path: Path, value: float, suffix: str) -> None:
    sd = _model().state_dict()
    sd["2.weight"][0, 1] = value
    path = tmp_path / f"w{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r": 2\.weight holds NaN or infinite values, which no usable"):
        read_state_dict(path)


class _Windowed(torch.nn.Module):
    """A module with a buffer computed from its hyper-parameters, as Swin's window indices are."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(9, 2))
        self.register_buffer("index", torch.arange(9).flip(0))

    def forward(self) -> torch.Tensor:
        return self.table[self.index]


def test_buffers_must_equal_the_models_own() -> None:
    sd = _Windowed().state_dict()
    target = _Windowed()
    load_into(target, sd, "windowed")  # the same values: fine
    sd["index"] = sd["index"].clone()
    sd["index"][3] = 10**12  # what a flipped byte in an int64 index does: out of range later
    with pytest.raises(CheckpointError) as exc:
        load_into(_Windowed(), sd, "windowed")
    assert str(exc.value) == (
        "corrupt checkpoint for windowed: buffer index differs from the value the model computes"
    )


def test_an_integer_tensor_for_a_float_one_is_refused() -> None:
    """A dtype changed in a safetensors header (F32 -> I32, the same size) would otherwise be cast."""
    sd = _model().state_dict()
    sd["0.bias"] = sd["0.bias"].view(torch.int32)
    expected = r"1 wrongly typed: 0\.bias \(checkpoint int32, model float32\)"
    with pytest.raises(CheckpointError, match=expected):
        load_into(_model(), sd, "model")


class _Global:
    pass


def _numpy_checkpoint(path: Path) -> None:
    import numpy as np

    torch.save({"w": np.zeros(3)}, path)


def _global_checkpoint(path: Path) -> None:
    torch.save({"w": torch.zeros(3), "x": _Global()}, path)


def _plain_pickle(path: Path) -> None:
    with path.open("wb") as f:
        pickle.dump({"w": 1}, f, protocol=4)


def _garbage(path: Path) -> None:
    path.write_bytes(b"hello world")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_numpy_checkpoint, "refused: it holds numpy"),
        (_global_checkpoint, "refused: it holds test_checkpoints._Global, which is not a tensor"),
        (_plain_pickle, "refused: not a file of tensors"),
        (_garbage, "not a readable PyTorch checkpoint (KeyError: "),
    ],
    ids=["numpy", "global", "plain-pickle", "garbage"],
)
def test_pickle_refusals_are_one_clean_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], make, reason: str
) -> None:
    """No torch warnings, no terminal escapes, and never torch's advice to load with
    weights_only=False."""
    path = tmp_path / "w.pth"
    make(path)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError) as exc:
            read_state_dict(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: {reason}")
    assert "\n" not in message and "\x1b" not in message
    assert "weights_only=False" not in message and "succeed" not in message and "trust" not in message
    assert shown == [] and capfd.readouterr() == ("", "")
