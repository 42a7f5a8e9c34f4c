"""Models built from the published hyper-parameters have exactly the published state-dict layout."""

import pytest
import torch
from reference import MANIFESTS, manifest

from resshift_cli import UNet, VQAutoencoder

pytestmark = pytest.mark.shared  # needs ../shared


def _layout(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", MANIFESTS)
def test_unet_state_dict_matches_manifest(name: str) -> None:
    m = manifest(name)
    with torch.device("meta"):
        unet = UNet(**m["unet_params"])
    assert _layout(unet) == m["unet_state_dict"]
    assert sum(p.numel() for p in unet.parameters()) == m["unet_parameter_count"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_autoencoder_state_dict_matches_manifest(name: str) -> None:
    m = manifest(name)
    with torch.device("meta"):
        autoencoder = VQAutoencoder(**m["autoencoder_params"])
    assert _layout(autoencoder) == m["autoencoder_state_dict"]
    assert sum(p.numel() for p in autoencoder.parameters()) == m["autoencoder_parameter_count"]


def test_every_manifest_is_covered() -> None:
    from reference import reference_path

    found = sorted(p.stem for p in reference_path("manifests").glob("*.json"))
    assert found == sorted(MANIFESTS)
