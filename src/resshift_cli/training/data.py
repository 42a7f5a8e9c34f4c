"""Training data: HQ image lists, a deterministic sample order, and (HQ, LQ) pairs made on the fly.

Sample ``k`` of a run (``k = (step - 1) * batch_size + i`` over the global batch) is image
``perm_e[k mod n]`` of epoch ``e = k // n``, where ``perm_e`` is a permutation drawn from a
generator seeded by (seed, e); its crop, flips and degradation come from a generator seeded by
(seed, k). A batch is therefore a pure function of (seed, step), whichever process or worker makes
it: that is what makes a resumed run repeat the uninterrupted one exactly, and what lets every
process of a multi-GPU run take its own slice of the same global batch.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from resshift_cli.imagefiles import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, ImageError, find_images, load_image
from resshift_cli.training.config import TrainConfigError
from resshift_cli.training.degradations import (
    DegradationConfig,
    bicubic_degrade,
    random_crop_flip,
    random_shrink,
    realesrgan_degrade,
)

__all__ = [
    "Batch",
    "DataError",
    "PairMaker",
    "SampleOrder",
    "StepBatches",
    "ValPair",
    "degrade",
    "derive_seed",
    "generator",
    "list_images",
    "validation_pairs",
]


class DataError(TrainConfigError):
    """The training or validation images cannot be used (none found, too small, unreadable)."""


def derive_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed from ``seed`` and labels, the same on every platform and Python run."""
    text = ":".join(str(p) for p in (seed, *parts)).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(seed: int, *parts: int | str) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


def list_images(folder: Path, min_side: int) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files under ``folder`` (recursive, sorted by relative path) with both sides >= ``min_side``.

    Only headers are read. Returns the usable files and the files left out, each with the reason
    (unreadable, too small, too large); raises :class:`DataError` when none is usable.
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of images")
    candidates, _ = find_images(folder, suffixes=IMAGE_SUFFIXES)
    usable: list[Path] = []
    left_out: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as im:
                    width, height = im.size
        except Image.DecompressionBombError:
            left_out.append((path, "too large to decode safely"))
            continue
        except Exception as exc:  # Pillow's plugins raise many types on malformed headers
            left_out.append((path, f"not a readable image: {type(exc).__name__}"))
            continue
        if min(width, height) < min_side:
            left_out.append((path, f"{width}x{height}, smaller than the {min_side}-pixel crop"))
        elif width * height > DEFAULT_MAX_PIXELS:
            left_out.append((path, f"{width}x{height}, above the {DEFAULT_MAX_PIXELS:,}-pixel limit"))
        else:
            usable.append(path)
    if not usable:
        raise DataError(
            f"{folder}: no readable image of at least {min_side}x{min_side} pixels "
            f"({len(candidates)} image file(s) found)"
        )
    return usable, left_out


def _load(path: Path) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1], upright."""
    return torch.from_numpy(load_image(path).rgb).permute(2, 0, 1).contiguous()


class SampleOrder:
    """Which image sample ``k`` uses: a fresh seeded permutation of the ``count`` images per epoch."""

    def __init__(self, count: int, seed: int) -> None:
        self.count = count
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def position(self, k: int) -> tuple[int, int]:
        """(epoch, position within the epoch) of sample ``k``."""
        return divmod(k, self.count)

    def image_index(self, k: int) -> int:
        epoch, pos = self.position(k)
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(
                self.count, generator=generator(self.seed, "epoch", epoch)
            ).tolist()
        return self._perms[epoch][pos]


@dataclass
class PairMaker:
    """Makes training pair ``k``: a random HQ crop and its LQ, both float32 (3, H, W) in [0, 1].

    The image is first shrunk by a random factor from ``shrink`` ((1, 1): kept as it is). An image
    that cannot be decoded (truncated, corrupt) is replaced by the next readable one in the epoch's
    order, so every sample still comes from (seed, k) alone; ``take_failures`` names such files.
    """

    paths: Sequence[Path]
    crop: int
    scale: int
    degradation: str
    realesrgan: DegradationConfig
    rotate: bool
    seed: int
    shrink: tuple[float, float] = (1.0, 1.0)

    unreadable: dict[Path, str] = field(default_factory=dict, init=False, repr=False)
    _new_failures: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.crop % self.scale:
            raise DataError(f"the crop {self.crop} is not a multiple of the scale {self.scale}")
        self.order = SampleOrder(len(self.paths), self.seed)

    def pair(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = generator(self.seed, "sample", k)
        image = random_shrink(self._image(k), self.shrink, self.crop, gen)
        hq = random_crop_flip(image, self.crop, gen, rotate=self.rotate)
        return hq, degrade(hq, self.scale, self.degradation, self.realesrgan, gen)

    def _image(self, k: int) -> torch.Tensor:
        """The image of sample ``k``, or the first readable one after it in its epoch's order."""
        epoch, position = self.order.position(k)
        first = epoch * self.order.count
        for offset in range(self.order.count):
            path = self.paths[self.order.image_index(first + (position + offset) % self.order.count)]
            if path in self.unreadable:
                continue
            try:
                return _load(path)
            except ImageError as exc:
                self.unreadable[path] = str(exc)
                self._new_failures.append(str(exc))
        raise DataError(f"none of the {self.order.count} training images can be decoded")

    def take_failures(self) -> list[str]:
        """Messages for the files found unreadable since the last call (one line each)."""
        failures, self._new_failures = self._new_failures, []
        return failures


def degrade(
    hq: torch.Tensor, scale: int, degradation: str, config: DegradationConfig, gen: torch.Generator
) -> torch.Tensor:
    """The LQ of ``hq``: bicubic downsampling, or Real-ESRGAN's degradation drawn from ``gen``."""
    if degradation == "bicubic":
        return bicubic_degrade(hq, scale)
    return realesrgan_degrade(hq, scale, config, gen)


@dataclass
class Batch:
    """One process's slice of a step's batch: HQ and LQ (N, 3, H, W) in [0, 1], the messages
    naming training files found unreadable while making it, and why there is no batch, if so."""

    hq: torch.Tensor | None
    lq: torch.Tensor | None
    unreadable: list[str]
    error: str | None = None


class StepBatches(torch.utils.data.Dataset):
    """Item ``i``: this process's slice of the global batch of step ``first_step + i``, as
    :class:`Batch`. Batches are made in data workers, so what went wrong travels with them to the
    process that reports it (an exception raised in a worker would reach the user as a traceback).

    The global batch of step s is samples ``(s - 1) * batch_size`` onwards; process ``rank`` of
    ``world_size`` takes the ``rank``-th of ``world_size`` equal consecutive slices.
    """

    def __init__(
        self, maker: PairMaker, first_step: int, last_step: int, batch_size: int, rank: int, world_size: int
    ) -> None:
        if batch_size % world_size:
            raise DataError(f"the batch size {batch_size} is not divisible by the {world_size} processes")
        self.maker = maker
        self.first_step = first_step
        self.last_step = last_step
        self.batch_size = batch_size
        self.per_rank = batch_size // world_size
        self.rank = rank

    def __len__(self) -> int:
        return max(0, self.last_step - self.first_step + 1)

    def __getitem__(self, i: int) -> Batch:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = (self.first_step + i - 1) * self.batch_size + self.rank * self.per_rank
        try:
            pairs = [self.maker.pair(k) for k in range(start, start + self.per_rank)]
        except DataError as exc:
            return Batch(None, None, self.maker.take_failures(), str(exc))
        hq, lq = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        return Batch(hq, lq, self.maker.take_failures())


@dataclass(frozen=True)
class ValPair:
    """A validation image: its name, centre-cropped HQ and fixed LQ, float32 (3, H, W) in [0, 1]."""

    name: str
    hq: torch.Tensor
    lq: torch.Tensor


def validation_pairs(
    folder: Path,
    count: int,
    crop: int,
    scale: int,
    degradation: str,
    config: DegradationConfig,
    seed: int,
) -> tuple[list[ValPair], list[tuple[Path, str]]]:
    """The first ``count`` usable images of ``folder`` centre-cropped to ``crop``, with LQs fixed by
    ``seed``; and the files left out, each with the reason (as :func:`list_images`)."""
    if crop % scale:
        raise DataError(f"the validation crop {crop} is not a multiple of the scale {scale}")
    paths, left_out = list_images(folder, crop)
    pairs: list[ValPair] = []
    for path in paths:
        if len(pairs) == count:
            break
        try:
            image = _load(path)
        except ImageError as exc:
            left_out.append((path, str(exc).removeprefix(f"cannot read {path}: ")))
            continue
        top = (image.shape[1] - crop) // 2
        left = (image.shape[2] - crop) // 2
        hq = image[:, top : top + crop, left : left + crop].contiguous()
        lq = degrade(hq, scale, degradation, config, generator(seed, "val", len(pairs)))
        pairs.append(ValPair(path.relative_to(folder).as_posix(), hq, lq))
    if not pairs:
        raise DataError(f"{folder}: none of the validation images can be decoded")
    return pairs, left_out
