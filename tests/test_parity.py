"""The models and the sampler compute what upstream computes, on the authors' own fixtures."""

from __future__ import annotations

import dataclasses
from functools import cache

import numpy as np
import pytest
import torch
from reference import PARITY_CASES, case, reference_path
from safetensors.torch import load_file
from tinymodels import tiny_restorer

from resshift_cli import ResShiftScheduler, UNet, VQAutoencoder, sampler
from resshift_cli.pipelines.restorer import Restorer

pytestmark = pytest.mark.shared  # needs ../shared


@cache
def _restorer(name: str, optimize: bool = False) -> Restorer:
    return tiny_restorer(name, optimize=optimize)


def _models(name: str) -> tuple[UNet, VQAutoencoder, ResShiftScheduler]:
    restorer = _restorer(name)
    assert restorer.latent.autoencoder is not None
    return restorer.unet, restorer.latent.autoencoder, restorer.scheduler


@cache
def _tensors(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(reference_path("parity", name, "tensors.safetensors")))


def _conditioning(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"lq": t["lq"], "mask": t["mask"]} if "mask" in t else {"lq": t["lq"]}


def _noise(name: str) -> list[torch.Tensor]:
    t = _tensors(name)
    return [t[f"noise_{i}"] for i in range(case(name)["noise_draws"])]


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", PARITY_CASES)
@pytest.mark.parametrize(
    "field", ["sqrt_etas", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"]
)
def test_schedule(name: str, field: str) -> None:
    ref = np.asarray(case(name)["schedule"][field], dtype=np.float64)
    ours = getattr(_models(name)[2], field)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", PARITY_CASES)
def test_schedule_kappa_and_timestep_map(name: str) -> None:
    schedule = case(name)["schedule"]
    diffusion = _models(name)[2]
    assert diffusion.kappa == schedule["kappa"]
    assert diffusion.timestep_map.tolist() == schedule["timestep_map"]


@pytest.mark.parametrize("name", PARITY_CASES)
def test_unet_output_at_every_timestep(name: str) -> None:
    unet, _, diffusion = _models(name)
    t = _tensors(name)
    x_t = t["x_t"]
    with torch.no_grad():
        for step in range(diffusion.num_timesteps):
            ts = torch.full((x_t.shape[0],), step, dtype=torch.long)
            out = unet(diffusion.scale_input(x_t, ts), diffusion.model_timesteps(ts), **_conditioning(t))
            assert _max_abs(out, t[f"unet_out_t{step}"]) < 1e-4, f"t={step}"


@pytest.mark.parametrize("name", PARITY_CASES)
def test_encoder_gives_z_y(name: str) -> None:
    t = _tensors(name)
    with torch.no_grad():
        z_y = _restorer(name).encode(t["lq"])
    assert _max_abs(z_y, t["z_y"]) < 1e-4


@pytest.mark.parametrize("name", PARITY_CASES)
def test_decoder_with_quantisation(name: str) -> None:
    _, autoencoder, _ = _models(name)
    t = _tensors(name)
    with torch.no_grad():
        decoded = autoencoder.decode(t["z_y"])
    assert _max_abs(decoded, t["decoded"]) < 1e-3


@pytest.mark.parametrize("fast", [True, False], ids=["optimised", "plain"])
@pytest.mark.parametrize("name", PARITY_CASES)
def test_full_sampling_with_recorded_noise(name: str, fast: bool) -> None:
    """The stages of the single pass match upstream's latents and sample, and the single pass is
    exactly their composition; optimised is channels_last with the inference shortcuts."""
    restorer = _restorer(name, fast)
    t = _tensors(name)
    with torch.inference_mode():
        z_y = restorer.encode(t["lq"])
        latent = restorer.chain(z_y, t["lq"], mask=t.get("mask"), noise=_noise(name))
        sample = restorer.decode(latent)
    direct = restorer.sample(t["lq"], mask=t.get("mask"), noise=_noise(name))
    assert _max_abs(latent, t["final_latent"]) < 1e-4
    assert _max_abs(sample, t["sample"]) < 1e-3
    assert torch.equal(direct, sample)


def _module_outputs(model: torch.nn.Module, prefix: str, names: list[str], run) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n[len(prefix) :] not in modules]
    assert not missing, f"modules absent from our model: {missing[:5]}"
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:

        def hook(_m, _i, out, name=name):
            captured[name] = out[0:1].detach().clone()

        hooks.append(modules[name[len(prefix) :]].register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return captured


@pytest.mark.parametrize("name", PARITY_CASES)
def test_every_named_activation(name: str) -> None:
    """Each upstream submodule's output is matched by ours, so a divergence shows where it starts.

    The models are the plain ones: the fast paths compute some modules' outputs without calling the
    submodules upstream has (the upsampling convolution folded into the upsampling), so hooks would
    miss them.
    """
    unet, autoencoder, diffusion = _models(name)
    t = _tensors(name)
    acts = load_file(str(reference_path("parity", name, "activations.safetensors")))
    last = diffusion.num_timesteps - 1
    ts = torch.full((t["x_t"].shape[0],), last, dtype=torch.long)

    unet_names = [k for k in acts if k.startswith("unet.")]
    got = _module_outputs(
        unet,
        "unet.",
        unet_names,
        lambda: unet(diffusion.scale_input(t["x_t"], ts), diffusion.model_timesteps(ts), **_conditioning(t)),
    )
    ae_names = [k for k in acts if k.startswith("autoencoder.")]
    encoder_names = [k for k in ae_names if k.startswith(("autoencoder.encoder", "autoencoder.quant_conv"))]
    decoder_names = [k for k in ae_names if k not in encoder_names]
    got.update(
        _module_outputs(
            autoencoder,
            "autoencoder.",
            encoder_names,
            lambda: autoencoder.encode(_restorer(name).latent.upsample(t["lq"])),
        )
    )
    got.update(
        _module_outputs(autoencoder, "autoencoder.", decoder_names, lambda: autoencoder.decode(t["z_y"]))
    )
    assert sorted(got) == sorted(acts)
    worst = {k: _max_abs(got[k], acts[k]) for k in acts}
    bad = {k: v for k, v in worst.items() if v > 1e-3}
    assert not bad, f"first mismatches: {sorted(bad.items(), key=lambda kv: -kv[1])[:5]}"


def test_one_step_model_on_the_sr_fixture() -> None:
    """SinSR's path, checked on upstream's numbers: x_T = z_y + kappa sqrt(eta_T) noise_0 from the
    fixture's own z_y and first draw; from the fixture's x_t as x_T, the single network call is
    upstream's unet_out_t{T-1}; and the output is the decoding of that prediction, nothing else."""
    restorer = dataclasses.replace(_restorer("sr-tiny"), sample_steps=1)
    scheduler, t = restorer.scheduler, _tensors("sr-tiny")
    last = scheduler.num_timesteps - 1
    x_T = scheduler.prior_sample(t["z_y"], t["noise_0"])
    expected_x_T = t["z_y"] + scheduler.kappa * scheduler.sqrt_etas[last] * t["noise_0"]
    assert _max_abs(x_T, expected_x_T) < 1e-6
    calls: list[torch.Tensor] = []

    def network(x: torch.Tensor, timesteps: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        calls.append(timesteps)
        # Run the network on the fixture's x_t in place of our x_T: its output is then upstream's.
        return restorer.unet(scheduler.scale_input(t["x_t"], timesteps), timesteps, **cond)

    with torch.inference_mode():
        prediction = sampler.sample(
            scheduler, network, t["z_y"], iter([t["noise_0"]]), cond=_conditioning(t), steps=1
        )
        output = restorer.decode(prediction)
        decoded = restorer.decode(t["unet_out_t" + str(last)])
    assert [int(c[0]) for c in calls] == [last]
    assert _max_abs(prediction, t[f"unet_out_t{last}"]) < 1e-4
    assert _max_abs(output, decoded) < 1e-5
    # Through the restorer: one call at t = T-1 on the prior sample, decoded.
    direct = restorer.sample(t["lq"], noise=[t["noise_0"]])
    with torch.inference_mode():
        by_hand = restorer.decode(
            restorer.unet(scheduler.scale_input(x_T, torch.tensor([last])), torch.tensor([last]), lq=t["lq"])
        )
    assert _max_abs(direct, by_hand) < 1e-5
