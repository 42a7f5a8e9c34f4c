"""How a restoration runs, apart from the model: the one place that holds the defaults.

No torch here, so the command line can show these defaults in ``--help`` without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass

SEED = 12345
"""Upstream's seed: the same seed gives the same output."""

TILE_OVERLAP = {"sr": 16, "inpaint": 64, "face": 64}
"""Default overlap of neighbouring tiles per task, in input pixels."""


@dataclass(frozen=True)
class RunOptions:
    """Per-run settings shared by every task: the seed, tiles (``tile`` None: chosen from free
    memory) and their overlap in input pixels, tiles or images per forward pass, and test-time
    augmentation (the mean over the 8 flips and rotations, super-resolution only)."""

    seed: int = SEED
    tile: int | None = None
    overlap: int = TILE_OVERLAP["sr"]
    batch_size: int = 1
    tta: bool = False


DEFAULT_OPTIONS = RunOptions()
"""The options of a run that sets none."""
