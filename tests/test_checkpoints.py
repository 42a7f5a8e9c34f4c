"""Checkpoints load safely (no arbitrary unpickling), unwrapped, strictly, with actionable errors."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from resshift_cli.checkpoints import (
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
        ("empty.pth", b"", "refused or unreadable"),
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
    for buffer in ("small", "medium", "large"):
        getattr(fresh, buffer).zero_()
    load_into(fresh, read_state_dict(tmp_path / "w.safetensors"))
    for key, value in net.state_dict().items():
        loaded = fresh.state_dict()[key]
        assert loaded.dtype == value.dtype, key
        expected = value.half().to(value.dtype) if value.is_floating_point() else value
        assert torch.equal(loaded, expected), key
