"""Weight files and registries for the hub tests: tiny state dicts as safetensors and as
upstream-style pickles, published on the local :class:`~hubserver.HubServer`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from hubserver import HubServer
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

from resshift_cli import hub
from resshift_cli.hub import resolve_model
from resshift_cli.registry import Registry, load_registry

REPO = "test-org/weights"


def state_dict(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=gen), "conv.bias": torch.randn(4, generator=gen)}


def safetensors_bytes(tmp_path: Path, seed: int) -> bytes:
    path = tmp_path / f"st-{seed}.safetensors"
    save_file(state_dict(seed), str(path))
    return path.read_bytes()


def pickle_bytes(tmp_path: Path, seed: int) -> bytes:
    """An upstream-style checkpoint: a ``state_dict`` wrapper and ``module.`` prefixes."""
    path = tmp_path / f"pt-{seed}.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state_dict(seed).items()}}, str(path))
    return path.read_bytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_registry(
    tmp_path: Path, url: str, model: str = "", autoencoder: str = "", *, hub: bool = True
) -> Path:
    """A registry file with model ``tiny`` (unet.safetensors) and autoencoder ``tiny-ae`` (ae.pth),
    both on the hub repo (unless not ``hub``: upstream URLs only, as the built-in entries are) and
    at upstream URLs; ``model``/``autoencoder`` add keys to the entries."""
    unet_hub = f'repo_id = "{REPO}"\nfilename = "unet.safetensors"' if hub else ""
    ae_hub = f'repo_id = "{REPO}"\nfilename = "ae.pth"' if hub else ""
    text = f"""
[models.tiny]
task = "sr"
scale = 4
steps = 4
autoencoder = "tiny-ae"
{unet_hub}
url = "{url}/releases/unet.safetensors"
{model}

[models.tiny.unet]
model_channels = 4

[models.tiny.diffusion]
sf = 4
steps = 4

[autoencoders.tiny-ae]
embed_dim = 3
n_embed = 8
{ae_hub}
url = "{url}/releases/ae.pth"
{autoencoder}

[autoencoders.tiny-ae.ddconfig]
z_channels = 3
"""
    path = tmp_path / "registry.toml"
    path.write_text(text)
    return path


def set_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def publish(server: HubServer, tmp_path: Path, hub: bool = True, url: bool = True) -> tuple[bytes, bytes]:
    """Put tiny's unet (safetensors) and tiny-ae (pickle) on the hub repo and/or the release URLs."""
    unet, ae = safetensors_bytes(tmp_path, 1), pickle_bytes(tmp_path, 2)
    server.add_repo(REPO)
    if hub:
        server.add_hub_file(REPO, "unet.safetensors", unet)
        server.add_hub_file(REPO, "ae.pth", ae)
    if url:
        server.add_file("/releases/unet.safetensors", unet)
        server.add_file("/releases/ae.pth", ae)
    return unet, ae


def registry_for(
    tmp_path: Path, url: str, model: str = "", autoencoder: str = "", *, hub: bool = True
) -> Registry:
    return load_registry(make_registry(tmp_path, url, model, autoencoder, hub=hub), env={})


def resolve(registry: Registry, **kwargs: object) -> hub.ResolvedWeights:
    return resolve_model(registry.model("tiny"), registry, quiet=True, **kwargs)  # type: ignore[arg-type]


def assert_tensors(path: Path, seed: int) -> None:
    loaded = load_file(str(path))
    expected = state_dict(seed)
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value)


def refuse_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load called: a pickle was read again")

    monkeypatch.setattr(torch, "load", no_load)
