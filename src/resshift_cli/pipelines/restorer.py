"""The restoration core shared by every task: a model on a device, the chain, tiles, seeds, memory.

Task pipelines (super-resolution, inpainting, faces) only prepare the input and finish the
output; everything between an LQ image in [0, 1] and its restoration in [0, 1] happens here.
One composition, :meth:`Restorer.sample` (upsample and encode, the chain, decode), is upstream's
computation; the tiled paths run its three stages over tiles of the image and of its latent.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from resshift_cli import sampler
from resshift_cli.models import set_fast_paths
from resshift_cli.models.unet import UNet
from resshift_cli.pipelines.latent import LatentSpace
from resshift_cli.pipelines.options import DEFAULT_OPTIONS, RunOptions
from resshift_cli.pipelines.tiling import (
    free_memory_bytes,
    largest_fitting_tile,
    pad_to_multiple,
    plan_tiles,
    run_tiled,
)
from resshift_cli.scheduler import ResShiftScheduler

ProgressFn = Callable[[int, int], None]
NoticeFn = Callable[[str], None]

OUT_OF_MEMORY = (torch.cuda.OutOfMemoryError,)
"""What a device raises when an allocation does not fit (CUDA; the class exists on every build)."""


@dataclass
class Restorer:
    """A loaded model ready to restore images on ``device`` with optional autocast ``precision``.

    ``sample_steps`` is how many network calls the model samples with (None: every step of its
    schedule; 1 for a model distilled into one step). ``optimize`` (on by default) turns on
    channels_last and the models' inference shortcuts; off, it is the plain eager computation the
    benchmarks compare against. ``unet_memory`` caps the network's estimated working memory in
    bytes (None: :attr:`UNET_MEMORY`); a latent whose estimate exceeds it runs through the network
    in tiles at every step.
    """

    unet: UNet
    scheduler: ResShiftScheduler
    latent: LatentSpace
    device: torch.device
    precision: torch.dtype | None = None
    sample_steps: int | None = None
    optimize: bool = True
    unet_memory: float | None = None
    fallback_device: torch.device | None = field(default=None, init=False)
    """Where an image goes when even the smallest tiles do not fit the device: the CPU for a GPU."""

    UNET_MEMORY: ClassVar[float] = 1.5 * 2**30
    """Default cap on the network's estimated working memory: realsr-v3 runs whole up to a
    1024x1024 output; beyond, in tiles at every step, so peak memory stops growing with the image."""

    AE_TILE: ClassVar[dict[str, int]] = {"cpu": 72, "cuda": 256}
    """Largest autoencoder tile side in latent pixels by device type when the user names none. The
    autoencoder's global attention costs in proportion to a tile's area per pixel, which the CPU
    feels at once and a GPU's attention kernels absorb up to far larger tiles; below these, free
    memory decides."""

    MEMORY_FRACTION: ClassVar[float] = 0.5
    """Share of the device's free memory that the working memory of one forward pass may take."""

    @staticmethod
    def layout(optimize: bool = True, device_type: str = "cuda") -> torch.memory_format:
        """The weights' memory format on a device type: channels_last where it lets cuDNN run the
        convolutions in its NHWC kernels without layout conversions; the CPU runs no faster with it
        (docs/PERFORMANCE.md), and laying the weights out costs start-up time."""
        return torch.channels_last if optimize and device_type != "cpu" else torch.contiguous_format

    def __post_init__(self) -> None:
        self.fallback_device = None if self.device.type == "cpu" else torch.device("cpu")
        layout = self.layout(self.optimize, self.device.type)
        for model in self._models():
            model.eval().requires_grad_(False)
            _place(model, self.device, layout)
            set_fast_paths(model, self.optimize)

    def _models(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.latent.autoencoder) if m is not None]

    @property
    def scale(self) -> int:
        """Output pixels per input pixel along each axis."""
        return self.latent.sf

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel along each axis (1 for a pixel-space model)."""
        return self.latent.factor

    @property
    def lq_multiple(self) -> int:
        """Input sizes are padded to a multiple of this, so every latent level fits its windows."""
        # The latent is lq * sf / factor and must be a multiple of the UNet's size multiple.
        need = self.factor * self.unet.size_multiple
        return need // math.gcd(need, self.scale)

    @property
    def noise_draws(self) -> int:
        """Standard-normal draws one chain takes (see :func:`sampler.noise_draws`)."""
        return sampler.noise_draws(self.scheduler, self.sample_steps)

    # ----- memory -------------------------------------------------------------------------------
    def _element_bytes(self) -> int:
        return 4 if self.precision is None else 2

    def bytes_per_lq_pixel(self) -> float:
        """A generous estimate of peak working memory per input pixel of one tile."""
        autoencoder = self.latent.autoencoder
        if autoencoder is not None:
            cfg = autoencoder.ddconfig
            full_res_channels = cfg["ch"] * cfg["ch_mult"][0]
        else:
            # A folded network's widest maps hold 1/r^2 of the pixels; x_t, y0, the noise and the
            # output stay at the image's size (at least 16 channels' worth).
            folded = self.unet.model_channels * self.unet.channel_mult[0] / self.unet.pixel_unshuffle**2
            full_res_channels = max(folded, 16.0)
        return self.scale**2 * full_res_channels * self._element_bytes() * 6.0

    def unet_bytes_per_latent_pixel(self) -> float:
        """A generous estimate of the UNet's peak memory per latent pixel (skips, Swin, attention)."""
        return 4096.0 * self._element_bytes()

    def _budget(self) -> float:
        """Memory one forward pass may use: a share of what the device has free."""
        return self.MEMORY_FRACTION * free_memory_bytes(self.device)

    def choose_tile(self, tile: int | None, batch_size: int = 1) -> int:
        """The tile side in input pixels: the user's, else the largest whose working memory, for
        ``batch_size`` tiles at a time, fits the device's free memory."""
        m = self.lq_multiple
        if tile is not None:
            return max(m, tile)
        per_pixel = self.bytes_per_lq_pixel() * batch_size
        return largest_fitting_tile(self._budget(), per_pixel, m, m, max(m, 4 * m) if m >= 64 else 256)

    def autoencoder_tile(self, tile: int | None, batch_size: int = 1) -> int:
        """The autoencoder's tile side in input pixels: the user's, else the memory-fitting tile
        capped at :attr:`AE_TILE` latent pixels for this device type."""
        if tile is not None:
            return max(self.lq_multiple, tile)
        cap = self.AE_TILE.get(self.device.type, self.AE_TILE["cpu"])
        fitting = self.choose_tile(None, batch_size)
        return max(self.lq_multiple, min(fitting, cap * self.factor // self.scale))

    def unet_tile(
        self, latent_h: int, latent_w: int, overlap: int, batch_size: int = 1, shrink: int = 0
    ) -> int | None:
        """The network's tile side in latent pixels for this latent, or None to run it whole.

        The budget is ``unet_memory`` (or :attr:`UNET_MEMORY`), and never more than the share of
        the device's free memory a pass may take, divided among ``batch_size`` tiles. Retry
        ``shrink`` after running out of memory quarters the budget (from at most the whole
        latent's estimate) ``shrink`` times, so the tiles halve at every attempt. Of the tile
        sides that fit it (multiples of the network's size multiple), the one whose plan covers the
        fewest pixels with ``overlap``, the largest of equals: tiles are rounded up to that
        multiple, so the largest side can cost far more.
        """
        per_pixel = self.unet_bytes_per_latent_pixel()
        cap = self.UNET_MEMORY if self.unet_memory is None else self.unet_memory
        if shrink:
            cap = min(cap, latent_h * latent_w * per_pixel) / 4**shrink
        budget = min(cap, self._budget()) / batch_size
        if latent_h * latent_w * per_pixel <= budget:
            return None
        m = self.unet.size_multiple
        largest = largest_fitting_tile(budget, per_pixel, m, m, max(m, latent_h, latent_w))

        def work(side: int) -> int:
            plan = plan_tiles(latent_h, latent_w, side, min(overlap, side // 2), m)
            return len(plan) * plan[0].h * plan[0].w

        return min(range(largest, 0, -m), key=work)

    # ----- the composition ----------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to ``precision`` on this device, or nothing for fp32."""
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision)

    def encode(self, lq: torch.Tensor) -> torch.Tensor:
        """LQ in [-1, 1] -> the chain's start z_y: upsampled and encoded (float32)."""
        return self.latent.encode(self.latent.upsample(lq)).float()

    def chain(
        self,
        z_y: torch.Tensor,
        lq: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        noise: Sequence[torch.Tensor],
        network: sampler.Denoiser | None = None,
        on_step: sampler.StepCallback | None = None,
    ) -> torch.Tensor:
        """The reverse chain from z_y, the network conditioned on ``lq`` (and ``mask``)."""
        cond = {"lq": self.latent.network_lq(lq)}
        if mask is not None:
            cond["mask"] = mask
        return sampler.sample(
            self.scheduler,
            network or self.unet,
            z_y,
            iter(noise),
            cond=cond,
            steps=self.sample_steps,
            clip_denoised=self.latent.autoencoder is None,
            on_step=on_step,
        ).float()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """The chain's result -> image in [-1, 1] (not clamped, float32)."""
        return self.latent.decode(latent).float()

    def sample(
        self,
        lq: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        noise: Sequence[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        on_step: sampler.StepCallback | None = None,
    ) -> torch.Tensor:
        """Upstream's single pass: ``lq`` (N x 3 x H x W in [-1, 1], on the device) upsampled and
        encoded, the chain, decoded; the result is not clamped.

        ``noise`` gives the draws in the order of upstream's reference data (:attr:`noise_draws`
        of them), else they come from ``generator``. ``mask`` (N x 1 x H x W, +1 = hole, -1 =
        keep) conditions inpainting models.
        """
        with torch.inference_mode(), self.autocast():
            z_y = self.encode(lq)
            if noise is None:
                noise = sampler.gaussian_noise(z_y, self.noise_draws, generator)
            latent = self.chain(z_y, lq, mask=mask, noise=noise, on_step=on_step)
            return self.decode(latent)

    # ----- whole images -------------------------------------------------------------------------
    def restore(
        self,
        image: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        options: RunOptions = DEFAULT_OPTIONS,
        on_progress: ProgressFn | None = None,
        on_notice: NoticeFn | None = None,
    ) -> torch.Tensor:
        """Restore ``image`` (N x 3 x H x W in [0, 1]); returns N x 3 x sH x sW in [0, 1] on the CPU.

        ``mask`` (N x 1 x H x W, 1 = hole) conditions inpainting models. Images that fit one tile
        (``options.tile`` input pixels, automatic when None) go through :meth:`sample` in one
        pass, ``options.batch_size`` of them at a time, each exactly as ``sample`` with
        ``generator=manual_seed(seed)``. A larger one is encoded and decoded in overlapping tiles
        while the chain runs once over its whole latent: the network on the whole latent when it
        fits :meth:`unet_tile`'s budget, else in overlapping tiles at every step, so memory stays
        bounded at any size. Models without such a latent (pixel space, or a latent smaller than
        the input) run the whole chain per tile, each tile drawing its noise from ``seed + tile
        index``. ``on_progress(done, total)`` counts tiles and steps.

        When the device runs out of memory, the image is restored again with smaller tiles, then
        on the CPU when nothing fits; ``on_notice`` is told which, in one line.
        """
        shrink = 0
        while True:
            try:
                return self._restore(image, mask, options, shrink, on_progress)
            except OUT_OF_MEMORY:
                self._release_memory()
                shrink += 1
                smaller = self._plan_tile(image, options, shrink)
                if smaller is None and self.fallback_device is None:
                    raise
            if smaller is not None:
                if on_notice is not None:
                    on_notice(f"out of {self.device.type} memory; retrying with tiles of {smaller} pixels")
                continue
            assert self.fallback_device is not None
            if on_notice is not None:
                on_notice(
                    f"out of {self.device.type} memory even with the smallest tiles; "
                    f"restoring on the {self.fallback_device.type.upper()}"
                )
            with self.moved_to(self.fallback_device):
                return self._restore(image, mask, options, 0, on_progress)

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def moved_to(self, device: torch.device) -> Iterator[None]:
        """Run with the models (and autocast) on ``device`` for a while, then move them back."""
        home, precision = self.device, self.precision
        try:
            for model in self._models():
                model.to(device)
            self.device = device
            if device.type == "cpu" and precision == torch.float16:
                self.precision = None  # CPU fp16 autocast is many times slower than fp32
            yield
        finally:
            self.device, self.precision = home, precision
            for model in self._models():
                model.to(home)

    def _plan_tile(self, image: torch.Tensor, options: RunOptions, shrink: int) -> int | None:
        """The tile side for attempt ``shrink`` (0: the first), or None when no smaller one exists:
        each retry halves the tile that the image was cut into and quarters the network's budget."""
        if shrink == 0:
            return None
        m = self.lq_multiple
        height, width = image.shape[-2:]
        first = self._single_tile(options)
        start = min(first, max(-(-height // m), -(-width // m)) * m)
        tile = start >> shrink
        if tile < m:
            return None
        return max(m, tile // m * m)

    def _single_tile(self, options: RunOptions) -> int:
        """The tile that decides between one pass and tiles (the autoencoder's on the latent path)."""
        if self._latent_path():
            return self.autoencoder_tile(options.tile, options.batch_size)
        return self.choose_tile(options.tile, options.batch_size)

    def _latent_path(self) -> bool:
        return self.latent.autoencoder is not None and self.scale % self.factor == 0

    def _restore(
        self,
        image: torch.Tensor,
        mask: torch.Tensor | None,
        options: RunOptions,
        shrink: int,
        on_progress: ProgressFn | None,
    ) -> torch.Tensor:
        height, width = image.shape[-2:]
        m = self.lq_multiple
        padded_h, padded_w = -(-height // m) * m, -(-width // m) * m
        progress = _Counter(on_progress)
        single = self._plan_tile(image, options, shrink) or self._single_tile(options)
        if single >= padded_h and single >= padded_w:
            return self._single_passes(image, mask, options, progress)
        if image.shape[0] > 1:
            # Images too large for one pass are restored one by one, each in tiles.
            parts = [
                self._restore(
                    image[i : i + 1], None if mask is None else mask[i : i + 1], options, shrink, None
                )
                for i in range(image.shape[0])
            ]
            return torch.cat(parts)
        if self._latent_path():
            return self._latent_chain(image, mask, options, single, shrink, progress)
        return self._chain_per_tile(image, mask, options, single, progress)

    def _noise(self, indices: list[int], seed: int, latent_shape: tuple[int, ...]) -> list[torch.Tensor]:
        """Per-tile draws from a CPU generator seeded ``seed + tile index`` (mod 2**64), in upstream's
        order. Drawing on the CPU keeps results identical across devices and batch sizes; a
        one-tile run draws exactly what ``sample(..., generator=manual_seed(seed))`` draws."""
        per_tile = []
        for index in indices:
            gen = torch.Generator().manual_seed((seed + index) % 2**64)
            per_tile.append([torch.randn(latent_shape, generator=gen) for _ in range(self.noise_draws)])
        return [torch.stack(step).to(self.device) for step in zip(*per_tile, strict=True)]

    def latent_shape(self, h: int, w: int) -> tuple[int, ...]:
        """The shape (C, h, w) of the chain's tensors for an LQ image of h x w pixels."""
        return (self.latent.channels, h * self.scale // self.factor, w * self.scale // self.factor)

    def _single_passes(
        self, image: torch.Tensor, mask: torch.Tensor | None, options: RunOptions, progress: _Counter
    ) -> torch.Tensor:
        """Each image in one pass, ``batch_size`` images per forward pass, each with the noise a run
        of that image alone draws (so batching changes nothing but rounding)."""
        height, width = image.shape[-2:]
        count = image.shape[0]
        batches = range(0, count, options.batch_size)
        progress.total = len(batches) * self._steps_per_chain()
        outputs = []
        m = self.lq_multiple
        for first in batches:
            part = slice(first, min(first + options.batch_size, count))
            lq, _ = pad_to_multiple(image[part], m)
            lq = (lq.to(self.device, torch.float32) * 2 - 1).contiguous()
            part_mask = None
            if mask is not None:
                part_mask = pad_to_multiple(mask[part], m)[0].to(self.device, torch.float32) * 2 - 1
            noise = self._noise([0] * lq.shape[0], options.seed, self.latent_shape(*lq.shape[-2:]))
            out = self.sample(lq, mask=part_mask, noise=noise, on_step=progress.step)
            outputs.append(_to_unit(out[..., : height * self.scale, : width * self.scale]))
        return torch.cat(outputs)

    def _steps_per_chain(self) -> int:
        return sampler.network_calls(self.scheduler, self.sample_steps)

    def _chain_per_tile(
        self,
        image: torch.Tensor,
        mask: torch.Tensor | None,
        options: RunOptions,
        tile: int,
        progress: _Counter,
    ) -> torch.Tensor:
        """The whole pipeline (encode, chain, decode) per tile, blended."""
        overlap = min(options.overlap, tile // 2)
        m = self.lq_multiple
        padded = pad_to_multiple(image, m)[0]
        n_tiles = len(plan_tiles(*padded.shape[-2:], tile, overlap, m))
        progress.total = math.ceil(n_tiles / options.batch_size) * self._steps_per_chain()

        def restore_tiles(
            tiles: torch.Tensor, extras: tuple[torch.Tensor, ...], indices: list[int]
        ) -> torch.Tensor:
            lq = (tiles.to(self.device, torch.float32) * 2 - 1).contiguous()
            tile_mask = extras[0].to(self.device, torch.float32) * 2 - 1 if extras else None
            noise = self._noise(indices, options.seed, self.latent_shape(*lq.shape[-2:]))
            return _to_unit(self.sample(lq, mask=tile_mask, noise=noise, on_step=progress.step))

        return run_tiled(
            restore_tiles,
            image,
            scale=self.scale,
            tile=tile,
            overlap=overlap,
            multiple=m,
            batch_size=options.batch_size,
            extras=(mask,) if mask is not None else (),
            out_device="cpu",
        )

    def _latent_chain(
        self,
        image: torch.Tensor,
        mask: torch.Tensor | None,
        options: RunOptions,
        tile: int,
        shrink: int,
        progress: _Counter,
    ) -> torch.Tensor:
        """:meth:`sample`'s three stages with the autoencoder in tiles of the image and of the
        latent, and the chain once over the whole latent.

        The network is the costly part to tile (its tiles must be multiples of its windows and
        overlap generously), so it runs whole when it fits its budget and in tiles of the latent
        at every step otherwise; the autoencoder only needs a few latent pixels of overlap.
        """
        height, width = image.shape[-2:]
        overlap, batch_size = options.overlap, options.batch_size
        lq, _ = pad_to_multiple(image, self.lq_multiple)
        lq = (lq.to(self.device, torch.float32) * 2 - 1).contiguous()
        mask_pm = None
        if mask is not None:
            mask_pm = pad_to_multiple(mask, self.lq_multiple)[0].to(self.device, torch.float32) * 2 - 1
        latent_scale = self.scale // self.factor
        latent_tile = max(1, tile * latent_scale)
        latent_h, latent_w = lq.shape[-2] * latent_scale, lq.shape[-1] * latent_scale
        unet_tile = self.unet_tile(latent_h, latent_w, overlap * latent_scale, batch_size, shrink)
        unet_overlap = 0 if unet_tile is None else min(overlap * latent_scale, unet_tile // 2)
        unet_calls = 1
        if unet_tile is not None:
            unet_tiles = plan_tiles(latent_h, latent_w, unet_tile, unet_overlap, self.unet.size_multiple)
            unet_calls = math.ceil(len(unet_tiles) / batch_size)
        # The autoencoder's tiles overlap by a quarter of the chain's overlap (4 latent pixels, 16
        # output pixels, by default) and are blended over it with a raised-cosine ramp. Overlaps are
        # capped at half a tile: more would multiply the tiles, not improve blending.
        overlap = min(overlap // 4, tile // 2)
        latent_overlap = min(overlap * latent_scale, latent_tile // 2)
        enc_tiles = len(plan_tiles(*lq.shape[-2:], tile, overlap))
        dec_tiles = len(plan_tiles(latent_h, latent_w, latent_tile, latent_overlap))
        progress.total = (
            math.ceil(enc_tiles / batch_size)
            + self._steps_per_chain() * unet_calls
            + math.ceil(dec_tiles / batch_size)
        )
        network: sampler.Denoiser = self.unet
        if unet_tile is not None:
            network = TiledNetwork(self.unet, unet_tile, unet_overlap, batch_size, progress.step)

        def encode(tiles: torch.Tensor, _extras: tuple[torch.Tensor, ...], _idx: list[int]) -> torch.Tensor:
            z = self.encode(tiles)
            progress.step()
            return z

        def decode(tiles: torch.Tensor, _extras: tuple[torch.Tensor, ...], _idx: list[int]) -> torch.Tensor:
            out = self.decode(tiles).clamp(-1, 1)
            progress.step()
            return out

        with torch.inference_mode(), self.autocast():
            z_y = run_tiled(
                encode, lq, scale=latent_scale, tile=tile, overlap=overlap, multiple=1, batch_size=batch_size
            )
            noise = self._noise([0], options.seed, tuple(z_y.shape[1:]))
            latent = self.chain(
                z_y,
                lq,
                mask=mask_pm,
                noise=noise,
                network=network,
                on_step=progress.step if unet_tile is None else None,
            )
            out = run_tiled(
                decode,
                latent,
                scale=self.factor,
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


def _place(model: torch.nn.Module, device: torch.device, layout: torch.memory_format) -> None:
    """Move ``model`` to ``device`` in ``layout`` unless every tensor is there already: weights loaded
    straight onto the device in the layout are not copied again (``Module.to`` would copy 1x1
    kernels, whose strides fit either layout)."""
    tensors = [*model.parameters(), *model.buffers()]
    if any(_misplaced(t, device, layout) for t in tensors):
        model.to(device, memory_format=layout)


def _misplaced(tensor: torch.Tensor, device: torch.device, layout: torch.memory_format) -> bool:
    elsewhere = device.index is not None and tensor.device.index != device.index
    if tensor.device.type != device.type or elsewhere:
        return True
    return tensor.dim() == 4 and not tensor.is_contiguous(memory_format=layout)


def _to_unit(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] on the CPU, in float32."""
    return ((image.float().clamp(-1, 1) + 1) / 2).cpu()
