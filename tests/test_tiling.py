"""Tiled processing: padding, the tile plan, smooth blending, batching, extras and tile sizing.

The restoration step is a fake model throughout (interpolation plus tile-dependent terms), so the
tests are exact about what tiling does and run in milliseconds.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from resshift_cli.pipelines import tiling
from resshift_cli.pipelines.tiling import (
    Tile,
    auto_tile_size,
    blend_window,
    free_memory_bytes,
    largest_fitting_tile,
    pad_to_multiple,
    plan_tiles,
    run_tiled,
    tile_memory_bytes,
)


def _nearest(scale):
    """An identity-like model: nearest-neighbour upscaling, local, so tiling must not change it."""

    def fn(x, extras, indices):
        return F.interpolate(x, scale_factor=scale, mode="nearest") if scale > 1 else x.clone()

    return fn


def _smooth_image(height, width, channels=3):
    yy, xx = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    return (
        (0.5 + 0.2 * torch.sin(yy / 9) * torch.cos(xx / 11)).expand(1, channels, height, width).contiguous()
    )


def _max_jump(x):
    """The largest absolute difference between vertically or horizontally neighbouring pixels."""
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().max()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().max()
    return max(dy.item(), dx.item())


# --- padding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (7, 1), (3, 1000), (3, 3), (8, 8), (9, 17), (2, 15)])
@pytest.mark.parametrize("multiple", [8, 16])
def test_pad_to_multiple_any_size(size, multiple):
    x = torch.rand(1, 2, *size)
    padded, (pad_h, pad_w) = pad_to_multiple(x, multiple)
    height, width = size
    assert padded.shape[-2] % multiple == 0 and padded.shape[-1] % multiple == 0
    assert (pad_h, pad_w) == (padded.shape[-2] - height, padded.shape[-1] - width)
    assert 0 <= pad_h < multiple and 0 <= pad_w < multiple
    assert torch.equal(padded[..., :height, :width], x)
    # Padding only repeats existing values of the same channel.
    for c in range(2):
        assert torch.isin(padded[0, c], x[0, c]).all()


def test_pad_is_torch_reflection_when_possible():
    x = torch.rand(1, 3, 9, 13)
    padded, pads = pad_to_multiple(x, 8)
    assert pads == (7, 3)
    assert torch.equal(padded, F.pad(x, (0, 3, 0, 7), mode="reflect"))


def test_pad_reflects_repeatedly_then_replicates():
    row = torch.tensor([[1.0, 2.0, 3.0]])
    padded, _ = pad_to_multiple(row, 8)
    # Row 1 can only be replicated; columns [1 2 3] reflect twice: [1 2 3 2 1] then [1 2 3 2 1 2 3 2].
    expected = torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0, 2.0, 3.0, 2.0]).expand(8, 8)
    assert torch.equal(padded, expected)


def test_pad_replicate_mode_and_bad_mode():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    padded, _ = pad_to_multiple(x, 4, mode="replicate")
    assert torch.equal(padded[0], torch.tensor([1.0, 2.0, 3.0, 3.0]))
    with pytest.raises(ValueError, match="mode"):
        pad_to_multiple(x, 4, mode="circular")


# --- tile plan ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"),
    [(64, 64, 64, 8), (64, 200, 32, 8), (8, 1000, 16, 4), (100, 37, 24, 0), (256, 256, 64, 32), (9, 9, 8, 7)],
)
def test_plan_covers_every_pixel_with_full_tiles_in_bounds(height, width, tile, overlap):
    tiles = plan_tiles(height, width, tile, overlap)
    coverage = torch.zeros(height, width, dtype=torch.int64)
    assert len({(t.h, t.w) for t in tiles}) == 1
    for t in tiles:
        assert t.h <= min(tile, height) and t.w <= min(tile, width)
        assert min(t.y0, t.x0) >= 0 and t.y0 + t.h <= height and t.x0 + t.w <= width
        coverage[t.y0 : t.y0 + t.h, t.x0 : t.x0 + t.w] += 1
    assert (coverage >= 1).all()
    assert len(set(tiles)) == len(tiles)
    # Neighbouring tiles overlap by at least ``overlap``: steps are at most length - overlap.
    axes = ((sorted({t.y0 for t in tiles}), tiles[0].h), (sorted({t.x0 for t in tiles}), tiles[0].w))
    for starts, length in axes:
        steps = [b - a for a, b in itertools.pairwise(starts)]
        assert all(0 < s <= length - overlap for s in steps)


def test_plan_without_overlap_partitions_divisible_images():
    tiles = plan_tiles(64, 96, 32, 0)
    assert tiles == [Tile(y, x, 32, 32) for y in (0, 32) for x in (0, 32, 64)]


def test_plan_spreads_equal_tiles_evenly_to_the_edge():
    # 3 tiles are needed for 100 px with overlap 8; 39 px each cover it, evenly spaced.
    tiles = plan_tiles(16, 100, 40, 8)
    assert [(t.x0, t.w) for t in tiles] == [(0, 39), (30, 39), (61, 39)]


def test_plan_work_stays_close_to_the_image_size():
    # Upstream's plan for 512 px with 256-px tiles and overlap 8 needs 3 x 3 full tiles (2.25x the
    # pixels); equal tiles of 176 px need about 1.06x.
    tiles = plan_tiles(512, 512, 256, 8)
    assert sum(t.h * t.w for t in tiles) / 512**2 < 1.07


def test_plan_tile_lengths_are_multiples():
    tiles = plan_tiles(300, 300, 128, 16, multiple=64)
    assert {(t.h, t.w) for t in tiles} == {(128, 128)}


@pytest.mark.parametrize("overlap", [-1, 32, 40])
def test_plan_rejects_bad_overlap(overlap):
    with pytest.raises(ValueError, match="overlap"):
        plan_tiles(100, 100, 32, overlap)


# --- blend window ------------------------------------------------------------------------------------


def test_window_is_one_on_border_edges_and_ramps_at_interior_edges():
    n = 32
    assert torch.equal(blend_window(64, 48, n, (False, False, False, False)), torch.ones(64, 48))
    win = blend_window(64, 48, n, (True, False, False, True))
    assert (win > 0).all()
    assert win[0, 0] < 0.01 and win[-1, -1] < 0.01  # interior top / right edges
    assert win[-1, 0] == 1.0  # bottom-left corner lies on border edges
    assert torch.equal(win[n:, : 48 - n], torch.ones(64 - n, 48 - n))
    ramp = win[:n, 0]
    assert (ramp[1:] > ramp[:-1]).all()


def test_window_ramps_of_an_exact_overlap_sum_to_one():
    n = 24
    down = blend_window(8, 64, n, (False, False, False, True))[0, -n:]
    up = blend_window(8, 64, n, (False, False, True, False))[0, :n]
    torch.testing.assert_close(down + up, torch.ones(n))


def test_window_survives_ramps_longer_than_the_tile():
    win = blend_window(10, 10, 16, (True, True, True, True))
    assert win.shape == (10, 10) and (win > 0).all()


# --- run_tiled ---------------------------------------------------------------------------------------


def _uniform_average(fn, image, scale, tile, overlap):
    """Upstream's blending, for comparison: every tile output weighted 1, then divided by the count."""
    height, width = image.shape[-2:]
    acc = torch.zeros(1, image.shape[1], scale * height, scale * width)
    count = torch.zeros(scale * height, scale * width)
    for i, t in enumerate(plan_tiles(height, width, tile, overlap)):
        out = fn(image[..., t.y0 : t.y0 + t.h, t.x0 : t.x0 + t.w], (), [i])
        ys, xs = slice(scale * t.y0, scale * (t.y0 + t.h)), slice(scale * t.x0, scale * (t.x0 + t.w))
        acc[..., ys, xs] += out
        count[ys, xs] += 1
    return acc / count


def test_smooth_blending_removes_the_seams_uniform_averaging_leaves():
    height, width, scale, tile, overlap, offset = 56, 72, 4, 24, 8, 0.1
    image = _smooth_image(height, width)
    plan = plan_tiles(height, width, tile, overlap)
    rows, cols = sorted({t.y0 for t in plan}), sorted({t.x0 for t in plan})
    assert len(rows) > 2 and len(cols) > 2

    def fn(x, extras, indices):
        # Smooth upscaling plus a checkerboard of per-tile offsets: every pair of neighbouring
        # tiles disagrees by 2 * offset, as diffusion tiles with different noise do.
        signs = [(-1) ** (rows.index(plan[i].y0) + cols.index(plan[i].x0)) for i in indices]
        up = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        return up + offset * torch.tensor(signs, dtype=x.dtype).view(-1, 1, 1, 1)

    smooth = _max_jump(F.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False))
    blended = _max_jump(
        run_tiled(fn, image, scale=scale, tile=tile, overlap=overlap, multiple=8, batch_size=4)
    )
    uniform = _max_jump(_uniform_average(fn, image, scale, tile, overlap))
    disagreement = 2 * offset
    # Uniform averaging steps by half the disagreement where a tile starts to overlap.
    assert uniform - smooth > 0.4 * disagreement
    # The raised cosine spreads it over scale * overlap pixels: at most ~pi / (2 (n + 1)) per pixel.
    assert blended - smooth < 0.1 * disagreement
    assert blended - smooth < disagreement * math.pi / (2 * (scale * overlap + 1)) * 1.5


def _position_dependent(scale, calls):
    """A model whose output depends on where a pixel lies in its input: tiling would show."""

    def fn(x, extras, indices):
        calls.append((tuple(x.shape), list(indices)))
        up = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        h, w = up.shape[-2:]
        yy = torch.linspace(0, 1, h).view(h, 1)
        xx = torch.linspace(0, 1, w).view(1, w)
        return torch.sin(3 * up) + 0.37 * yy * xx + 0.1 * torch.cos(7 * xx)

    return fn


@pytest.mark.parametrize("tile", [None, 24, 32, 1000])
def test_single_tile_is_bit_identical_to_a_single_pass(tile):
    image = torch.rand(1, 3, 13, 21)
    calls = []
    fn = _position_dependent(4, calls)
    out = run_tiled(fn, image, scale=4, tile=tile, overlap=8, multiple=8)
    assert calls == [((1, 3, 16, 24), [0])]
    padded, _ = pad_to_multiple(image, 8)
    expected = fn(padded, (), [0])[..., :52, :84]
    assert torch.equal(out, expected)


def test_position_dependent_model_is_changed_by_tiling():
    # Guards the test above: with several tiles this model's output does differ.
    image = torch.rand(1, 3, 13, 21)
    fn = _position_dependent(4, [])
    single = run_tiled(fn, image, scale=4, tile=None, overlap=4, multiple=8)
    tiled = run_tiled(fn, image, scale=4, tile=16, overlap=4, multiple=8)
    assert not torch.allclose(single, tiled, atol=1e-3)


@pytest.mark.parametrize(
    ("size", "tile", "overlap", "batch_size"),
    [
        ((1, 1), 8, 0, 1),
        ((1, 7), 8, 4, 2),
        ((7, 1), 16, 4, 1),
        ((3, 1000), 16, 4, 3),
        ((3, 1000), 64, 0, 8),
        ((13, 21), 8, 0, 1),
        ((13, 21), 16, 8, 5),
        ((40, 56), 16, 4, 4),
        ((40, 56), 24, 12, 2),
        ((64, 64), 32, 0, 3),
        ((65, 33), 20, 7, 2),
    ],
)
@pytest.mark.parametrize("scale", [1, 4])
def test_identity_model_tiled_equals_untiled(size, tile, overlap, batch_size, scale):
    image = torch.rand(1, 3, *size)
    out = run_tiled(
        _nearest(scale), image, scale=scale, tile=tile, overlap=overlap, multiple=8, batch_size=batch_size
    )
    expected = F.interpolate(image, scale_factor=scale, mode="nearest")
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 7, 100])
def test_batches_calls_and_progress(batch_size):
    image = torch.rand(1, 3, 40, 56)
    n_tiles = len(plan_tiles(40, 56, 16, 4))
    calls, progress = [], []

    def fn(x, extras, indices):
        calls.append((x.shape[0], list(indices)))
        return F.interpolate(x, scale_factor=2, mode="nearest")

    run_tiled(
        fn,
        image,
        scale=2,
        tile=16,
        overlap=4,
        multiple=8,
        batch_size=batch_size,
        on_tile=lambda done, total: progress.append((done, total)),
    )
    assert n_tiles > 7
    assert len(calls) == math.ceil(n_tiles / batch_size)
    assert all(n == len(idx) <= batch_size for n, idx in calls)
    assert [i for _, idx in calls for i in idx] == list(range(n_tiles))
    done = [d for d, _ in progress]
    assert done == sorted(done) and done[-1] == n_tiles and all(t == n_tiles for _, t in progress)


def test_tile_indices_make_per_tile_randomness_independent_of_batching():
    image = torch.rand(1, 3, 40, 56)

    def fn(x, extras, indices):
        # Per-tile noise seeded by the tile index, as a caller derives diffusion seeds.
        noise = [torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(i)) for i in indices]
        return x + 0.1 * torch.stack(noise)

    results = [
        run_tiled(fn, image, scale=1, tile=16, overlap=4, multiple=8, batch_size=b) for b in (1, 3, 64)
    ]
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_single_pass_reports_progress_once():
    progress = []
    run_tiled(
        _nearest(2),
        torch.rand(1, 3, 5, 5),
        scale=2,
        tile=None,
        overlap=0,
        multiple=8,
        on_tile=lambda done, total: progress.append((done, total)),
    )
    assert progress == [(1, 1)]


@pytest.mark.parametrize("tile", [None, 16])
def test_extras_are_tiled_in_lockstep(tile):
    image = torch.rand(1, 3, 37, 45)
    mask = (torch.rand(1, 1, 37, 45) > 0.5).float()
    bias = torch.rand(1, 3, 37, 45)

    def fn(x, extras, indices):
        m, b = extras
        assert m.shape[-2:] == x.shape[-2:] == b.shape[-2:] and m.shape[0] == x.shape[0]
        return F.interpolate(x * m + b, scale_factor=4, mode="nearest")

    out = run_tiled(fn, image, scale=4, tile=tile, overlap=6, multiple=8, batch_size=3, extras=[mask, bias])
    expected = F.interpolate(image * mask + bias, scale_factor=4, mode="nearest")
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_rejects_mismatched_inputs_and_outputs():
    image = torch.rand(1, 3, 20, 20)
    with pytest.raises(ValueError, match="extra"):
        run_tiled(
            _nearest(4), image, scale=4, tile=8, overlap=2, multiple=8, extras=[torch.rand(1, 1, 20, 19)]
        )
    with pytest.raises(ValueError, match="returned shape"):
        run_tiled(_nearest(2), image, scale=4, tile=8, overlap=2, multiple=8)
    with pytest.raises(ValueError, match="overlap"):
        run_tiled(_nearest(4), image, scale=4, tile=12, overlap=8, multiple=8)
    with pytest.raises(ValueError, match=r"\(1, C, H, W\)"):
        run_tiled(_nearest(4), torch.rand(2, 3, 20, 20), scale=4, tile=8, overlap=2, multiple=8)


def test_tile_is_rounded_down_to_the_multiple():
    shapes = []

    def fn(x, extras, indices):
        shapes.append(tuple(x.shape[-2:]))
        return x.clone()

    run_tiled(fn, torch.rand(1, 1, 64, 64), scale=1, tile=23, overlap=4, multiple=8)
    assert set(shapes) == {(16, 16)}


def test_output_keeps_the_model_dtype_and_goes_to_out_device():
    image = torch.rand(1, 3, 30, 30, dtype=torch.float64)
    out = run_tiled(_nearest(2), image, scale=2, tile=16, overlap=4, multiple=8, out_device="cpu")
    assert out.dtype == torch.float64 and out.device == torch.device("cpu")
    torch.testing.assert_close(out, F.interpolate(image, scale_factor=2, mode="nearest"))


# --- tile size from free memory ----------------------------------------------------------------------


def test_auto_tile_size_shrinks_with_free_memory(monkeypatch):
    bytes_per_pixel, multiple, min_tile, max_tile = 20_000.0, 16, 64, 1024
    tiles = []
    for free_gib in (64, 16, 4, 2, 1, 0.5, 0.1, 0.0):
        free = int(free_gib * 1024**3)
        monkeypatch.setattr(tiling, "free_memory_bytes", lambda device, free=free: free)
        tile = auto_tile_size("cpu", bytes_per_pixel, multiple, min_tile, max_tile, fraction=0.5)
        tiles.append(tile)
        assert tile % multiple == 0 and min_tile <= tile <= max_tile
        if tile > min_tile:
            assert tile_memory_bytes(tile, bytes_per_pixel) <= 0.5 * free
        if tile < max_tile:
            assert tile_memory_bytes(tile + multiple, bytes_per_pixel) > 0.5 * free
    assert tiles == sorted(tiles, reverse=True)
    assert tiles[0] == max_tile and tiles[-1] == min_tile
    assert len(set(tiles)) > 3


def test_largest_fitting_tile_rounds_the_bounds_to_the_multiple():
    assert largest_fitting_tile(0, 1.0, 16, 50, 1000) == 64
    assert largest_fitting_tile(1e12, 1.0, 16, 50, 1000) == 992
    assert largest_fitting_tile(100 * 100, 1.0, 8, 8, 1000) == 96
    with pytest.raises(ValueError, match="no multiple"):
        largest_fitting_tile(1e12, 1.0, 64, 70, 100)


def test_free_memory_reads_meminfo_and_falls_back(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    2048 kB\n")
    monkeypatch.setattr(tiling, "_MEMINFO", str(meminfo))
    assert free_memory_bytes("cpu") == 2048 * 1024
    meminfo.write_text("MemAvailable: lots\n")
    assert free_memory_bytes("cpu") == tiling._FALLBACK_FREE_BYTES
    monkeypatch.setattr(tiling, "_MEMINFO", str(tmp_path / "missing"))
    assert free_memory_bytes(torch.device("cpu")) == tiling._FALLBACK_FREE_BYTES
    assert free_memory_bytes("mps") == tiling._MPS_FREE_BYTES


def test_free_memory_on_cuda_asks_the_driver(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (123_456_789, 10**10))
    assert free_memory_bytes("cuda:0") == 123_456_789
