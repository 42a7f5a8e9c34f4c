"""The reverse chain as a small pure function over tensors: a scheduler, a network, a start.

The network is any callable ``denoiser(x, timesteps, **cond)`` predicting what the scheduler's
``predict_type`` names (x0 for the published models); the pipelines pass the UNet itself, or a
wrapper that runs it in tiles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from resshift_cli.scheduler import ResShiftScheduler

Denoiser = Callable[..., torch.Tensor]
StepCallback = Callable[[int, int], None]


def noise_draws(scheduler: ResShiftScheduler, steps: int | None = None) -> int:
    """How many standard-normal tensors :func:`sample` takes: the prior draw, then one per step
    (upstream draws the last although t = 0 adds no noise); a one-step model takes the prior only."""
    return 1 if steps == 1 else scheduler.num_timesteps + 1


def network_calls(scheduler: ResShiftScheduler, steps: int | None = None) -> int:
    """How many times :func:`sample` calls the network: once for a one-step model, else once per
    step of the schedule."""
    return 1 if steps == 1 else scheduler.num_timesteps


def sample(
    scheduler: ResShiftScheduler,
    denoiser: Denoiser,
    y: torch.Tensor,
    noise: Iterator[torch.Tensor],
    *,
    cond: Mapping[str, Any],
    steps: int | None = None,
    clip_denoised: bool = False,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Walk from the prior over ``y`` (already in diffusion space) back to x_0; returns x_0.

    ``noise`` yields the draws in upstream's order (:func:`noise_draws` of them); ``cond`` goes to
    every network call (``lq``, and ``mask`` for inpainting). ``steps`` is how many network calls
    the model was made for: None for every step of the schedule, 1 for a model distilled into one
    step (SinSR), whose x0 prediction at t = T - 1 from the prior sample is the result.
    ``on_step(done, total)`` follows each network call.
    """
    if steps not in (None, 1, scheduler.num_timesteps):
        raise ValueError(f"steps must be 1 or the schedule's {scheduler.num_timesteps}, got {steps}")
    x = scheduler.prior_sample(y, next(noise))
    total = network_calls(scheduler, steps)
    for k, i in enumerate(range(scheduler.num_timesteps - 1, scheduler.num_timesteps - 1 - total, -1), 1):
        t = torch.full((y.shape[0],), i, dtype=torch.long, device=y.device)
        output = denoiser(scheduler.scale_input(x, t), scheduler.model_timesteps(t), **cond)
        if steps == 1:
            x = scheduler.predict_xstart(output.to(x.dtype), x, y, t)
            x = x.clamp(-1, 1) if clip_denoised else x
        else:
            x = scheduler.step(output, x, y, t, next(noise), clip_denoised).sample
        if on_step is not None:
            on_step(k, total)
    return x


def gaussian_noise(
    like: torch.Tensor, count: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """``count`` standard-normal tensors shaped like ``like``, drawn in order from ``generator``."""
    return [
        torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        for _ in range(count)
    ]
