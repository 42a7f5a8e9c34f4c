"""Tiled processing of large images with smooth blending, and a memory-based tile size.

The restoration step is a callable, so this module holds no model code. Images are padded by
reflection to the model's size multiple, cut into overlapping full-size tiles (the last tile of a
row or column is shifted back to end at the image edge), processed in batches, and blended with a
raised-cosine window that falls towards zero at tile edges inside the image and stays at 1 on the
image border. Upstream ResShift averages overlapping tiles uniformly, which leaves visible box
artifacts where tiles disagree; the window turns those steps into smooth transitions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Tile",
    "TileFn",
    "auto_tile_size",
    "blend_window",
    "free_memory_bytes",
    "largest_fitting_tile",
    "pad_to_multiple",
    "plan_tiles",
    "run_tiled",
    "tile_memory_bytes",
]

TileFn = Callable[[Tensor, tuple[Tensor, ...], list[int]], Tensor]
"""``fn(tiles, extra_tiles, indices) -> out``: restores a batch of tiles.

``tiles`` is (N, C, th, tw), ``extra_tiles`` holds the conditioning inputs cut at the same places
(each (N, C_i, th, tw)), ``indices`` are the tiles' positions in the plan (stable, so a caller
can derive per-tile seeds from them). Returns (N, C_out, th * scale, tw * scale).
"""

_MEMINFO = "/proc/meminfo"
# Used when the free memory of a device cannot be read: small enough to be safe on most machines.
_FALLBACK_FREE_BYTES = 2 * 1024**3
# MPS shares system memory and has no reliable free-memory query; stay conservative.
_MPS_FREE_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Tile:
    """A tile in padded LQ (input) pixel coordinates."""

    y0: int
    x0: int
    h: int
    w: int


def pad_to_multiple(x: Tensor, multiple: int, mode: str = "reflect") -> tuple[Tensor, tuple[int, int]]:
    """Pad the last two dims of ``x`` at the bottom/right up to a multiple of ``multiple``.

    Returns the padded tensor and ``(pad_h, pad_w)``. ``mode`` is ``"reflect"`` (upstream's choice)
    or ``"replicate"``. Reflection needs pad < size, so small inputs are reflected repeatedly and a
    size-1 dimension, which cannot be reflected, is replicated: any size from 1x1 up works.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if mode not in ("reflect", "replicate"):
        raise ValueError(f"mode must be 'reflect' or 'replicate', got {mode!r}")
    if x.dim() < 2:
        raise ValueError(f"expected a tensor with at least 2 dims, got shape {tuple(x.shape)}")
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return x, (0, 0)
    lead = x.shape[:-2]
    y = x.reshape(-1, height, width)
    left_h, left_w = pad_h, pad_w
    while mode == "reflect" and (left_h or left_w):
        step_h = min(left_h, y.shape[-2] - 1)
        step_w = min(left_w, y.shape[-1] - 1)
        if step_h == 0 and step_w == 0:
            break
        y = F.pad(y, (0, step_w, 0, step_h), mode="reflect")
        left_h, left_w = left_h - step_h, left_w - step_w
    if left_h or left_w:
        y = F.pad(y, (0, left_w, 0, left_h), mode="replicate")
    return y.reshape(*lead, height + pad_h, width + pad_w), (pad_h, pad_w)


def _axis(size: int, tile: int, overlap: int, multiple: int) -> tuple[int, list[int]]:
    """Tile length and start positions along one axis: as few tiles as the overlap allows,
    all the same length (the smallest multiple of ``multiple`` that covers), spread evenly."""
    if size <= tile:
        return size, [0]
    count = -(-(size - overlap) // (tile - overlap))
    length = -(-(size + (count - 1) * overlap) // count)
    length = min(tile, -(-length // multiple) * multiple)
    return length, [i * (size - length) // (count - 1) for i in range(count)]


def plan_tiles(height: int, width: int, tile: int, overlap: int, multiple: int = 1) -> list[Tile]:
    """Cover a ``height`` x ``width`` image with tiles of at most ``tile`` pixels overlapping by at
    least ``overlap``.

    Upstream steps by ``tile - overlap`` and shifts the last tile back, which can nearly double
    the work on an unlucky size; here each axis gets the fewest tiles that fit, all of one length
    (a multiple of ``multiple``, no larger than needed) and evenly spread, so the extra work is
    little more than the overlaps themselves. Row-major order: the index is the tile's stable id.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    th, rows = _axis(height, tile, overlap, multiple)
    tw, cols = _axis(width, tile, overlap, multiple)
    return [Tile(y0, x0, th, tw) for y0 in rows for x0 in cols]


def _profile(n: int, ramp: int, start: bool, end: bool, device: torch.device | str | None) -> Tensor:
    """1-D weights: 1, times a raised-cosine ramp of ``ramp`` pixels at each interior end."""
    weights = torch.ones(n, dtype=torch.float64, device=device)
    ramp = min(ramp, n)
    if ramp > 0 and (start or end):
        # Samples at (i + 1) / (ramp + 1) keep the edge pixel above zero, and a ramp up and the
        # matching ramp down over the same pixels sum to exactly 1.
        t = torch.arange(1, ramp + 1, dtype=torch.float64, device=device) / (ramp + 1)
        up = 0.5 - 0.5 * torch.cos(math.pi * t)
        if start:
            weights[:ramp] *= up
        if end:
            weights[n - ramp :] *= up.flip(0)
    return weights


def blend_window(
    h: int,
    w: int,
    overlap_px: int,
    edges: tuple[bool, bool, bool, bool],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The (h, w) blending weight of a tile whose ``edges`` (top, bottom, left, right) are interior.

    Along an interior edge the weight rises as a raised cosine over ``overlap_px`` pixels from
    nearly 0 (never exactly 0) to 1; on edges at the image border it stays 1, so every output
    pixel has positive total weight. Separable: the outer product of two 1-D profiles.
    """
    top, bottom, left, right = edges
    wy = _profile(h, overlap_px, top, bottom, device)
    wx = _profile(w, overlap_px, left, right, device)
    return (wy[:, None] * wx[None, :]).to(dtype)


def _check_output(out: Tensor, n: int, h: int, w: int) -> None:
    if out.dim() != 4 or out.shape[0] != n or tuple(out.shape[-2:]) != (h, w):
        raise ValueError(f"the tile function returned shape {tuple(out.shape)}, expected ({n}, C, {h}, {w})")


def run_tiled(
    fn: TileFn,
    image: Tensor,
    *,
    scale: int,
    tile: int | None,
    overlap: int,
    multiple: int,
    batch_size: int = 1,
    extras: Sequence[Tensor] = (),
    on_tile: Callable[[int, int], None] | None = None,
    out_device: torch.device | str | None = None,
) -> Tensor:
    """Restore ``image`` (1, C, H, W) with ``fn`` tile by tile; returns (1, C_out, scale*H, scale*W).

    ``tile`` and ``overlap`` are in input pixels; ``tile`` is rounded down to a multiple of
    ``multiple`` (at least ``multiple``). ``extras`` are per-pixel conditioning inputs
    (1, C_i, H, W), padded and cut exactly like the image. With ``tile=None``, or when the padded
    image fits in one tile, ``fn`` runs once on the whole padded image and its cropped output is
    returned unchanged. Otherwise tiles go to ``fn`` ``batch_size`` at a time and the outputs are
    blended with :func:`blend_window` into accumulators on ``out_device`` (default: the image's
    device), with a single-channel weight map. ``on_tile(done, total)`` reports progress in tiles.
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected an image of shape (1, C, H, W), got {tuple(image.shape)}")
    if scale < 1 or batch_size < 1 or overlap < 0:
        raise ValueError(f"need scale, batch_size >= 1, overlap >= 0; got {scale}, {batch_size}, {overlap}")
    height, width = image.shape[-2:]
    for extra in extras:
        if extra.dim() != 4 or extra.shape[0] != 1 or tuple(extra.shape[-2:]) != (height, width):
            raise ValueError(f"extra input {tuple(extra.shape)} does not match the image ({height}x{width})")
    out_device = image.device if out_device is None else torch.device(out_device)
    out_h, out_w = scale * height, scale * width

    padded, _ = pad_to_multiple(image, multiple)
    padded_extras = tuple(pad_to_multiple(extra, multiple)[0] for extra in extras)
    pad_h, pad_w = padded.shape[-2:]

    if tile is not None:
        tile = max(multiple, tile // multiple * multiple)
        if overlap >= tile:
            raise ValueError(f"overlap ({overlap}) must be smaller than the tile ({tile} after rounding)")
    if tile is None or (tile >= pad_h and tile >= pad_w):
        out = fn(padded, padded_extras, [0])
        _check_output(out, 1, scale * pad_h, scale * pad_w)
        if on_tile is not None:
            on_tile(1, 1)
        return out[..., :out_h, :out_w].to(out_device)

    tiles = plan_tiles(pad_h, pad_w, tile, overlap, multiple)
    total = len(tiles)
    # The accumulators are allocated once the first output shows its channels and dtype.
    acc = weight = torch.empty(0)
    out_dtype = image.dtype
    windows: dict[tuple[bool, bool, bool, bool], Tensor] = {}
    for first in range(0, total, batch_size):
        indices = list(range(first, min(first + batch_size, total)))
        batch = [tiles[i] for i in indices]
        cut = [(slice(None), slice(None), slice(t.y0, t.y0 + t.h), slice(t.x0, t.x0 + t.w)) for t in batch]
        out = fn(
            torch.cat([padded[c] for c in cut]),
            tuple(torch.cat([extra[c] for c in cut]) for extra in padded_extras),
            indices,
        )
        th, tw = scale * batch[0].h, scale * batch[0].w
        _check_output(out, len(batch), th, tw)
        if first == 0:
            out_dtype = out.dtype
            acc_dtype = torch.promote_types(out.dtype, torch.float32)
            weight = torch.zeros(scale * pad_h, scale * pad_w, dtype=acc_dtype, device=out_device)
            acc = weight.new_zeros(1, out.shape[1], *weight.shape)
        for k, t in enumerate(batch):
            edges = (t.y0 > 0, t.y0 + t.h < pad_h, t.x0 > 0, t.x0 + t.w < pad_w)
            if edges not in windows:
                windows[edges] = blend_window(th, tw, scale * overlap, edges, out.device, acc.dtype)
            win = windows[edges]
            ys = slice(scale * t.y0, scale * t.y0 + th)
            xs = slice(scale * t.x0, scale * t.x0 + tw)
            acc[0, :, ys, xs] += (out[k].to(acc.dtype) * win).to(out_device)
            weight[ys, xs] += win.to(out_device)
        if on_tile is not None:
            on_tile(indices[-1] + 1, total)
    acc /= weight
    return acc[..., :out_h, :out_w].to(out_dtype)


def free_memory_bytes(device: torch.device | str) -> int:
    """Memory available for new allocations on ``device``, in bytes.

    CUDA: the driver's free memory; CPU: ``MemAvailable`` from /proc/meminfo; MPS and anything
    unreadable: a conservative constant.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        return _MPS_FREE_BYTES
    if device.type == "cpu":
        try:
            with open(_MEMINFO, encoding="ascii") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return _FALLBACK_FREE_BYTES


def tile_memory_bytes(tile: int, bytes_per_lq_pixel: float) -> int:
    """Estimated working memory of one call on a ``tile`` x ``tile`` input (all tiles of a batch
    included in ``bytes_per_lq_pixel``)."""
    return math.ceil(tile * tile * bytes_per_lq_pixel)


def largest_fitting_tile(
    budget_bytes: float, bytes_per_lq_pixel: float, multiple: int, min_tile: int, max_tile: int
) -> int:
    """The largest multiple of ``multiple`` in [min_tile, max_tile] whose estimate fits the budget.

    ``min_tile`` is rounded up and ``max_tile`` down to the multiple; when nothing fits the
    smallest tile is returned, since some tile must be used.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    lo = max(multiple, -(-min_tile // multiple) * multiple)
    hi = max_tile // multiple * multiple
    if lo > hi:
        raise ValueError(f"no multiple of {multiple} between min_tile={min_tile} and max_tile={max_tile}")
    tile = hi
    while tile > lo and tile_memory_bytes(tile, bytes_per_lq_pixel) > budget_bytes:
        tile -= multiple
    return tile


def auto_tile_size(
    device: torch.device | str,
    bytes_per_lq_pixel: float,
    multiple: int,
    min_tile: int,
    max_tile: int,
    fraction: float = 0.5,
) -> int:
    """Pick the largest tile whose working memory fits ``fraction`` of the free memory of ``device``.

    ``bytes_per_lq_pixel`` is the caller's estimate of peak memory per input pixel of a call
    (model activations for a whole batch); the fraction leaves room for weights and the output.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    budget = free_memory_bytes(device) * fraction
    return largest_fitting_tile(budget, bytes_per_lq_pixel, multiple, min_tile, max_tile)
