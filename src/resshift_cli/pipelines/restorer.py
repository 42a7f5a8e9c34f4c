"""The restoration core shared by every task: models on a device, the sampler, tiles, seeds.

Task pipelines (super-resolution, inpainting, faces) only prepare the input and finish the
output; everything between an LQ image in [0, 1] and its restoration in [0, 1] happens here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from resshift_cli.diffusion import ResShiftDiffusion
from resshift_cli.models.autoencoder import VQAutoencoder
from resshift_cli.models.unet import UNet
from resshift_cli.pipelines.tiling import auto_tile_size, plan_tiles, run_tiled

ProgressFn = Callable[[int, int], None]


@dataclass
class Restorer:
    """A loaded model ready to restore images on ``device`` with optional autocast ``precision``."""

    unet: UNet
    autoencoder: VQAutoencoder | None
    diffusion: ResShiftDiffusion
    device: torch.device
    precision: torch.dtype | None = None

    def __post_init__(self) -> None:
        self.unet.eval().requires_grad_(False).to(self.device)
        if self.autoencoder is not None:
            self.autoencoder.eval().requires_grad_(False).to(self.device)

    @property
    def scale(self) -> int:
        """Output pixels per input pixel along each axis."""
        return int(self.diffusion.sf)

    @property
    def lq_multiple(self) -> int:
        """Input sizes are padded to a multiple of this, so every latent level fits its windows."""
        # The latent is lq * sf / factor and must be a multiple of the UNet's size multiple.
        factor = self.autoencoder.downsample_factor if self.autoencoder is not None else 1
        need = factor * self.unet.size_multiple
        return need // math.gcd(need, self.scale)

    def bytes_per_lq_pixel(self) -> float:
        """A generous estimate of peak working memory per input pixel of one tile."""
        elem = 4 if self.precision is None else 2
        if self.autoencoder is not None:
            cfg = self.autoencoder.ddconfig
            full_res_channels = cfg["ch"] * cfg["ch_mult"][0]
        else:
            full_res_channels = self.unet.model_channels * self.unet.channel_mult[0]
        return self.scale**2 * full_res_channels * elem * 6.0

    def choose_tile(self, tile: int | None) -> int:
        """The tile to use: the user's, else the largest that fits the free memory of the device."""
        if tile is not None:
            return max(self.lq_multiple, tile)
        m = self.lq_multiple
        return auto_tile_size(self.device, self.bytes_per_lq_pixel(), m, m, max(m, 4 * m) if m >= 64 else 256)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision)

    def _noise(self, indices: list[int], seed: int, latent_shape: tuple[int, ...]) -> list[torch.Tensor]:
        """Per-tile draws from a CPU generator seeded ``seed + tile index``, in upstream's order.

        Drawing on the CPU keeps results identical across devices and batch sizes; a one-tile
        run draws exactly what ``diffusion.sample(..., generator=manual_seed(seed))`` draws.
        """
        per_tile = []
        for index in indices:
            gen = torch.Generator().manual_seed(seed + index)
            per_tile.append(
                [torch.randn(latent_shape, generator=gen) for _ in range(self.diffusion.num_timesteps + 1)]
            )
        return [torch.stack(step).to(self.device) for step in zip(*per_tile, strict=True)]

    def _latent_shape(self, h: int, w: int) -> tuple[int, ...]:
        if self.autoencoder is None:
            return (3, h * self.scale, w * self.scale)
        f = self.autoencoder.downsample_factor
        return (self.autoencoder.embed_dim, h * self.scale // f, w * self.scale // f)

    def restore(
        self,
        image: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        seed: int = 12345,
        tile: int | None = None,
        overlap: int = 16,
        batch_size: int = 1,
        on_progress: ProgressFn | None = None,
    ) -> torch.Tensor:
        """Restore ``image`` (1 x 3 x H x W in [0, 1]); returns 1 x 3 x sH x sW in [0, 1] on the CPU.

        ``mask`` (1 x 1 x H x W, 1 = hole) conditions inpainting models. Tiles are ``tile`` input
        pixels (automatic when None) overlapping by ``overlap``; ``on_progress(done, total)``
        counts sampler steps over all tiles.
        """
        tile_size = self.choose_tile(tile)
        padded_h = -(-image.shape[-2] // self.lq_multiple) * self.lq_multiple
        padded_w = -(-image.shape[-1] // self.lq_multiple) * self.lq_multiple
        single = tile_size >= padded_h and tile_size >= padded_w
        overlap = 0 if single else min(overlap, tile_size - self.lq_multiple)
        n_tiles = 1 if single else len(plan_tiles(padded_h, padded_w, tile_size, overlap))
        steps = self.diffusion.num_timesteps
        total = math.ceil(n_tiles / batch_size) * steps
        done = 0

        def on_step(_k: int, _n: int) -> None:
            nonlocal done
            done += 1
            if on_progress is not None:
                on_progress(done, total)

        def restore_tiles(
            tiles: torch.Tensor, extras: tuple[torch.Tensor, ...], indices: list[int]
        ) -> torch.Tensor:
            lq = (tiles.to(self.device, torch.float32) * 2 - 1).contiguous()
            tile_mask = extras[0].to(self.device, torch.float32) * 2 - 1 if extras else None
            noise = self._noise(indices, seed, self._latent_shape(*lq.shape[-2:]))
            with torch.inference_mode(), self._autocast():
                out = self.diffusion.sample(
                    lq, self.unet, self.autoencoder, mask=tile_mask, noise=noise, on_step=on_step
                )
            return ((out.float().clamp(-1, 1) + 1) / 2).cpu()

        extras = (mask,) if mask is not None else ()
        return run_tiled(
            restore_tiles,
            image,
            scale=self.scale,
            tile=None if single else tile_size,
            overlap=overlap,
            multiple=self.lq_multiple,
            batch_size=batch_size,
            extras=extras,
            out_device="cpu",
        )
