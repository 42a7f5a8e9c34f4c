"""resshift-cli: image restoration with ResShift, residual-shifting diffusion in a few steps.

The models and the diffusion are importable from here (``from resshift_cli import UNet``); they
are loaded lazily so that the command line starts without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "UNet": "resshift_cli.models.unet",
    "VQAutoencoder": "resshift_cli.models.autoencoder",
    "ResShiftDiffusion": "resshift_cli.diffusion",
}

__all__ = ["ResShiftDiffusion", "UNet", "VQAutoencoder", "__version__"]

if TYPE_CHECKING:
    from resshift_cli.diffusion import ResShiftDiffusion
    from resshift_cli.models.autoencoder import VQAutoencoder
    from resshift_cli.models.unet import UNet


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'resshift_cli' has no attribute {name!r}")
