"""The models and the sampler compute what upstream computes, on the authors' own fixtures."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from reference import PARITY_CASES, case, reference_path
from safetensors.torch import load_file

from resshift_cli import ResShiftDiffusion, UNet, VQAutoencoder
from resshift_cli.checkpoints import load_into, read_state_dict
from resshift_cli.models import set_fast_paths


@cache
def _models(name: str) -> tuple[UNet, VQAutoencoder, ResShiftDiffusion]:
    c = case(name)
    unet = UNet(**c["unet_params"]).eval()
    autoencoder = VQAutoencoder(**c["autoencoder_params"]).eval()
    load_into(unet, read_state_dict(reference_path("parity", name, "unet.safetensors")), "unet")
    load_into(autoencoder, read_state_dict(reference_path("parity", name, "autoencoder.safetensors")), "vq")
    return unet, autoencoder, ResShiftDiffusion(**c["diffusion_params"])


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
    _, autoencoder, diffusion = _models(name)
    t = _tensors(name)
    with torch.no_grad():
        z_y = diffusion.encode(diffusion.upsample(t["lq"]), autoencoder)
    assert _max_abs(z_y, t["z_y"]) < 1e-4


@pytest.mark.parametrize("name", PARITY_CASES)
def test_decoder_with_quantisation(name: str) -> None:
    _, autoencoder, _ = _models(name)
    t = _tensors(name)
    with torch.no_grad():
        decoded = autoencoder.decode(t["z_y"])
    assert _max_abs(decoded, t["decoded"]) < 1e-3


@pytest.mark.parametrize("fast", [True, False], ids=["fast-paths", "plain"])
@pytest.mark.parametrize("name", PARITY_CASES)
def test_full_sampling_with_recorded_noise(name: str, fast: bool) -> None:
    unet, autoencoder, diffusion = _models(name)
    t = _tensors(name)
    set_fast_paths(unet, fast)
    set_fast_paths(autoencoder, fast)
    with torch.no_grad():
        latent = diffusion.sample_latent(t["lq"], unet, autoencoder, mask=t.get("mask"), noise=_noise(name))
        sample = diffusion.decode(latent, autoencoder)
        direct = diffusion.sample(t["lq"], unet, autoencoder, mask=t.get("mask"), noise=_noise(name))
    set_fast_paths(unet, True)
    set_fast_paths(autoencoder, True)
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

    The fast paths are off: they compute some modules' outputs without calling the submodules
    upstream has (the upsampling convolution folded into the upsampling), so hooks would miss them.
    """
    unet, autoencoder, diffusion = _models(name)
    set_fast_paths(unet, False)
    set_fast_paths(autoencoder, False)
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
            lambda: autoencoder.encode(diffusion.upsample(t["lq"])),
        )
    )
    got.update(
        _module_outputs(autoencoder, "autoencoder.", decoder_names, lambda: autoencoder.decode(t["z_y"]))
    )
    set_fast_paths(unet, True)
    set_fast_paths(autoencoder, True)
    assert sorted(got) == sorted(acts)
    worst = {k: _max_abs(got[k], acts[k]) for k in acts}
    bad = {k: v for k, v in worst.items() if v > 1e-3}
    assert not bad, f"first mismatches: {sorted(bad.items(), key=lambda kv: -kv[1])[:5]}"
