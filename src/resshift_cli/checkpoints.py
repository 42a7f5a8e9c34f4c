"""Reading and loading checkpoints safely.

Checkpoints are untrusted input: pickle files go only through ``torch.load(weights_only=True)``,
which refuses arbitrary objects, and safetensors files are memory-mapped. Upstream checkpoints
come in several wrappings (a ``state_dict`` entry, ``module.`` from DataParallel, ``_orig_mod.``
from torch.compile); all are unwrapped here so that loading itself can be strict.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from resshift_cli.atomic import write_atomically
from resshift_cli.errors import ModelError

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
_PREFIXES = ("module.", "_orig_mod.")
_WRAPPERS = ("state_dict", "params_ema", "model")


class CheckpointError(ModelError):
    """A checkpoint could not be read or does not fit the model it was loaded into."""


def read_state_dict(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict, wrappers and prefixes removed.

    ``.safetensors`` files are memory-mapped; ``.pth/.pt/.ckpt/.bin`` files are unpickled with
    ``weights_only=True`` only, so a file that carries code is refused, never run.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            raw: object = load_file(str(path), device=str(device))
        except Exception as exc:  # safetensors raises several types for bad files
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from exc
    elif suffix in PICKLE_SUFFIXES:
        try:
            raw = torch.load(str(path), map_location=device, weights_only=True, mmap=False)
        except Exception as exc:  # UnpicklingError for forbidden globals, others for corrupt files
            raise CheckpointError(
                f"{path}: refused or unreadable checkpoint ({_first_line(exc)}); only plain tensors "
                "are accepted (weights_only=True)"
            ) from exc
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint type {suffix or '(no suffix)'!r}; "
            f"expected one of {', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
        )
    return unwrap_state_dict(raw, source=str(path))


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

    The error names the model and lists a few missing, unexpected and wrongly shaped keys, then
    their counts, instead of torch's wall of text. With ``memory_format`` the model takes the
    tensors themselves (4-D ones laid out so, all cast to the model's dtypes) instead of copying
    them: a memory-mapped file is then read once, lazily, and never copied twice for a layout.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        groups = (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong_shape))
        for label, keys in groups:
            if keys:
                more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:shown])}{more}")
        raise CheckpointError(
            f"checkpoint does not fit {name} ({'; '.join(parts)}); is it the right model or autoencoder?"
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


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Write ``state_dict`` as safetensors atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    write_atomically(path, lambda temp: save_file(tensors, str(temp)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
