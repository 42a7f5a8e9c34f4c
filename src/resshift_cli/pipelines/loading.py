"""A ready :class:`Restorer` from a registry name: resolve the weights, build the networks without
random initialisation, load them strictly, place them on the device."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TypeVar

import torch

from resshift_cli.checkpoints import load_into, read_state_dict
from resshift_cli.errors import first_line
from resshift_cli.models.autoencoder import VQAutoencoder
from resshift_cli.models.unet import UNet
from resshift_cli.pipelines.latent import LatentSpace
from resshift_cli.pipelines.restorer import Restorer
from resshift_cli.registry import ModelSpec, Registry, RegistryError, load_registry
from resshift_cli.runtime import autocast_dtype, resolve_device
from resshift_cli.scheduler import ResShiftScheduler

Module = TypeVar("Module", bound=torch.nn.Module)


def load_restorer(
    model: str | ModelSpec,
    *,
    device: str | torch.device = "auto",
    precision: str = "auto",
    registry: Registry | str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    autoencoder: str | os.PathLike[str] | None = None,
    quiet: bool = True,
) -> Restorer:
    """The model called ``model`` in the registry, ready to restore on ``device``.

    ``device`` is "auto" (CUDA, then MPS, then the CPU), "cpu", "cuda", "cuda:N" or "mps";
    ``precision`` "auto" (fp16 autocast on CUDA, as upstream; fp32 elsewhere), "fp32", "fp16" or
    "bf16". ``registry`` is a :class:`Registry` or a user registry file merged over the built-in
    one. ``checkpoint`` and ``autoencoder`` are files that stand in for the registry's weights.
    Weights missing from the cache are downloaded (progress bars unless ``quiet``). Errors are
    :class:`~resshift_cli.errors.ModelError` subclasses with one-line messages.
    """
    from resshift_cli.hub import resolve_model

    if not isinstance(registry, Registry):
        registry = load_registry(registry)
    spec = registry.model(model) if isinstance(model, str) else model
    device = resolve_device(device) if isinstance(device, str) else device
    dtype = autocast_dtype(device, precision)
    files = resolve_model(spec, registry, checkpoint, autoencoder, quiet=quiet)
    layout = Restorer.layout(device_type=device.type)
    unet = _built(UNet, registry, f"models.{spec.name}.unet", **spec.unet)
    load_into(
        unet, read_state_dict(files.unet_path, device), f"the UNet of {spec.name!r}", memory_format=layout
    )
    ae_model = None
    if spec.autoencoder is not None:
        ae_spec = registry.autoencoder(spec.autoencoder)
        ae_model = _built(
            VQAutoencoder,
            registry,
            f"autoencoders.{ae_spec.name}",
            ae_spec.embed_dim,
            ae_spec.n_embed,
            ae_spec.ddconfig,
        )
        if files.autoencoder_path is None:
            raise RegistryError(f"no autoencoder weights for {spec.name!r}")
        load_into(
            ae_model,
            read_state_dict(files.autoencoder_path, device),
            f"the autoencoder {ae_spec.name!r}",
            memory_format=layout,
        )
    with _registry_parameters(registry, f"models.{spec.name}.diffusion"):
        scheduler = ResShiftScheduler(**spec.diffusion)
    latent = LatentSpace.from_params(ae_model, spec.diffusion)
    return Restorer(unet, scheduler, latent, device, dtype, sample_steps=spec.sample_steps)


def _built(cls: type[Module], registry: Registry, key: str, *args: object, **kwargs: object) -> Module:
    """``cls(*args, **kwargs)`` on the meta device: no memory and no random initialisation, since
    every tensor is about to come from a file (loaded with ``assign``)."""
    with _registry_parameters(registry, key), torch.device("meta"):
        return cls(*args, **kwargs)


@contextlib.contextmanager
def _registry_parameters(registry: Registry, key: str) -> Iterator[None]:
    """Turn a network that cannot be built from its registry parameters (an unknown name, a wrong
    type or value) into a one-line RegistryError naming the entry and the registry files."""
    try:
        yield
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RegistryError(
            f"{key}: these parameters do not build the network ({first_line(exc)}); "
            f"check that entry in {', '.join(registry.files)}"
        ) from None
