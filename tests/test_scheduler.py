"""The schedule's equations (forward process, posterior, one step, training loss) and the sampler
that walks the chain (noise handling, steps, one-step models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import manifest

from resshift_cli import ResShiftScheduler, sampler
from resshift_cli.scheduler import space_timesteps

pytestmark = pytest.mark.shared  # needs ../shared


def _diffusion(**overrides) -> ResShiftScheduler:
    params = dict(manifest("realsr-v3")["diffusion_params"])
    params.update(overrides)
    return ResShiftScheduler(**params)


def _sample(d: ResShiftScheduler, denoiser, y: torch.Tensor, seed: int = 0, **kwargs) -> torch.Tensor:
    """The chain from the prior over ``y`` with draws from ``seed``, pixel space (clamped x0)."""
    draws = sampler.gaussian_noise(
        y, sampler.noise_draws(d, kwargs.get("steps")), torch.Generator().manual_seed(seed)
    )
    return sampler.sample(d, denoiser, y, iter(draws), cond={}, clip_denoised=True, **kwargs)


@pytest.mark.parametrize("name", ["realsr-v1", "realsr-v3", "inpaint-face", "faceir"])
def test_published_schedules(name: str) -> None:
    m = manifest(name)
    diffusion = ResShiftScheduler(**m["diffusion_params"])
    for field in ("sqrt_etas", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
        np.testing.assert_allclose(getattr(diffusion, field), m["schedule"][field], rtol=1e-10, atol=0)
    assert diffusion.timestep_map.tolist() == m["schedule"]["timestep_map"]


def test_schedule_endpoints_follow_the_paper() -> None:
    d = _diffusion(steps=15, min_noise_level=0.04, kappa=2.0)
    assert d.sqrt_etas[0] == pytest.approx(min(0.04 / 2.0, 0.04))
    assert d.sqrt_etas[-1] == pytest.approx(0.99)
    assert np.all(np.diff(d.sqrt_etas) > 0)


def test_q_sample_moments() -> None:
    d = _diffusion()
    torch.manual_seed(0)
    x0 = torch.full((20000, 1), 0.3)
    y = torch.full((20000, 1), -0.5)
    t = torch.full((20000,), 2, dtype=torch.long)
    x_t = d.q_sample(x0, y, t)
    assert x_t.mean().item() == pytest.approx(0.3 + d.etas[2] * (-0.8), abs=0.03)
    assert x_t.std().item() == pytest.approx(d.kappa * d.sqrt_etas[2], rel=0.02)


def test_posterior_mean_of_the_noise_free_path() -> None:
    """With x_t at its mean x0 + eta_t e0, the posterior mean is x0 + eta_{t-1} e0."""
    d = _diffusion()
    x0, y = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    for step in range(1, d.num_timesteps):
        t = torch.full((3,), step, dtype=torch.long)
        x_t = x0 + d.etas[step] * (y - x0)
        expected = x0 + d.etas[step - 1] * (y - x0)
        assert torch.allclose(d.q_posterior_mean(x0, x_t, t), expected, atol=1e-6)


def test_prior_and_input_scaling() -> None:
    d = _diffusion()
    y = torch.randn(2, 3, 4, 4)
    noise = torch.randn_like(y)
    assert torch.allclose(d.prior_sample(y, noise), y + d.kappa * 0.99 * noise)
    t = torch.tensor([0, 3])
    scaled = d.scale_input(y, t)
    assert torch.allclose(scaled[1], y[1] / np.sqrt(d.etas[3] * d.kappa**2 + 1))
    pixel = _diffusion(latent_flag=False)
    assert torch.allclose(pixel.scale_input(y, t)[0], y[0] / (d.sqrt_etas[0] * d.kappa * 3 + 1))
    assert torch.equal(_diffusion(normalize_input=False).scale_input(y, t), y)


class _Oracle(torch.nn.Module):
    """A 'network' that always predicts the given x0: the chain must land on it."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.x0 = x0
        self.calls: list[int] = []

    def forward(self, x, timesteps, lq=None, mask=None):
        self.calls.append(int(timesteps[0]))
        return self.x0


def test_sampler_with_an_oracle_lands_on_x0_and_visits_every_step() -> None:
    d = _diffusion()
    x0 = torch.randn(1, 3, 8, 8)
    oracle = _Oracle(x0)
    out = _sample(d, oracle, torch.randn(1, 3, 8, 8))
    assert oracle.calls == [3, 2, 1, 0]
    # Clamped prediction (pixel space), then no noise at t = 0.
    assert torch.allclose(out, x0.clamp(-1, 1))


def test_every_draw_is_used_in_upstreams_order() -> None:
    d = _diffusion()
    y = torch.randn(2, 3, 8, 8)

    def shrink(x, timesteps, **cond):
        return 0.5 * x  # depends on x_t, so every draw matters

    a = _sample(d, shrink, y, seed=7)
    g = torch.Generator().manual_seed(7)
    draws = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(d.num_timesteps + 1)]
    b = sampler.sample(d, shrink, y, iter(draws), cond={}, clip_denoised=True)
    # By hand: the prior from the first draw, then one step per draw.
    x = d.prior_sample(y, draws[0])
    for i, draw in zip(range(d.num_timesteps - 1, -1, -1), draws[1:], strict=False):
        t = torch.full((2,), i)
        x = d.step(shrink(d.scale_input(x, t), None), x, y, t, draw, clip_denoised=True).sample
    assert torch.equal(a, b) and torch.equal(b, x)
    assert not torch.equal(a, _sample(d, shrink, y, seed=8))


def test_on_step_reports_progress() -> None:
    d = _diffusion()
    seen: list[tuple[int, int]] = []
    oracle = _Oracle(torch.zeros(1, 3, 8, 8))
    _sample(d, oracle, torch.zeros(1, 3, 8, 8), on_step=lambda k, n: seen.append((k, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_one_step_model_predicts_x0_from_the_prior_at_the_last_timestep() -> None:
    """A model distilled into one step (SinSR) is called once, at t = T - 1, on the prior sample
    made from the first draw; its x0 prediction is the result, with no other arithmetic."""
    d = _diffusion(steps=15, min_noise_level=0.04)
    y = torch.randn(1, 3, 8, 8)
    seen: list[tuple[torch.Tensor, int]] = []

    def network(x, timesteps, **cond):
        seen.append((x.clone(), int(timesteps[0])))
        return torch.tanh(x) * 0.7

    draws = sampler.gaussian_noise(y, sampler.noise_draws(d, 1), torch.Generator().manual_seed(3))
    assert len(draws) == 1
    out = sampler.sample(d, network, y, iter(draws), cond={}, steps=1)
    t = torch.full((1,), d.num_timesteps - 1)
    x_T = y + d.kappa * d.sqrt_etas[-1] * draws[0]
    assert [step for _, step in seen] == [14]
    torch.testing.assert_close(seen[0][0], d.scale_input(x_T.float(), t))
    torch.testing.assert_close(out, torch.tanh(d.scale_input(x_T.float(), t)) * 0.7)
    with pytest.raises(ValueError, match="steps must be 1 or the schedule's 15"):
        sampler.sample(d, network, y, iter(draws), cond={}, steps=3)


def test_training_loss() -> None:
    d = _diffusion()
    x0, y = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 1, 2, 3])
    perfect = d.training_loss(_Oracle(x0), x0, y, t)
    assert perfect.shape == (4,) and torch.all(perfect == 0)
    zero = d.training_loss(_Oracle(torch.zeros_like(x0)), x0, y, t)
    assert torch.allclose(zero, x0.pow(2).flatten(1).mean(1))
    weighted = _diffusion(weighted_mse=True).training_loss(_Oracle(torch.zeros_like(x0)), x0, y, t)
    assert torch.allclose(weighted, zero * torch.from_numpy(d.weight_loss_mse).float())
    l1 = d.training_loss(_Oracle(torch.zeros_like(x0)), x0, y, t, loss="l1")
    assert torch.allclose(l1, x0.abs().flatten(1).mean(1))
    with pytest.raises(ValueError, match="loss must be one of mse, l1, got 'huber'"):
        d.training_loss(_Oracle(x0), x0, y, t, loss="huber")


def test_respacing_keeps_a_subset_and_maps_timesteps() -> None:
    assert space_timesteps(15, None) == list(range(15))
    assert space_timesteps(15, "ddim5") == [0, 3, 6, 9, 12]
    assert space_timesteps(10, [4]) == [0, 3, 6, 9]
    full = _diffusion(steps=15, min_noise_level=0.04)
    short = _diffusion(steps=15, min_noise_level=0.04, timestep_respacing=[4])
    kept = space_timesteps(15, [4])
    assert short.num_timesteps == 4
    np.testing.assert_allclose(short.sqrt_etas, full.sqrt_etas[kept])
    t = torch.arange(4)
    assert short.model_timesteps(t).tolist() == kept


def test_unknown_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="schedule"):
        _diffusion(schedule_name="ldm")
    with pytest.raises(ValueError, match="predict_type"):
        _diffusion(predict_type="velocity")
