"""Device and precision selection, kept explicit so CUDA, MPS and CPU runs behave predictably.

The names are checked without torch (the command line validates options before importing it);
torch is imported by the functions that need it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from resshift_cli.errors import ModelError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class RuntimeSetupError(ModelError):
    """The requested device or precision cannot be used on this machine."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an explicit device must be available."""
    import torch

    if not DEVICE_PATTERN.fullmatch(name):
        raise RuntimeSetupError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeSetupError(
                f"device {name!r} requested but CUDA is not available here; use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeSetupError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeSetupError(f"device {name!r} requested but MPS is not available here; use --device cpu")
    return device


DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
"""The one precision table: each name and the torch dtype it means (fp32 runs without autocast)."""


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a precision name in :data:`DTYPE_NAMES`."""
    import torch

    if name not in DTYPE_NAMES:
        raise RuntimeSetupError(f"unknown precision {name!r}; use one of {', '.join(PRECISIONS)}")
    return getattr(torch, DTYPE_NAMES[name])


def precision_name(dtype: torch.dtype | None) -> str:
    """ "fp32" for None (no autocast), else the name of ``dtype`` in :data:`DTYPE_NAMES`."""
    if dtype is None:
        return "fp32"
    return next(name for name, full in DTYPE_NAMES.items() if str(dtype) == f"torch.{full}")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32.

    ``auto`` is fp16 autocast on CUDA (as upstream runs) and fp32 elsewhere. A precision the
    device cannot run is a one-line error saying which work there.
    """
    import torch

    if precision not in PRECISIONS:
        raise RuntimeSetupError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    if precision == "fp32":
        return None
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeSetupError("bf16 is not supported by this GPU; use --precision fp16 or fp32")
    if precision == "bf16" and device.type == "mps" and not _mps_bf16():
        raise RuntimeSetupError("bf16 needs macOS 14 or newer on MPS; use --precision fp16 or fp32")
    return dtype_of(precision)


def _mps_bf16() -> bool:
    import torch

    check = getattr(torch.backends.mps, "is_macos_or_newer", None)
    return bool(check(14, 0)) if check is not None else False
