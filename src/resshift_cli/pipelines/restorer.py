"""The restoration core shared by every task: models on a device, the sampler, tiles, seeds.

Task pipelines (super-resolution, inpainting, faces) only prepare the input and finish the
output; everything between an LQ image in [0, 1] and its restoration in [0, 1] happens here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from resshift_cli.diffusion import Denoiser, ResShiftDiffusion
from resshift_cli.models import set_fast_paths
from resshift_cli.models.autoencoder import VQAutoencoder
from resshift_cli.models.unet import UNet
from resshift_cli.pipelines.tiling import (
    auto_tile_size,
    free_memory_bytes,
    largest_fitting_tile,
    pad_to_multiple,
    plan_tiles,
    run_tiled,
)

ProgressFn = Callable[[int, int], None]


@dataclass
class Restorer:
    """A loaded model ready to restore images on ``device`` with optional autocast ``precision``.

    ``optimize`` (on by default) turns on channels_last and the models' inference shortcuts;
    off, it is the plain eager computation that the benchmark compares against. ``unet_memory``
    caps the network's estimated working memory in bytes (None: :attr:`UNET_MEMORY`); a latent
    whose estimate exceeds it runs through the network in tiles at every step.
    """

    unet: UNet
    autoencoder: VQAutoencoder | None
    diffusion: ResShiftDiffusion
    device: torch.device
    precision: torch.dtype | None = None
    optimize: bool = True
    unet_memory: float | None = None

    UNET_MEMORY: ClassVar[float] = 1.5 * 2**30
    """Default cap on the network's estimated working memory (16 KB per latent pixel in fp32):
    realsr-v3 runs whole up to a 1024x1024 output (a 256x256 latent, 1 GiB); beyond, the network
    runs in tiles at every step, so peak memory stops growing with the image. At 2048x2048 its
    9 tiles of 192x192 do 1.27x the work of the whole 512x512 latent yet run no slower on the CPU
    (one step 45.5 s against 46.8 s): their tensors stay in the allocator's heap instead of being
    mapped and page-faulted afresh (docs/PERFORMANCE.md)."""

    AE_TILE: ClassVar[int] = 72
    """Autoencoder tile side in latent pixels when the user names none. The global attention in
    the autoencoder's middle costs in proportion to a tile's area per pixel: at 72 about as much
    per pixel as in a single 256x256 output (64 latent pixels), where it is a tenth of the
    encoder's work and a twentieth of the decoder's; at 96 twice that, at 256 sixteen times."""

    @staticmethod
    def layout(optimize: bool = True) -> torch.memory_format:
        """The weights' memory format: channels_last lets oneDNN/cuDNN run the convolutions
        without layout conversions."""
        return torch.channels_last if optimize else torch.contiguous_format

    def __post_init__(self) -> None:
        layout = self.layout(self.optimize)
        for model in (self.unet, self.autoencoder):
            if model is not None:
                model.eval().requires_grad_(False).to(self.device, memory_format=layout)
                set_fast_paths(model, self.optimize)

    @property
    def scale(self) -> int:
        """Output pixels per input pixel along each axis."""
        return int(self.diffusion.sf)

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel along each axis (1 for a pixel-space model)."""
        return self.autoencoder.downsample_factor if self.autoencoder is not None else 1

    @property
    def lq_multiple(self) -> int:
        """Input sizes are padded to a multiple of this, so every latent level fits its windows."""
        # The latent is lq * sf / factor and must be a multiple of the UNet's size multiple.
        need = self.factor * self.unet.size_multiple
        return need // math.gcd(need, self.scale)

    def bytes_per_lq_pixel(self) -> float:
        """A generous estimate of peak working memory per input pixel of one tile."""
        elem = 4 if self.precision is None else 2
        if self.autoencoder is not None:
            cfg = self.autoencoder.ddconfig
            full_res_channels = cfg["ch"] * cfg["ch_mult"][0]
        else:
            # A folded network's widest maps hold 1/r^2 of the pixels; x_t, y0, the noise and the
            # output stay at the image's size (at least 16 channels' worth).
            folded = self.unet.model_channels * self.unet.channel_mult[0] / self.unet.pixel_unshuffle**2
            full_res_channels = max(folded, 16.0)
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
            gen = torch.Generator().manual_seed((seed + index) % 2**64)
            per_tile.append(
                [torch.randn(latent_shape, generator=gen) for _ in range(self.diffusion.num_timesteps + 1)]
            )
        return [torch.stack(step).to(self.device) for step in zip(*per_tile, strict=True)]

    def _latent_shape(self, h: int, w: int) -> tuple[int, ...]:
        channels = self.autoencoder.embed_dim if self.autoencoder is not None else 3
        return (channels, h * self.scale // self.factor, w * self.scale // self.factor)

    def unet_bytes_per_latent_pixel(self) -> float:
        """A generous estimate of the UNet's peak memory per latent pixel (skips, Swin, attention)."""
        elem = 4 if self.precision is None else 2
        return 4096.0 * elem

    def unet_tile(self, latent_h: int, latent_w: int, overlap: int) -> int | None:
        """The network's tile side in latent pixels for this latent, or None to run it whole.

        The budget is ``unet_memory`` (or :attr:`UNET_MEMORY`), and never more than half the
        device's free memory. Of the tile sides that fit it (multiples of the network's size
        multiple), the one whose plan covers the fewest pixels with ``overlap``, the largest of
        equals: tiles are rounded up to that multiple, so the largest side can cost far more.
        """
        per_pixel = self.unet_bytes_per_latent_pixel()
        cap = self.UNET_MEMORY if self.unet_memory is None else self.unet_memory
        budget = min(cap, 0.5 * free_memory_bytes(self.device))
        if latent_h * latent_w * per_pixel <= budget:
            return None
        m = self.unet.size_multiple
        largest = largest_fitting_tile(budget, per_pixel, m, m, max(m, latent_h, latent_w))

        def work(side: int) -> int:
            plan = plan_tiles(latent_h, latent_w, side, min(overlap, side // 2), m)
            return len(plan) * plan[0].h * plan[0].w

        return min(range(largest, 0, -m), key=work)

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

        ``mask`` (1 x 1 x H x W, 1 = hole) conditions inpainting models. An image that fits one
        tile (``tile`` input pixels, automatic when None) is restored in a single pass, exactly as
        ``diffusion.sample`` with ``generator=manual_seed(seed)``. A larger one is encoded and
        decoded in overlapping tiles while the chain runs once over its whole latent: the network
        on the whole latent when it fits :meth:`unet_tile`'s budget, else in overlapping tiles at
        every step, so memory stays bounded at any size. Models without such a latent (pixel
        space, or a latent smaller than the input) run the whole chain per tile, each tile drawing
        its noise from ``seed + tile index``. ``on_progress(done, total)`` counts tiles and steps.
        """
        height, width = image.shape[-2:]
        tile_size = self.choose_tile(tile)
        m = self.lq_multiple
        padded_h, padded_w = -(-height // m) * m, -(-width // m) * m
        progress = _Counter(on_progress)
        factor = self.factor
        latent_path = self.autoencoder is not None and self.scale % factor == 0
        single = tile_size
        if latent_path:
            # The autoencoder's global attention grows with the square of a tile's area, so its
            # tiles stay near AE_TILE latent pixels unless the user chose a tile.
            single = tile if tile is not None else min(tile_size, self.AE_TILE * factor // self.scale)
        if single >= padded_h and single >= padded_w:
            progress.total = self.diffusion.num_timesteps
            return self._whole_chain_tiles(image, mask, seed, None, 0, 1, progress)
        if latent_path:
            return self._latent_chain(image, mask, seed, single, overlap, batch_size, progress)
        overlap = min(overlap, tile_size // 2)
        n_tiles = len(plan_tiles(padded_h, padded_w, tile_size, overlap, m))
        progress.total = math.ceil(n_tiles / batch_size) * self.diffusion.num_timesteps
        return self._whole_chain_tiles(image, mask, seed, tile_size, overlap, batch_size, progress)

    def _whole_chain_tiles(
        self,
        image: torch.Tensor,
        mask: torch.Tensor | None,
        seed: int,
        tile: int | None,
        overlap: int,
        batch_size: int,
        progress: _Counter,
    ) -> torch.Tensor:
        """Run the whole pipeline (encode, chain, decode) per tile; one tile is the single pass."""

        def restore_tiles(
            tiles: torch.Tensor, extras: tuple[torch.Tensor, ...], indices: list[int]
        ) -> torch.Tensor:
            lq = (tiles.to(self.device, torch.float32) * 2 - 1).contiguous()
            tile_mask = extras[0].to(self.device, torch.float32) * 2 - 1 if extras else None
            noise = self._noise(indices, seed, self._latent_shape(*lq.shape[-2:]))
            with torch.inference_mode(), self._autocast():
                out = self.diffusion.sample(
                    lq, self.unet, self.autoencoder, mask=tile_mask, noise=noise, on_step=progress.step
                )
            return _to_unit(out)

        return run_tiled(
            restore_tiles,
            image,
            scale=self.scale,
            tile=tile,
            overlap=overlap,
            multiple=self.lq_multiple,
            batch_size=batch_size,
            extras=(mask,) if mask is not None else (),
            out_device="cpu",
        )

    def _latent_chain(
        self,
        image: torch.Tensor,
        mask: torch.Tensor | None,
        seed: int,
        tile: int,
        overlap: int,
        batch_size: int,
        progress: _Counter,
    ) -> torch.Tensor:
        """Encode and decode in tiles, run the chain once over the whole latent.

        The network is the costly part to tile (its tiles must be multiples of its windows and
        overlap generously), so it runs whole when it fits its budget and in tiles of the latent
        at every step otherwise; the autoencoder only needs a few latent pixels of overlap.
        """
        assert self.autoencoder is not None
        autoencoder = self.autoencoder
        factor = autoencoder.downsample_factor
        height, width = image.shape[-2:]
        lq, _ = pad_to_multiple(image, self.lq_multiple)
        lq = (lq.to(self.device, torch.float32) * 2 - 1).contiguous()
        mask_pm = None
        if mask is not None:
            mask_pm = pad_to_multiple(mask, self.lq_multiple)[0].to(self.device, torch.float32) * 2 - 1
        latent_scale = self.scale // factor
        latent_tile = max(1, tile * latent_scale)
        latent_h, latent_w = lq.shape[-2] * latent_scale, lq.shape[-1] * latent_scale
        unet_tile = self.unet_tile(latent_h, latent_w, overlap * latent_scale)
        unet_overlap = 0 if unet_tile is None else min(overlap * latent_scale, unet_tile // 2)
        unet_calls = 1
        if unet_tile is not None:
            unet_tiles = plan_tiles(latent_h, latent_w, unet_tile, unet_overlap, self.unet.size_multiple)
            unet_calls = math.ceil(len(unet_tiles) / batch_size)
        # The autoencoder's tiles overlap by a quarter of the chain's overlap (4 latent pixels, 16
        # output pixels, by default) and are blended over it with a raised-cosine ramp; each latent
        # pixel of overlap costs about 3% more autoencoder work at 2048x2048. Overlaps are capped
        # at half a tile: more would multiply the tiles, not improve blending.
        overlap = min(overlap // 4, tile // 2)
        latent_overlap = min(overlap * latent_scale, latent_tile // 2)
        enc_tiles = len(plan_tiles(*lq.shape[-2:], tile, overlap))
        dec_tiles = len(plan_tiles(latent_h, latent_w, latent_tile, latent_overlap))
        steps = self.diffusion.num_timesteps
        progress.total = (
            math.ceil(enc_tiles / batch_size) + steps * unet_calls + math.ceil(dec_tiles / batch_size)
        )
        network: Denoiser = self.unet
        if unet_tile is not None:
            network = TiledNetwork(self.unet, unet_tile, unet_overlap, batch_size, progress.step)

        def encode(tiles: torch.Tensor, _extras: tuple[torch.Tensor, ...], _idx: list[int]) -> torch.Tensor:
            with torch.inference_mode(), self._autocast():
                z = self.diffusion.encode(self.diffusion.upsample(tiles), autoencoder).float()
            progress.step()
            return z

        def decode(tiles: torch.Tensor, _extras: tuple[torch.Tensor, ...], _idx: list[int]) -> torch.Tensor:
            with torch.inference_mode(), self._autocast():
                out = self.diffusion.decode(tiles, autoencoder)
            progress.step()
            return out.float().clamp(-1, 1)

        with torch.inference_mode():
            z_y = run_tiled(
                encode,
                lq,
                scale=latent_scale,
                tile=tile,
                overlap=overlap,
                multiple=1,
                batch_size=batch_size,
            )
            noise = self._noise([0], seed, tuple(z_y.shape[1:]))
            with self._autocast():
                latent = self.diffusion.reverse(
                    z_y,
                    network,
                    lq=lq,
                    mask=mask_pm,
                    noise=noise,
                    on_step=progress.step if unet_tile is None else None,
                ).float()
            out = run_tiled(
                decode,
                latent,
                scale=factor,
                tile=latent_tile,
                overlap=latent_overlap,
                multiple=1,
                batch_size=batch_size,
                out_device="cpu",
            )
        return _to_unit(out[..., : height * self.scale, : width * self.scale])


class TiledNetwork:
    """A denoiser that runs ``unet`` in overlapping tiles of its input and blends the outputs.

    Only the network's call is tiled: the sampler's arithmetic and noise stay on the whole
    latent, so the tiles meet again at every step instead of running separate chains, and the
    network's memory is that of one batch of tiles. The conditioning (``lq``, ``mask``) must have
    the latent's size; it is cut at the same places. ``on_call`` runs after each batch of tiles.
    """

    def __init__(
        self,
        unet: UNet,
        tile: int,
        overlap: int,
        batch_size: int = 1,
        on_call: Callable[[], None] | None = None,
    ) -> None:
        self.unet, self.tile, self.overlap = unet, tile, overlap
        self.batch_size, self.on_call = batch_size, on_call

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, *, lq: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The network's output for the whole ``x`` (1 x C x H x W), assembled from tiles."""
        extras = (lq,) if mask is None else (lq, mask)

        def run(tiles: torch.Tensor, cut: tuple[torch.Tensor, ...], _indices: list[int]) -> torch.Tensor:
            kwargs = {"lq": cut[0]} if mask is None else {"lq": cut[0], "mask": cut[1]}
            out = self.unet(tiles, t[:1].expand(len(tiles)), **kwargs)
            if self.on_call is not None:
                self.on_call()
            return out

        return run_tiled(
            run,
            x,
            scale=1,
            tile=self.tile,
            overlap=self.overlap,
            multiple=self.unet.size_multiple,
            batch_size=self.batch_size,
            extras=extras,
        )


class _Counter:
    """Counts units of work done and reports ``(done, total)``."""

    def __init__(self, callback: ProgressFn | None) -> None:
        self.callback = callback
        self.done = 0
        self.total = 0

    def step(self, *_: int) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, max(self.total, self.done))


def _to_unit(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] on the CPU, in float32."""
    return ((image.float().clamp(-1, 1) + 1) / 2).cpu()
