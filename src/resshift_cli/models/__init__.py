"""Network definitions: the Swin-UNet that predicts x0 and the VQ autoencoders, as upstream."""

import torch

from resshift_cli.models.autoencoder import VQAutoencoder
from resshift_cli.models.unet import UNet

__all__ = ["UNet", "VQAutoencoder", "set_fast_paths"]


def set_fast_paths(model: torch.nn.Module, enabled: bool) -> None:
    """Switch the inference shortcuts (cached attention biases, in-place activations) on or off.

    They never change results beyond float rounding; the benchmark turns them off to measure them.
    """
    for module in model.modules():
        if hasattr(module, "fast"):
            module.fast = enabled
