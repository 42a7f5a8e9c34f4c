"""Build a ready :class:`Restorer` from a registry entry: resolve weights, construct, load strictly."""

from __future__ import annotations

import os

import torch

from resshift_cli.checkpoints import load_into, read_state_dict
from resshift_cli.diffusion import ResShiftDiffusion
from resshift_cli.models.autoencoder import VQAutoencoder
from resshift_cli.models.unet import UNet
from resshift_cli.pipelines.restorer import Restorer
from resshift_cli.registry import ModelSpec, Registry


def load_restorer(
    spec: ModelSpec,
    registry: Registry,
    *,
    device: torch.device,
    precision: torch.dtype | None,
    checkpoint: str | os.PathLike[str] | None = None,
    autoencoder: str | os.PathLike[str] | None = None,
    quiet: bool = False,
) -> Restorer:
    """Resolve ``spec``'s weights (explicit files first), build its networks and load them strictly.

    Weights are read on the CPU (safetensors memory-mapped) and moved to ``device`` once loaded.
    """
    from resshift_cli.hub import resolve_model

    files = resolve_model(spec, registry, checkpoint, autoencoder, quiet=quiet)
    with torch.device("meta"):
        unet = UNet(**spec.unet)
    unet = unet.to_empty(device="cpu")
    load_into(unet, read_state_dict(files.unet_path), f"the UNet of {spec.name!r}")
    ae_model = None
    if spec.autoencoder is not None:
        ae_spec = registry.autoencoder(spec.autoencoder)
        with torch.device("meta"):
            ae_model = VQAutoencoder(ae_spec.embed_dim, ae_spec.n_embed, ae_spec.ddconfig)
        ae_model = ae_model.to_empty(device="cpu")
        if files.autoencoder_path is None:
            raise ValueError(f"no autoencoder weights for {spec.name!r}")
        load_into(ae_model, read_state_dict(files.autoencoder_path), f"the autoencoder {ae_spec.name!r}")
    diffusion = ResShiftDiffusion(**spec.diffusion)
    return Restorer(unet, ae_model, diffusion, device, precision)
