"""Reading and loading checkpoints safely.

Checkpoints are untrusted input: pickle files go only through ``torch.load(weights_only=True)``,
which refuses arbitrary objects, and safetensors files are memory-mapped. Upstream checkpoints
come in several wrappings (a ``state_dict`` entry, ``module.`` from DataParallel, ``_orig_mod.``
from torch.compile); all are unwrapped here so that loading itself can be strict.

A corrupt file is refused when it is read, not when the model first runs. What can be told at
load time depends on the file:

- a safetensors file this project wrote (:func:`save_safetensors`: conversions, trained weights,
  exports) carries a sha256 of itself in its metadata, its *seal*: a change to any byte is refused;
- a torch zip checkpoint (``torch.save``'s format since torch 1.6) has a CRC-32 per record: a
  change to the tensors' bytes is refused (a change to the zip's directory records may go unseen);
- any file: its structure (safetensors header and offsets, zip records), its keys, shapes and
  kinds of dtype, its buffers (:func:`load_into`) and that its floating-point values are finite.

A changed floating-point value that is still finite, in a file with neither seal nor CRC (a foreign
safetensors file, a legacy pickle), cannot be told from a real weight; only a known sha256 (the
registry's, the hub's) proves such a file, and resshift_cli.hub checks those.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from resshift_cli.atomic import write_atomically
from resshift_cli.errors import ModelError, first_line

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
_PREFIXES = ("module.", "_orig_mod.")
_WRAPPERS = ("state_dict", "params_ema", "model")

SEAL_KEY = "resshift.seal"
"""The safetensors metadata key of the seal: ``"resshift-sha256:<sha256>"``, the digest of the whole
file with those 64 hex digits read as zeros. The key and the value each name it, so a change to one
of the two still leaves the other to find it by."""
_SEAL_PREFIX = "resshift-sha256:"
_SEAL_VALUE = re.compile(r"resshift-sha256:([0-9a-f]{64})")
_UNSEALED = "0" * 64
_MAX_HEADER = 100_000_000  # safetensors' own limit
_CHUNK = 1 << 20
_DIRECTORY_ATTRIBUTE = 0x10  # MS-DOS attribute: torch's zip reader then yields no bytes for the record


class CheckpointError(ModelError):
    """A checkpoint could not be read or does not fit the model it was loaded into."""


def read_state_dict(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict, wrappers and prefixes removed.

    ``.safetensors`` files are memory-mapped; ``.pth/.pt/.ckpt/.bin`` files are unpickled with
    ``weights_only=True`` only, so a file that carries code is refused, never run. A corrupt file
    (see the module's docstring for what can be told) raises CheckpointError with one line; the
    checks that read the whole file are remembered per file (``hub.file_fact``), so they cost
    nothing on later runs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        _check_seal(path)
        try:
            raw: object = load_file(str(path), device=str(device))
        except Exception as exc:  # safetensors raises several types for bad files
            raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(exc)})") from exc
    elif suffix in PICKLE_SUFFIXES:
        raw = _read_pickle(path, device)
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint type {suffix or '(no suffix)'!r}; "
            f"expected one of {', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
        )
    state_dict = unwrap_state_dict(raw, source=str(path))
    _check_finite(path, state_dict)
    return state_dict


def _read_pickle(path: Path, device: str | torch.device) -> object:
    """``torch.load(weights_only=True)`` after the zip's CRCs; torch's warnings are not shown, and a
    refusal is one line that names what was refused (never torch's advice to unpickle anyway)."""
    if zipfile.is_zipfile(path):
        _check_zip(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location=device, weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f"it holds {found.group(1)}, which is not a tensor" if found else "not a file of tensors"
        raise CheckpointError(
            f"{path}: refused: {what}; checkpoints are read with weights_only=True, so nothing in it ran"
        ) from None
    except Exception as exc:  # a corrupt or foreign file: torch raises many types
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_describe(exc)})") from None


def _check_zip(path: Path) -> None:
    """Refuse a torch zip checkpoint whose records fail their CRC-32 or that torch would read
    differently from the zip's own rules."""
    try:
        with zipfile.ZipFile(path) as archive:
            folders = [i.filename for i in archive.infolist() if i.external_attr & _DIRECTORY_ATTRIBUTE]
            bad = archive.testzip()
    except Exception as exc:  # BadZipFile, zlib.error, EOFError, ... for a damaged archive
        raise CheckpointError(f"{path}: corrupt: not a readable zip archive ({_describe(exc)})") from None
    if folders:
        raise CheckpointError(f"{path}: corrupt: zip record {folders[0]} is marked as a folder")
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt: zip record {bad} fails its CRC-32 check")


def _check_seal(path: Path) -> None:
    """Refuse a sealed safetensors file (see SEAL_KEY) whose bytes are not the ones sealed."""
    seal = _find_seal(path)
    if seal is None:
        return
    expected, offset = seal
    from resshift_cli.hub import file_fact

    if expected is None or file_fact(path, f"seal@{offset}", lambda: _seal_digest(path, offset)) != expected:
        raise CheckpointError(
            f"{path}: corrupt: its bytes do not match the sha256 sealed into it when it was written"
        )


def _find_seal(path: Path) -> tuple[str | None, int] | None:
    """``(sealed sha256, file offset of its hex digits)``, None for an unsealed file; the sha256 is
    None when the seal itself is damaged. A header that cannot be a safetensors header is refused."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: not a readable safetensors file (its header length is wrong)")
        header = f.read(length)
    try:
        parsed = json.loads(header)
    except ValueError:
        raise CheckpointError(f"{path}: not a readable safetensors file (its header is not JSON)") from None
    metadata = parsed.get("__metadata__") if isinstance(parsed, dict) else None
    if not isinstance(metadata, dict):
        return None
    value = metadata.get(SEAL_KEY)
    if value is None:
        value = next((v for v in metadata.values() if isinstance(v, str) and _SEAL_VALUE.fullmatch(v)), None)
    if value is None:
        return None
    match = _SEAL_VALUE.fullmatch(value) if isinstance(value, str) else None
    at = header.find(f'"{value}"'.encode()) if match else -1
    if match is None or at < 0:
        return None, 0
    return match.group(1), 8 + at + 1 + len(_SEAL_PREFIX)


def _seal_digest(path: Path, offset: int) -> str:
    """The sha256 of the file with the 64 bytes at ``offset`` read as ASCII zeros."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        head = bytearray(f.read(offset + 64))
        head[offset : offset + 64] = _UNSEALED.encode()
        digest.update(head)
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_finite(path: Path, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Refuse floating-point tensors holding NaN or infinity: no trained weight is one."""
    from resshift_cli.hub import file_fact

    def first_bad() -> str:
        for key, value in state_dict.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return key
        return ""

    bad = file_fact(path, "non-finite", first_bad)
    if bad:
        raise CheckpointError(f"{path}: {bad} holds NaN or infinite values, which no usable weights do")


def unwrap_state_dict(raw: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Strip a top-level wrapper entry and ``module.``/``_orig_mod.`` key prefixes."""
    while isinstance(raw, Mapping) and not _is_flat(raw):
        inner = next((raw[k] for k in _WRAPPERS if k in raw and isinstance(raw[k], Mapping)), None)
        if inner is None:
            break
        raw = inner
    if not isinstance(raw, Mapping) or not raw:
        raise CheckpointError(f"{source}: holds no state dict of tensors")
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix) :]
                    stripped = True
        out[name] = value
    if not out:
        raise CheckpointError(f"{source}: holds no tensors")
    return out


def _is_flat(raw: Mapping) -> bool:
    return any(isinstance(v, torch.Tensor) for v in raw.values())


def load_into(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    name: str = "model",
    shown: int = 5,
    *,
    memory_format: torch.memory_format | None = None,
) -> None:
    """Load ``state_dict`` into ``model`` strictly, with an error a person can act on.

    The error names the model and lists a few missing, unexpected, wrongly shaped and wrongly
    typed (an integer tensor for a floating-point one, or the reverse) keys, then their counts,
    instead of torch's wall of text. The networks here hold only buffers they compute from their
    hyper-parameters (Swin's window indices and masks), so a checkpoint's buffers must equal the
    model's own: one that differs is corrupt, and would index out of range or mask the wrong
    pixels later. With ``memory_format`` the model takes the tensors themselves (4-D ones laid out
    so, all cast to the model's dtypes) instead of copying them: a memory-mapped file is then read
    once, lazily, and never copied twice for a layout.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    present = [k for k in expected if k in state_dict]
    wrong_shape = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in present
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    wrong_type = [
        f"{k} (checkpoint {_dtype_name(state_dict[k])}, model {_dtype_name(expected[k])})"
        for k in present
        if state_dict[k].is_floating_point() != expected[k].is_floating_point()
    ]
    if missing or unexpected or wrong_shape or wrong_type:
        parts = []
        groups = (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrongly shaped", wrong_shape),
            ("wrongly typed", wrong_type),
        )
        for label, keys in groups:
            if keys:
                more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:shown])}{more}")
        raise CheckpointError(
            f"checkpoint does not fit {name} ({'; '.join(parts)}); is it the right model or autoencoder?"
        )
    buffers = {key for key, _ in model.named_buffers()}
    for key in present:
        own = expected[key]
        if key in buffers and not own.is_meta and not torch.equal(state_dict[key].to(own), own):
            raise CheckpointError(
                f"corrupt checkpoint for {name}: buffer {key} differs from the value the model computes"
            )
    if memory_format is None:
        model.load_state_dict(dict(state_dict), strict=True)
        return
    laid_out = {}
    for key, value in state_dict.items():
        value = value.to(expected[key].dtype)
        laid_out[key] = value.contiguous(memory_format=memory_format) if value.dim() == 4 else value
    model.load_state_dict(laid_out, strict=True, assign=True)


def compact_state_dict(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state_dict`` made small to store: floating-point tensors cast to ``dtype``, integer ones
    (index buffers, int64 in the model) to the narrowest of int16/int32 that holds their values.
    :func:`load_into` casts every tensor back to the model's dtypes."""
    out = {}
    for key, value in state_dict.items():
        if value.is_floating_point():
            value = value.to(dtype)
        elif value.dtype in (torch.int32, torch.int64) and value.numel():
            low, high = int(value.min()), int(value.max())
            for narrow in (torch.int16, torch.int32):
                if torch.iinfo(narrow).min <= low and high <= torch.iinfo(narrow).max:
                    value = value.to(narrow)
                    break
        out[key] = value
    return out


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> str:
    """Write ``state_dict`` as safetensors atomically (temporary file, then rename), sealed with
    the sha256 of its own bytes (see SEAL_KEY) so that :func:`read_state_dict` refuses any later
    change to them; returns that sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    digests: list[str] = []

    def write_sealed(temp: Path) -> None:
        save_file(tensors, str(temp), metadata={SEAL_KEY: _SEAL_PREFIX + _UNSEALED})
        seal = _find_seal(temp)
        if seal is None or seal[0] != _UNSEALED:
            raise RuntimeError("safetensors did not write the metadata it was given")
        digests.append(_seal_digest(temp, seal[1]))
        with open(temp, "r+b") as f:
            f.seek(seal[1])
            f.write(digests[-1].encode())

    write_atomically(path, write_sealed)
    return digests[-1]


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")




def _describe(exc: BaseException) -> str:
    """The first line of an error, with its type where the line alone says nothing (``KeyError: 101``)."""
    line = first_line(exc)
    return line if re.search(r"[A-Za-z]{3}", line) else f"{type(exc).__name__}: {line}"
