"""The restoration core: single pass equals the sampler, tiled paths behave, plans stay bounded."""

from __future__ import annotations

import pytest
import torch
from reference import case, reference_path

from resshift_cli import ResShiftDiffusion, UNet, VQAutoencoder
from resshift_cli.checkpoints import load_into, read_state_dict
from resshift_cli.pipelines import restorer as restorer_module
from resshift_cli.pipelines.restorer import Restorer, TiledNetwork
from resshift_cli.pipelines.tiling import plan_tiles


def _tiny_sr(optimize: bool = True) -> Restorer:
    c = case("sr-tiny")
    unet, ae = UNet(**c["unet_params"]), VQAutoencoder(**c["autoencoder_params"])
    load_into(unet, read_state_dict(reference_path("parity", "sr-tiny", "unet.safetensors")))
    load_into(ae, read_state_dict(reference_path("parity", "sr-tiny", "autoencoder.safetensors")))
    return Restorer(
        unet, ae, ResShiftDiffusion(**c["diffusion_params"]), torch.device("cpu"), optimize=optimize
    )


def test_single_pass_is_the_sampler() -> None:
    restorer = _tiny_sr(optimize=False)
    image = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    out = restorer.restore(image, seed=7)
    with torch.inference_mode():
        ref = restorer.diffusion.sample(
            image * 2 - 1, restorer.unet, restorer.autoencoder, generator=torch.Generator().manual_seed(7)
        )
    assert torch.equal(out, (ref.clamp(-1, 1) + 1) / 2)


def test_memory_estimate_of_a_pixel_model_counts_its_folded_maps() -> None:
    params = dict(
        image_size=32, in_channels=3, out_channels=3, model_channels=256, channel_mult=[1, 1],
        num_res_blocks=1, attention_resolutions=[], num_head_channels=32, swin_embed_dim=32,
        window_size=4, cond_lq=True, lq_size=32,
    )  # fmt: skip
    diffusion = ResShiftDiffusion(**case("sr-tiny")["diffusion_params"])
    plain = Restorer(UNet(**params), None, diffusion, torch.device("cpu"))
    folded = Restorer(UNet(**params, pixel_unshuffle=4), None, diffusion, torch.device("cpu"))
    assert folded.bytes_per_lq_pixel() * 16 == plain.bytes_per_lq_pixel()
    # A narrow folded network is bounded below by the image-size tensors.
    narrow = Restorer(
        UNet(**{**params, "model_channels": 32}, pixel_unshuffle=4), None, diffusion, torch.device("cpu")
    )
    assert narrow.bytes_per_lq_pixel() == folded.bytes_per_lq_pixel()


def test_optimised_and_plain_agree() -> None:
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    fast, plain = _tiny_sr(True).restore(image, seed=3), _tiny_sr(False).restore(image, seed=3)
    assert (fast - plain).abs().max() < 1e-4


def _count_calls(restorer: Restorer) -> dict[str, int]:
    """Count the restorer's encode, decode and network calls from now on."""
    calls = {"encode": 0, "decode": 0, "unet": 0}
    for name, obj, attr in (
        ("encode", restorer.autoencoder, "encode"),
        ("decode", restorer.autoencoder, "decode"),
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
    out = restorer.restore(image, seed=1, tile=16, overlap=64, on_progress=lambda d, t: seen.append((d, t)))
    assert out.shape == (1, 3, 256, 256) and torch.isfinite(out).all()
    assert calls["unet"] == restorer.diffusion.num_timesteps  # the network runs once per step, whole latent
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


def test_network_runs_in_tiles_when_the_latent_exceeds_its_budget() -> None:
    restorer = _tiny_sr()
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    restorer.unet_memory = 32 * 32 * restorer.unet_bytes_per_latent_pixel()
    calls, seen = _count_calls(restorer), []
    out = restorer.restore(image, seed=1, tile=16, overlap=16, on_progress=lambda d, t: seen.append((d, t)))
    assert out.shape == (1, 3, 256, 256) and torch.isfinite(out).all()
    # A 64x64 latent in tiles of 32 overlapping by 16 latent pixels: 3 x 3 tiles at each step.
    assert calls["unet"] == 9 * restorer.diffusion.num_timesteps
    assert seen[-1][0] == seen[-1][1] == len(seen) == calls["encode"] + calls["decode"] + calls["unet"]
    assert torch.equal(out, restorer.restore(image, seed=1, tile=16, overlap=16))


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
    restorer.restore(image, seed=1, tile=16, overlap=16)
    # 64 input pixels in tiles of 16 overlapping by 4: 5 per axis (by 8, it would take 7).
    assert calls["encode"] == 25
    assert calls["decode"] == 25


def test_batching_tiles_changes_nothing_but_rounding() -> None:
    restorer = _tiny_sr()
    image = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(4))
    one = restorer.restore(image, seed=5, tile=16, overlap=4, batch_size=1)
    three = restorer.restore(image, seed=5, tile=16, overlap=4, batch_size=3)
    assert (one - three).abs().max() < 1e-4


def test_pixel_space_model_larger_than_a_tile() -> None:
    torch.manual_seed(0)
    params = dict(case("sr-tiny")["unet_params"], image_size=64, lq_size=64)
    unet = UNet(**params)
    diffusion = ResShiftDiffusion(**dict(case("sr-tiny")["diffusion_params"], latent_flag=False))
    restorer = Restorer(unet, None, diffusion, torch.device("cpu"))
    out = restorer.restore(torch.rand(1, 3, 10, 12), seed=0, tile=2, overlap=1)
    assert out.shape == (1, 3, 40, 48) and torch.isfinite(out).all()


@pytest.mark.parametrize("size", [(1, 1), (3, 50), (17, 9)])
def test_any_size(size: tuple[int, int]) -> None:
    out = _tiny_sr().restore(torch.rand(1, 3, *size), seed=0)
    assert out.shape == (1, 3, 4 * size[0], 4 * size[1])
