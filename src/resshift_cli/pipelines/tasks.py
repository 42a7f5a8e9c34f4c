"""Task pipelines: what super-resolution, inpainting and face restoration do before and after the
shared restoration core. They take and give numpy images in [0, 1] (H x W x 3), as image I/O does.

Each task prepares its image (:class:`Prepared`: the pixels the model sees, the hole of an
inpainting, how to finish the output); :func:`restore_prepared` runs images of one size through
the restorer together, ``batch_size`` per forward pass, with the same result as one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from resshift_cli.errors import InputError
from resshift_cli.imagefiles import LoadedImage, resize_alpha
from resshift_cli.pipelines.options import DEFAULT_OPTIONS, RunOptions
from resshift_cli.pipelines.restorer import ProgressFn, Restorer


@dataclass
class Restored:
    """A restored image ready to be written, and what the user should be told about it."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    notices: list[str] = field(default_factory=list)


class MaskError(InputError):
    """A mask does not fit its image."""


@dataclass
class Prepared:
    """One image prepared for the restorer: ``rgb`` is what the model sees, ``hole`` (H x W bool)
    the area to fill, ``finish`` turns the restorer's output into the :class:`Restored` image.
    ``done`` is set for an image that needs no model at all (a mask without a hole)."""

    rgb: np.ndarray
    finish: Callable[[np.ndarray], Restored]
    hole: np.ndarray | None = None
    done: Restored | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]


def _to_tensor(rgbs: Sequence[np.ndarray]) -> torch.Tensor:
    # A copy, not ascontiguousarray: numpy counts a flipped view with a side of one pixel as
    # contiguous and returns it as is, negative stride and all, which torch cannot take.
    return torch.from_numpy(np.stack([np.array(rgb, dtype=np.float32) for rgb in rgbs])).permute(0, 3, 1, 2)


def _to_numpy(images: torch.Tensor) -> list[np.ndarray]:
    return list(images.permute(0, 2, 3, 1).float().numpy())


def restore_prepared(
    restorer: Restorer,
    images: Sequence[Prepared],
    options: RunOptions = DEFAULT_OPTIONS,
    on_progress: ProgressFn | None = None,
) -> list[Restored]:
    """Restore prepared images of one size in passes of ``options.batch_size`` images.

    Every image gets the noise a run of it alone would draw, so the results equal one by one (to
    float rounding). Notices of the restorer (an out-of-memory retry) go to every image.
    """
    results: list[Restored | None] = [prepared.done for prepared in images]
    todo = [i for i, prepared in enumerate(images) if prepared.done is None]
    if todo:
        if len({images[i].size for i in todo}) != 1:
            raise ValueError("restore_prepared takes images of one size")
        notices: list[str] = []
        holes = [images[i].hole for i in todo]
        mask = None
        if holes[0] is not None:
            mask = torch.from_numpy(np.stack(holes).astype(np.float32))[:, None]
        out = restorer.restore(
            _to_tensor([images[i].rgb for i in todo]),
            mask=mask,
            options=options,
            on_progress=on_progress,
            on_notice=notices.append,
        )
        for i, rgb in zip(todo, _to_numpy(out), strict=True):
            restored = images[i].finish(rgb)
            restored.notices = notices + restored.notices
            results[i] = restored
    return [r for r in results if r is not None]


def _restore_one(
    restorer: Restorer, prepared: Prepared, options: RunOptions, on_progress: ProgressFn | None
) -> Restored:
    return restore_prepared(restorer, [prepared], options, on_progress)[0]


# The 8 symmetries of the square as (quarter turns, mirrored): test-time augmentation's views.
DIHEDRAL = tuple((turns, mirrored) for mirrored in (False, True) for turns in range(4))


def _view(image: np.ndarray, turns: int, mirrored: bool) -> np.ndarray:
    image = np.rot90(image, turns)
    return image[:, ::-1] if mirrored else image


def _unview(image: np.ndarray, turns: int, mirrored: bool) -> np.ndarray:
    return np.rot90(image[:, ::-1] if mirrored else image, -turns)


def prepare_super_resolution(image: LoadedImage) -> Prepared:
    """Upscale by the model's scale; alpha is upscaled on its own (bicubic) and kept."""

    def finish(rgb: np.ndarray) -> Restored:
        alpha = None
        if image.alpha is not None:
            alpha = resize_alpha(image.alpha, (rgb.shape[1], rgb.shape[0]))
        return Restored(rgb, alpha)

    return Prepared(image.rgb, finish)


def super_resolve(
    restorer: Restorer,
    image: LoadedImage,
    options: RunOptions = DEFAULT_OPTIONS,
    on_progress: ProgressFn | None = None,
) -> Restored:
    """Upscale by the model's scale; alpha is upscaled on its own (bicubic) and kept.

    ``options.tta`` averages the restorations of the 8 flips and rotations of the image: the
    errors of a regression model differ from view to view while the image does not, so the mean
    is closer to the truth (the self-ensemble of SR papers, at 8 times the cost).
    """
    prepared = prepare_super_resolution(image)
    if not options.tta:
        return _restore_one(restorer, prepared, options, on_progress)
    total: np.ndarray | None = None
    notices: list[str] = []
    for index, (turns, mirrored) in enumerate(DIHEDRAL):

        def progress(done: int, count: int, _index: int = index) -> None:
            if on_progress is not None:
                on_progress(_index * count + done, len(DIHEDRAL) * count)

        view = Prepared(_view(image.rgb, turns, mirrored), lambda rgb: Restored(rgb, None))
        restored = _restore_one(restorer, view, options, progress)
        notices += [n for n in restored.notices if n not in notices]
        turned = _unview(restored.rgb, turns, mirrored)
        total = turned.copy() if total is None else total + turned
    assert total is not None
    result = prepared.finish(total / len(DIHEDRAL))
    result.notices = notices
    return result


def hole_mask(mask: np.ndarray) -> np.ndarray:
    """Boolean hole map from a mask image: white (non-zero) is the hole.

    Values above half the mask's own maximum count, so a 0/1 mask and a 0/255 mask both work and
    the near-black noise of a JPEG-compressed mask is not taken for holes.
    """
    values = mask.astype(np.float32)
    if values.ndim == 3:
        values = values.max(axis=2)
    peak = float(values.max()) if values.size else 0.0
    if peak <= 0:
        return np.zeros(values.shape, dtype=bool)
    return values > peak / 2


def check_mask_size(mask_size: tuple[int, int], image_size: tuple[int, int]) -> None:
    """Raise :class:`MaskError` unless the mask's (width, height) is the image's."""
    if mask_size != image_size:
        raise MaskError(
            f"mask is {mask_size[0]}x{mask_size[1]} but the image is {image_size[0]}x{image_size[1]}"
        )


def prepare_inpainting(image: LoadedImage, hole: np.ndarray) -> Prepared:
    """Fill the hole; outside it the output is the input, pixel for pixel (pasted back, as upstream)."""
    h, w = image.rgb.shape[:2]
    check_mask_size((hole.shape[1], hole.shape[0]), (w, h))
    if not hole.any():
        unchanged = Restored(image.rgb.copy(), image.alpha, ["the mask has no hole; the output is the input"])
        return Prepared(image.rgb, lambda rgb: unchanged, done=unchanged)
    notices = ["the mask covers the whole image; everything is generated"] if hole.all() else []

    def finish(rgb: np.ndarray) -> Restored:
        return Restored(np.where(hole[..., None], rgb, image.rgb), image.alpha, list(notices))

    # The network was trained on inputs whose hole is black; the mask says where it is.
    return Prepared(image.rgb * (~hole)[..., None].astype(np.float32), finish, hole=hole)


def inpaint(
    restorer: Restorer,
    image: LoadedImage,
    hole: np.ndarray,
    options: RunOptions = DEFAULT_OPTIONS,
    on_progress: ProgressFn | None = None,
) -> Restored:
    """Fill the hole; outside it the output is the input, pixel for pixel (pasted back, as upstream)."""
    return _restore_one(restorer, prepare_inpainting(image, hole), options, on_progress)


def prepare_face(image: LoadedImage, face_size: int) -> Prepared:
    """Blind restoration of an aligned face; other sizes are resized to ``face_size`` and back."""
    h, w = image.rgb.shape[:2]
    if (h, w) == (face_size, face_size):
        return Prepared(image.rgb, lambda rgb: Restored(rgb, image.alpha))
    notice = (
        f"the face model expects aligned {face_size}x{face_size} faces; "
        f"resized {w}x{h} to {face_size}x{face_size} and back"
    )

    def finish(rgb: np.ndarray) -> Restored:
        return Restored(_resize(rgb, h, w), image.alpha, [notice])

    return Prepared(_resize(image.rgb, face_size, face_size), finish)


def restore_face(
    restorer: Restorer,
    image: LoadedImage,
    options: RunOptions = DEFAULT_OPTIONS,
    face_size: int = 512,
    on_progress: ProgressFn | None = None,
) -> Restored:
    """Blind restoration of an aligned face; other sizes are resized to ``face_size`` and back."""
    return _restore_one(restorer, prepare_face(image, face_size), options, on_progress)


def _resize(rgb: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bicubic resize (antialiased when shrinking), clipped to [0, 1]."""
    out = F.interpolate(_to_tensor([rgb]), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return _to_numpy(out.clamp(0, 1))[0]
