"""The residual-shifting schedule: the forward process and one reverse step, nothing else.

q(x_t | x0, y0) = N(x0 + eta_t (y0 - x0), kappa^2 eta_t I), with sqrt(eta_t) growing
exponentially (shaped by a power p) from min(min_noise_level / kappa, min_noise_level) to
etas_end. Sampling starts at x_T = y0 + kappa sqrt(eta_T) noise and walks back with the Gaussian
posterior q(x_{t-1} | x_t, x0), where x0 is the network's prediction. The schedule is held in
float64 numpy as upstream, and gathered into tensors of the caller's dtype.

The scheduler never calls a network: :mod:`resshift_cli.sampler` runs the chain, and
:mod:`resshift_cli.pipelines` moves images in and out of the space it runs in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

LOSSES = ("mse", "l1")
"""The training losses :meth:`ResShiftScheduler.training_loss` offers."""


def exponential_sqrt_etas(
    steps: int, min_noise_level: float, etas_end: float, kappa: float, power: float
) -> np.ndarray:
    """sqrt(eta_t) for t = 0..steps-1: exponential from the start level to ``etas_end``."""
    start = min(min_noise_level / kappa, min_noise_level)
    if steps == 1:
        return np.array([start], dtype=np.float64)
    increaser = math.exp(1 / (steps - 1) * math.log(etas_end / start))
    base = np.ones([steps]) * increaser
    power_timestep = np.linspace(0, 1, steps, endpoint=True) ** power * (steps - 1)
    return np.power(base, power_timestep) * start


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int] | None) -> list[int]:
    """Which of the original timesteps a respaced (shorter) chain keeps, as upstream's respacing."""
    if section_counts is None:
        return list(range(num_timesteps))
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start = 0
    kept: list[int] = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += frac_stride
        start += size
    return sorted(set(kept))


@dataclass(frozen=True)
class StepOutput:
    """One reverse step: the new sample, the posterior mean and the predicted x0."""

    sample: torch.Tensor
    mean: torch.Tensor
    pred_xstart: torch.Tensor


LATENT_PARAMETERS = ("sf", "scale_factor")
"""Upstream's ``diffusion_params`` that describe the space the chain runs in, not the schedule:
the scale of the bicubic upsampling and the latent's scale factor (see pipelines.latent)."""


class ResShiftScheduler:
    """The ResShift schedule, built from upstream's ``diffusion_params`` names.

    ``sf`` and ``scale_factor`` are accepted so that a published ``diffusion_params`` builds it as
    it is, and left to the latent space. ``timestep_respacing`` shortens a long chain as upstream
    does; ``timestep_map`` then gives the original timestep the network is called with at each
    step of the shorter chain.
    """

    def __init__(
        self,
        *,
        schedule_name: str = "exponential",
        schedule_kwargs: Mapping[str, Any] | None = None,
        etas_end: float = 0.99,
        steps: int = 4,
        min_noise_level: float = 0.2,
        kappa: float = 2.0,
        weighted_mse: bool = False,
        predict_type: str = "xstart",
        timestep_respacing: int | str | Sequence[int] | None = None,
        normalize_input: bool = True,
        latent_flag: bool = True,
        **latent: Any,
    ) -> None:
        unknown = sorted(set(latent) - set(LATENT_PARAMETERS))
        if unknown:
            raise TypeError(f"unknown diffusion parameter {unknown[0]!r}")
        if schedule_name != "exponential":
            raise ValueError(f"unsupported schedule {schedule_name!r}; only 'exponential' is published")
        if predict_type not in ("xstart", "epsilon", "residual"):
            raise ValueError(f"unsupported predict_type {predict_type!r}; use xstart, epsilon or residual")
        power = float((schedule_kwargs or {}).get("power", 0.3))
        self.kappa = float(kappa)
        self.weighted_mse = weighted_mse
        self.predict_type = predict_type
        self.normalize_input = normalize_input
        self.latent_flag = latent_flag
        base = exponential_sqrt_etas(steps, min_noise_level, etas_end, self.kappa, power)
        kept = space_timesteps(steps, timestep_respacing)
        # Respacing keeps a subset of the etas; the chain's jumps follow from the kept values.
        self.timestep_map = np.asarray(kept, dtype=np.int64)
        self._set_schedule(base[kept])

    def _set_schedule(self, sqrt_etas: np.ndarray) -> None:
        kappa = self.kappa
        self.sqrt_etas = np.asarray(sqrt_etas, dtype=np.float64)
        self.etas = self.sqrt_etas**2
        self.num_timesteps = int(self.etas.shape[0])
        self.etas_prev = np.append(0.0, self.etas[:-1])
        self.alpha = self.etas - self.etas_prev
        self.posterior_variance = kappa**2 * self.etas_prev / self.etas * self.alpha
        self.posterior_variance_clipped = np.append(self.posterior_variance[1], self.posterior_variance[1:])
        self.posterior_log_variance_clipped = np.log(self.posterior_variance_clipped)
        self.posterior_mean_coef1 = self.etas_prev / self.etas
        self.posterior_mean_coef2 = self.alpha / self.etas
        if self.predict_type != "epsilon":
            self.weight_loss_mse = 0.5 / self.posterior_variance_clipped * (self.alpha / self.etas) ** 2
        else:
            self.weight_loss_mse = (
                0.5
                / self.posterior_variance_clipped
                * (kappa * self.alpha / ((1 - self.etas) * self.sqrt_etas)) ** 2
            )

    @staticmethod
    def _gather(values: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] as a tensor broadcastable against ``like`` (batch first), in its dtype."""
        out = torch.from_numpy(values).to(device=t.device)[t].to(like.dtype)
        return out.view(-1, *([1] * (like.dim() - 1)))

    # ----- forward process -------------------------------------------------------------------
    def q_sample(
        self, x_start: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x0, y0) = N(x0 + eta_t (y0 - x0), kappa^2 eta_t I)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        eta = self._gather(self.etas, t, x_start)
        sqrt_eta = self._gather(self.sqrt_etas, t, x_start)
        return x_start + eta * (y - x_start) + sqrt_eta * self.kappa * noise

    def prior_sample(self, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_T = y + kappa sqrt(eta_T) noise: where the reverse chain starts."""
        t = torch.full((y.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=y.device)
        return y + self._gather(self.sqrt_etas, t, y) * self.kappa * noise

    def q_posterior_mean(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x0)."""
        return (
            self._gather(self.posterior_mean_coef1, t, x_t) * x_t
            + self._gather(self.posterior_mean_coef2, t, x_t) * x_start
        )

    def scale_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Normalise x_t to roughly unit variance before the network, as upstream."""
        if not self.normalize_input:
            return x
        if self.latent_flag:
            std = torch.sqrt(self._gather(self.etas, t, x) * self.kappa**2 + 1)
            return x / std
        inputs_max = self._gather(self.sqrt_etas, t, x) * self.kappa * 3 + 1
        return x / inputs_max

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps the network was trained with (differs from t after respacing)."""
        return torch.from_numpy(self.timestep_map).to(t.device)[t]

    def predict_xstart(
        self, model_output: torch.Tensor, x_t: torch.Tensor, y: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Turn the network's output into a prediction of x0, whatever it was trained to predict."""
        if self.predict_type == "xstart":
            return model_output
        if self.predict_type == "residual":
            return y - model_output
        # epsilon: x_t = x0 + eta (y - x0) + kappa sqrt(eta) eps, solved for x0.
        sqrt_eta = self._gather(self.sqrt_etas, t, x_t)
        eta = self._gather(self.etas, t, x_t)
        return (x_t - eta * y - self.kappa * sqrt_eta * model_output) / (1 - eta)

    # ----- reverse process -------------------------------------------------------------------
    def step(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        clip_denoised: bool = False,
    ) -> StepOutput:
        """One reverse step x_t -> x_{t-1} from the network's output at (x_t, t): predict x0, take
        the posterior mean, add ``noise`` scaled by the posterior deviation unless t = 0."""
        pred_xstart = self.predict_xstart(model_output.to(x_t.dtype), x_t, y, t)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean = self.q_posterior_mean(pred_xstart, x_t, t)
        std = torch.exp(0.5 * self._gather(self.posterior_log_variance_clipped, t, x_t))
        nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return StepOutput(sample=mean + nonzero * std * noise, mean=mean, pred_xstart=pred_xstart)

    # ----- training --------------------------------------------------------------------------
    def training_loss(
        self,
        model: Callable[..., torch.Tensor],
        x_start: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        loss: str = "mse",
    ) -> torch.Tensor:
        """Per-sample loss between the network's target and output at x_t ~ q(x_t | x0, y0).

        ``x_start`` and ``y`` are in diffusion space (latents, or pixels for a pixel-space model).
        ``loss`` is "mse" (upstream's) or "l1" (the mean absolute error, which SR networks trained
        for PSNR often prefer). With ``weighted_mse`` either is weighted per timestep as upstream's
        ELBO weights.
        """
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, y, t, noise)
        output = model(self.scale_input(x_t, t), self.model_timesteps(t), **(model_kwargs or {}))
        if self.predict_type == "xstart":
            target = x_start
        elif self.predict_type == "residual":
            target = y - x_start
        else:
            target = noise
        error = output.float() - target.float()
        per_sample = (error.pow(2) if loss == "mse" else error.abs()).flatten(1).mean(dim=1)
        if self.weighted_mse:
            per_sample = per_sample * self._gather(self.weight_loss_mse, t, per_sample).view(-1)
        return per_sample
