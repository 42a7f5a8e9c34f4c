"""resshift-cli: image restoration with ResShift, residual-shifting diffusion in a few steps.

The library's entry point is :func:`load_restorer`: a registry model by name, ready to restore::

    from resshift_cli import load_restorer
    restorer = load_restorer("lite", device="cpu")

The networks, the schedule and the restorer are importable from here too. They are loaded
lazily, so that the command line starts without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load_restorer": "resshift_cli.pipelines.loading",
    "Restorer": "resshift_cli.pipelines.restorer",
    "ResShiftScheduler": "resshift_cli.scheduler",
    "UNet": "resshift_cli.models.unet",
    "VQAutoencoder": "resshift_cli.models.autoencoder",
}

__all__ = ["ResShiftScheduler", "Restorer", "UNet", "VQAutoencoder", "__version__", "load_restorer"]

if TYPE_CHECKING:
    from resshift_cli.models.autoencoder import VQAutoencoder
    from resshift_cli.models.unet import UNet
    from resshift_cli.pipelines.loading import load_restorer
    from resshift_cli.pipelines.restorer import Restorer
    from resshift_cli.scheduler import ResShiftScheduler


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'resshift_cli' has no attribute {name!r}")
