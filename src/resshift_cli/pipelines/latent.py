"""The space the chain runs in: an autoencoder's latent, or the image itself for pixel models.

Upstream upsamples the LQ image bicubically by the model's scale (``sf``) and encodes it; the
chain runs on that latent (times ``scale_factor``) and its result is decoded. The network is
conditioned on the LQ itself in latent space; in pixel space, where the network runs at the output
size and its feature extractor can only shrink its conditioning, on the bicubic upsampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from resshift_cli.models.autoencoder import VQAutoencoder


class LatentSpace:
    """Into and out of the chain's space, for an ``autoencoder`` (None: pixel space)."""

    def __init__(self, autoencoder: VQAutoencoder | None, sf: int = 4, scale_factor: float = 1.0) -> None:
        self.autoencoder = autoencoder
        self.sf = int(sf)
        self.scale_factor = float(scale_factor)

    @classmethod
    def from_params(cls, autoencoder: VQAutoencoder | None, diffusion_params: dict) -> LatentSpace:
        """Built from upstream's ``diffusion_params`` (their ``sf`` and ``scale_factor``)."""
        return cls(autoencoder, diffusion_params.get("sf", 4), diffusion_params.get("scale_factor", 1.0))

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel along each axis (1 in pixel space)."""
        return self.autoencoder.downsample_factor if self.autoencoder is not None else 1

    @property
    def channels(self) -> int:
        """Channels of the chain's tensors."""
        return self.autoencoder.embed_dim if self.autoencoder is not None else 3

    def upsample(self, lq: torch.Tensor) -> torch.Tensor:
        """Bicubic upsampling by ``sf`` (align_corners False, no antialias), as upstream."""
        if self.sf == 1:
            return lq
        return F.interpolate(lq, scale_factor=self.sf, mode="bicubic")

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image (already upsampled) -> diffusion space; the image itself in pixel space."""
        if self.autoencoder is None:
            return image
        param = next(self.autoencoder.parameters())
        z = self.autoencoder.encode(image.to(param.dtype))
        return (z * self.scale_factor).to(image.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion space -> image (not clamped)."""
        if self.autoencoder is None:
            return z
        param = next(self.autoencoder.parameters())
        return self.autoencoder.decode((z / self.scale_factor).to(param.dtype)).to(z.dtype)

    def network_lq(self, lq: torch.Tensor) -> torch.Tensor:
        """The LQ image the network is conditioned on, for sampling and training alike."""
        return lq if self.autoencoder is not None else self.upsample(lq)
