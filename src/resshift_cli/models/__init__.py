"""Network definitions: the Swin-UNet that predicts x0 and the VQ autoencoders, as upstream."""

from resshift_cli.models.autoencoder import VQAutoencoder
from resshift_cli.models.unet import UNet

__all__ = ["UNet", "VQAutoencoder"]
