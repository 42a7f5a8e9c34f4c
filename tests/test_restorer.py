"""The restoration core: single pass equals the sampler, tiled paths behave, plans stay bounded,
images share passes, memory decides tiles, and running out of it never reaches the user."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from reference import case
from tinymodels import tiny_restorer

from resshift_cli import ResShiftScheduler, UNet
from resshift_cli.pipelines import restorer as restorer_module
from resshift_cli.pipelines import tiling
from resshift_cli.pipelines.latent import LatentSpace
from resshift_cli.pipelines.options import RunOptions
from resshift_cli.pipelines.restorer import Restorer, TiledNetwork
from resshift_cli.pipelines.tiling import plan_tiles

pytestmark = pytest.mark.shared  # needs ../shared


def _tiny_sr(optimize: bool = True) -> Restorer:
    return tiny_restorer("sr-tiny", optimize=optimize)


def _run(restorer: Restorer, image: torch.Tensor, **options: object) -> torch.Tensor:
    return restorer.restore(image, options=RunOptions(**options))  # type: ignore[arg-type]


def test_single_pass_is_the_sampler() -> None:
    restorer = _tiny_sr(optimize=False)
    image = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    out = _run(restorer, image, seed=7)
    ref = restorer.sample(image * 2 - 1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, (ref.clamp(-1, 1) + 1) / 2)


def _pixel_restorer(unet: UNet) -> Restorer:
    scheduler = ResShiftScheduler(**dict(case("sr-tiny")["diffusion_params"], latent_flag=False))
    return Restorer(unet, scheduler, LatentSpace(None, 4), torch.device("cpu"))


def test_memory_estimate_of_a_pixel_model_counts_its_folded_maps() -> None:
    params = dict(
        image_size=32, in_channels=3, out_channels=3, model_channels=256, channel_mult=[1, 1],
        num_res_blocks=1, attention_resolutions=[], num_head_channels=32, swin_embed_dim=32,
        window_size=4, cond_lq=True, lq_size=32,
    )  # fmt: skip
    plain = _pixel_restorer(UNet(**params))
    folded = _pixel_restorer(UNet(**params, pixel_unshuffle=4))
    assert folded.bytes_per_lq_pixel() * 16 == plain.bytes_per_lq_pixel()
    # A narrow folded network is bounded below by the image-size tensors.
    narrow = _pixel_restorer(UNet(**{**params, "model_channels": 32}, pixel_unshuffle=4))
    assert narrow.bytes_per_lq_pixel() == folded.bytes_per_lq_pixel()


def test_optimised_and_plain_agree() -> None:
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    fast, plain = _run(_tiny_sr(True), image, seed=3), _run(_tiny_sr(False), image, seed=3)
    assert (fast - plain).abs().max() < 1e-4


def _count_calls(restorer: Restorer) -> dict[str, int]:
    """Count the restorer's encode, decode and network calls from now on."""
    calls = {"encode": 0, "decode": 0, "unet": 0}
    for name, obj, attr in (
        ("encode", restorer.latent.autoencoder, "encode"),
        ("decode", restorer.latent.autoencoder, "decode"),
        ("unet", restorer.unet, "forward"),
    ):
        original = getattr(obj, attr)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(obj, attr, counted)
    return calls


def test_whole_latent_path_counts_bounded_tiles() -> None:
    restorer = _tiny_sr()
    calls = _count_calls(restorer)
    seen: list[tuple[int, int]] = []
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    # An overlap far larger than the tile is capped at half a tile: 7 x 7 encoder tiles, not 49 x 49.
    out = restorer.restore(
        image, options=RunOptions(seed=1, tile=16, overlap=64), on_progress=lambda d, t: seen.append((d, t))
    )
    assert out.shape == (1, 3, 256, 256) and torch.isfinite(out).all()
    assert calls["unet"] == restorer.scheduler.num_timesteps  # the network runs once per step, whole latent
    assert calls["encode"] <= 49 and calls["decode"] <= 49
    assert seen[-1][0] == seen[-1][1] == len(seen)


class _Pointwise:
    """A stand-in network whose output at a pixel depends only on that pixel: tiling it blended
    with weights that sum to one must give exactly its whole-image output."""

    size_multiple = 8

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, *, lq: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        assert t.shape == (x.shape[0],)  # one timestep per tile of the batch
        self.calls.append(tuple(x.shape))
        out = x * (t.view(-1, 1, 1, 1) + 1) + 2 * lq
        return out if mask is None else out - mask


@pytest.mark.parametrize("with_mask", [False, True])
def test_tiled_network_assembles_the_whole_output(with_mask: bool) -> None:
    gen = torch.Generator().manual_seed(8)
    x, lq = torch.rand(1, 3, 40, 56, generator=gen), torch.rand(1, 3, 40, 56, generator=gen)
    mask = torch.rand(1, 1, 40, 56, generator=gen) if with_mask else None
    t = torch.tensor([3])
    network, batches = _Pointwise(), []
    tiled = TiledNetwork(network, tile=16, overlap=4, batch_size=2, on_call=lambda: batches.append(1))
    out = tiled(x, t, lq=lq, mask=mask)
    whole = _Pointwise()(x, t, lq=lq, mask=mask)
    assert torch.allclose(out, whole, atol=1e-6)  # lq and mask cut where x is cut, blends sum to 1
    n_tiles = len(plan_tiles(40, 56, 16, 4, 8))
    assert n_tiles > 1 and sum(shape[0] for shape in network.calls) == n_tiles
    assert len(batches) == len(network.calls) == -(-n_tiles // 2)
    assert all(shape[-2:] == (16, 16) for shape in network.calls)


@pytest.mark.slow
def test_network_runs_in_tiles_when_the_latent_exceeds_its_budget() -> None:
    restorer = _tiny_sr()
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    restorer.unet_memory = 32 * 32 * restorer.unet_bytes_per_latent_pixel()
    calls, seen = _count_calls(restorer), []
    out = restorer.restore(
        image, options=RunOptions(seed=1, tile=16, overlap=16), on_progress=lambda d, t: seen.append((d, t))
    )
    assert out.shape == (1, 3, 256, 256) and torch.isfinite(out).all()
    # A 64x64 latent in tiles of 32 overlapping by 16 latent pixels: 3 x 3 tiles at each step.
    assert calls["unet"] == 9 * restorer.scheduler.num_timesteps
    assert seen[-1][0] == seen[-1][1] == len(seen) == calls["encode"] + calls["decode"] + calls["unet"]
    assert torch.equal(out, _run(restorer, image, seed=1, tile=16, overlap=16))


def test_unet_tile_fits_the_budget_with_the_least_work(monkeypatch: pytest.MonkeyPatch) -> None:
    restorer = _tiny_sr()  # network tiles are multiples of 8
    per_pixel = restorer.unet_bytes_per_latent_pixel()
    free = 10**12
    monkeypatch.setattr(restorer_module, "free_memory_bytes", lambda device: free)
    restorer.unet_memory = 64 * 64 * per_pixel
    assert restorer.unet_tile(64, 64, 2) is None  # fits: the whole latent
    # Sides up to 56 fit, but 56 (and 48, 40) plan 2 x 2 tiles of 40, 6400 pixels, where 32 and 24
    # plan 3 x 3 of 24, 5184 pixels: the least work, and of equals the largest side.
    restorer.unet_memory = 64 * 64 * per_pixel - 1
    assert restorer.unet_tile(64, 64, 2) == 32
    restorer.unet_memory = 1.0
    assert restorer.unet_tile(64, 64, 2) == 8  # nothing fits: the smallest tile
    restorer.unet_memory = None  # the default cap, but never more than half the free memory
    assert restorer.unet_tile(256, 256, 16) is None
    assert restorer.unet_tile(512, 512, 16) is not None
    free = 2 * 24 * 24 * per_pixel
    assert restorer.unet_tile(512, 512, 16) == 24


def test_autoencoder_tiles_overlap_by_a_quarter_of_the_overlap() -> None:
    restorer = _tiny_sr()
    calls = _count_calls(restorer)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    _run(restorer, image, seed=1, tile=16, overlap=16)
    # 64 input pixels in tiles of 16 overlapping by 4: 5 per axis (by 8, it would take 7).
    assert calls["encode"] == 25
    assert calls["decode"] == 25


def test_batching_tiles_changes_nothing_but_rounding() -> None:
    restorer = _tiny_sr()
    image = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(4))
    one = _run(restorer, image, seed=5, tile=16, overlap=4, batch_size=1)
    three = _run(restorer, image, seed=5, tile=16, overlap=4, batch_size=3)
    assert (one - three).abs().max() < 1e-4


def test_pixel_space_model_larger_than_a_tile() -> None:
    torch.manual_seed(0)
    params = dict(case("sr-tiny")["unet_params"], image_size=64, lq_size=64)
    restorer = _pixel_restorer(UNet(**params))
    out = _run(restorer, torch.rand(1, 3, 10, 12), seed=0, tile=2, overlap=1)
    assert out.shape == (1, 3, 40, 48) and torch.isfinite(out).all()


@pytest.mark.parametrize("size", [(1, 1), (3, 50), (17, 9)])
def test_any_size(size: tuple[int, int]) -> None:
    out = _run(_tiny_sr(), torch.rand(1, 3, *size), seed=0)
    assert out.shape == (1, 3, 4 * size[0], 4 * size[1])


# Images sharing passes, memory, precision -----------------------------------------------------------


@pytest.mark.parametrize("case_name", ["sr-tiny", "inpaint-tiny", "face-tiny"])
def test_images_of_one_size_share_passes_with_the_one_by_one_result(case_name: str) -> None:
    """Three images (with masks for inpainting) two at a time equal each alone, fp32, to 1e-5."""
    restorer = tiny_restorer(case_name, optimize=True)
    calls = _count_calls(restorer)
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(3, 3, 16, 16, generator=gen)
    masks = None
    if restorer.unet.cond_mask:
        masks = (torch.rand(3, 1, 16, 16, generator=gen) > 0.5).float()
    together = restorer.restore(images, mask=masks, options=RunOptions(seed=9, batch_size=2))
    assert calls["unet"] == 2 * restorer.scheduler.num_timesteps  # passes of 2 and 1 images
    for i in range(3):
        alone = restorer.restore(
            images[i : i + 1], mask=None if masks is None else masks[i : i + 1], options=RunOptions(seed=9)
        )
        assert (together[i : i + 1] - alone).abs().max() < 1e-5


def _as_cuda(restorer: Restorer, monkeypatch: pytest.MonkeyPatch, free: int) -> Restorer:
    """The restorer as its memory planning sees it on a GPU with ``free`` bytes free (only planning:
    nothing is run)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    restorer.device = torch.device("cuda")
    return restorer


def test_tile_sizes_follow_free_gpu_memory_and_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    restorer = _as_cuda(tiny_restorer("sr-tiny"), monkeypatch, free=80 * 2**30)
    m, per_pixel = restorer.lq_multiple, restorer.bytes_per_lq_pixel()
    # Plenty of memory: the largest tile, and the autoencoder's cap for a GPU, not the CPU's 72.
    assert restorer.choose_tile(None) == max(m, 4 * m) if m >= 64 else 256
    assert restorer.autoencoder_tile(None) == min(
        restorer.choose_tile(None), 256 * restorer.factor // restorer.scale
    )
    assert restorer.autoencoder_tile(None) > 72 * restorer.factor // restorer.scale
    # Little memory: the largest tile whose estimate fits half of it, for one tile or four at a time.
    _as_cuda(restorer, monkeypatch, free=int(2 * 48 * 48 * per_pixel))
    assert restorer.choose_tile(None) == 48 // m * m
    assert restorer.choose_tile(None, batch_size=4) == 24 // m * m
    assert restorer.autoencoder_tile(None, batch_size=4) == 24 // m * m
    # The network's budget is shared by the tiles of a batch too.
    per_latent = restorer.unet_bytes_per_latent_pixel()
    _as_cuda(restorer, monkeypatch, free=int(2 * 64 * 64 * per_latent))
    assert restorer.unet_tile(64, 64, 2) is None
    assert restorer.unet_tile(64, 64, 2, batch_size=2) is not None
    # The user's tile is taken as given (rounded up to the model's multiple).
    assert restorer.choose_tile(40, batch_size=4) == max(m, 40)


class _OutOfMemory:
    """Make ``stage`` ("encode", "unet" or "decode") raise CUDA's out-of-memory error on inputs whose
    side exceeds ``limit`` (or on every input while ``always``)."""

    def __init__(self, restorer: Restorer, stage: str, limit: int, always: bool = False) -> None:
        owner = restorer.unet if stage == "unet" else restorer.latent.autoencoder
        name = "forward" if stage == "unet" else stage
        self.original, self.limit, self.always, self.raised = getattr(owner, name), limit, always, 0

        def guarded(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            if self.always or max(x.shape[-2:]) > self.limit:
                self.raised += 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return self.original(x, *args, **kwargs)

        setattr(owner, name, guarded)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "limit"), [("encode", 32), ("unet", 8), ("decode", 8)])
def test_out_of_memory_retries_the_image_with_smaller_tiles(stage: str, limit: int) -> None:
    """Out of memory in any stage: the image is restored again in smaller tiles, with one notice
    per retry, and the result is a complete restoration."""
    restorer = tiny_restorer("sr-tiny", optimize=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    oom = _OutOfMemory(restorer, stage, limit)
    notices: list[str] = []
    out = restorer.restore(image, options=RunOptions(seed=2), on_notice=notices.append)
    assert oom.raised >= 1 and out.shape == (1, 3, 128, 128) and torch.isfinite(out).all()
    assert len(notices) == oom.raised
    assert all(n.startswith("out of cpu memory; retrying with tiles of ") for n in notices)


def test_out_of_memory_with_the_smallest_tiles_goes_to_the_fallback_device() -> None:
    """When nothing fits, the image is restored on the fallback device (the CPU for a GPU), with
    the notice saying so; the result is the fallback device's own."""
    restorer = tiny_restorer("sr-tiny", optimize=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    expected = restorer.restore(image, options=RunOptions(seed=4))
    oom = _OutOfMemory(restorer, "unet", 10**6, always=True)
    fallback = torch.device("cpu")
    restorer.fallback_device = fallback
    home = restorer.device

    def on_fallback(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        oom.always = restorer.device is not fallback  # fits only once moved
        return guarded(x, *args, **kwargs)

    guarded = restorer.unet.forward
    restorer.unet.forward = on_fallback
    notices: list[str] = []
    out = restorer.restore(image, options=RunOptions(seed=4), on_notice=notices.append)
    assert notices[-1] == "out of cpu memory even with the smallest tiles; restoring on the CPU"
    assert torch.equal(out, expected)
    assert restorer.device is home  # the models went back


def test_out_of_memory_on_the_cpu_with_the_smallest_tiles_is_raised() -> None:
    restorer = tiny_restorer("sr-tiny", optimize=True)
    _OutOfMemory(restorer, "unet", 0, always=True)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        restorer.restore(torch.rand(1, 3, 16, 16), options=RunOptions(seed=4))


@pytest.mark.parametrize(("precision", "bound"), [(torch.float16, 0.05), (torch.bfloat16, 0.5)])
def test_half_precisions_on_the_cpu_stay_close_to_fp32(precision: torch.dtype, bound: float) -> None:
    """Autocast in fp16 or bf16 on the CPU runs, and its latent before quantisation lands near
    fp32's (twice the largest difference measured by benchmarks/precision.py on the fixtures; the
    decoded outputs of these random-weight models differ more, where the quantiser picks another
    codebook entry: docs/PERFORMANCE.md)."""
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    full = tiny_restorer("sr-tiny", optimize=True)
    noise = [
        torch.randn(1, *full.latent_shape(16, 16), generator=torch.Generator().manual_seed(i))
        for i in range(5)
    ]

    def latent(restorer: Restorer) -> torch.Tensor:
        with torch.inference_mode(), restorer.autocast():
            return restorer.chain(restorer.encode(image), image, noise=noise)

    difference = (latent(dataclasses.replace(full, precision=precision)) - latent(full)).abs()
    assert 0 < difference.max() < bound


def test_the_tiling_module_reads_free_memory_from_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (123456789, 10**10))
    assert tiling.free_memory_bytes("cuda") == 123456789
