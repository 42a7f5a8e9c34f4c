"""SinSR: ResShift's realsr-v1 distilled into one step, run by `resshift sr --model sinsr`.

The one-step computation itself is checked against upstream's numbers in test_parity.py
(test_one_step_model_on_the_sr_fixture); here, the registry entries and the whole path through the
command line, with a tiny model of the same kind.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from reference import case, reference_path
from tinymodels import _table, registry_entries, tiny_restorer

from resshift_cli.checkpoints import read_state_dict
from resshift_cli.cli import main
from resshift_cli.models.unet import UNet
from resshift_cli.registry import load_registry

pytestmark = pytest.mark.shared  # needs ../shared

RELEASES = "https://github.com/wyf0912/SinSR/releases/download/v1.0/"


@pytest.mark.parametrize(("name", "file"), [("sinsr", "SinSR_v1.pth"), ("sinsr-v2", "SinSR_v2.pth")])
def test_registry_entries_are_realsr_v1_sampled_in_one_step(name: str, file: str) -> None:
    registry = load_registry()
    sinsr, v1 = registry.model(name), registry.model("realsr-v1")
    assert sinsr.unet == v1.unet and sinsr.diffusion == v1.diffusion
    assert (sinsr.task, sinsr.scale, sinsr.steps, sinsr.autoencoder) == ("sr", 4, 15, "vq-f4")
    assert (sinsr.sample_steps, sinsr.network_calls, v1.network_calls) == (1, 1, 15)
    assert sinsr.diffusion["kappa"] == 2.0 and sinsr.diffusion["min_noise_level"] == 0.04
    assert sinsr.source.url == RELEASES + file
    assert sinsr.license.startswith("CC BY-NC-SA 4.0")
    assert "one step" in sinsr.description


def test_sample_steps_other_than_one_or_the_schedule_are_refused(tmp_path: Path) -> None:
    from resshift_cli.registry import RegistryError

    user = tmp_path / "mine.toml"
    user.write_text("[models.sinsr]\nsample_steps = 4\n")
    with pytest.raises(RegistryError, match=r"models\.sinsr\.sample_steps: expected 1"):
        load_registry(user)


@pytest.fixture
def one_step_registry(tmp_path: Path) -> Path:
    """A registry with ``tiny-sinsr``: tiny-sr's network sampled in one step, its weights in a
    ``.pth`` wrapped as SinSR's releases are (a ``state_dict`` entry, ``module.`` prefixes)."""
    entries = registry_entries()
    state = read_state_dict(reference_path("parity", "sr-tiny", "unet.safetensors"))
    weights = tmp_path / "SinSR_tiny.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, weights)
    model = dict(entries["models"]["tiny-sr"], sample_steps=1, path=str(weights))
    lines = [*_table("models.tiny-sinsr", model), ""]
    lines += _table("autoencoders.tiny-sr-vq", entries["autoencoders"]["tiny-sr-vq"])
    path = tmp_path / "sinsr.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_one_step_model_through_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_step_registry: Path
) -> None:
    """`resshift sr --model tiny-sinsr` calls the network once per image, at t = T-1, and writes
    the decoding of its prediction from the prior sample of the seed's first draw."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    pixels = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    calls: list[int] = []
    forward = UNet.forward

    def counted(self: UNet, x: torch.Tensor, timesteps: torch.Tensor, *args: object, **kwargs: object):
        calls.append(int(timesteps[0]))
        return forward(self, x, timesteps, *args, **kwargs)

    monkeypatch.setattr(UNet, "forward", counted)
    result = CliRunner().invoke(
        main,
        [
            "sr",
            str(tmp_path / "a.png"),
            "-o",
            str(tmp_path / "b.png"),
            "--registry",
            str(one_step_registry),
            "--model",
            "tiny-sinsr",
            "--seed",
            "5",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    steps = case("sr-tiny")["diffusion_params"]["steps"]
    assert calls == [steps - 1]
    restorer = dataclasses.replace(tiny_restorer("sr-tiny", optimize=True), sample_steps=1)
    lq = torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)[None]
    expected = (restorer.sample(lq * 2 - 1, generator=torch.Generator().manual_seed(5)).clamp(-1, 1) + 1) / 2
    written = np.asarray(Image.open(tmp_path / "b.png"), dtype=np.float64)
    reference = expected[0].permute(1, 2, 0).double().numpy() * 255
    assert written.shape == (64, 96, 3)
    assert np.abs(written - reference).max() <= 0.51


def test_weights_list_shows_one_step() -> None:
    result = CliRunner().invoke(main, ["weights", "list"])
    line = next(line for line in result.output.splitlines() if line.startswith("sinsr "))
    assert " 1 step " in line
