"""Task pipelines: what super-resolution, inpainting and face restoration do before and after the
shared restoration core. They take and give numpy images in [0, 1] (H x W x 3), as image I/O does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from resshift_cli.imageio import LoadedImage, resize_alpha
from resshift_cli.pipelines.restorer import ProgressFn, Restorer


@dataclass(frozen=True)
class RunOptions:
    """Per-run settings shared by every task."""

    seed: int = 12345
    tile: int | None = None
    overlap: int = 16
    batch_size: int = 1
    tta: bool = False


@dataclass
class Restored:
    """A restored image ready to be written, and what the user should be told about it."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    notices: list[str] = field(default_factory=list)


class MaskError(ValueError):
    """A mask does not fit its image."""


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    # A copy, not ascontiguousarray: numpy counts a flipped view with a side of one pixel as
    # contiguous and returns it as is, negative stride and all, which torch cannot take.
    return torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)


def _to_numpy(image: torch.Tensor) -> np.ndarray:
    return image[0].permute(1, 2, 0).float().numpy()


def _restore(
    restorer: Restorer,
    rgb: np.ndarray,
    options: RunOptions,
    mask: torch.Tensor | None = None,
    on_progress: ProgressFn | None = None,
) -> np.ndarray:
    out = restorer.restore(
        _to_tensor(rgb),
        mask=mask,
        seed=options.seed,
        tile=options.tile,
        overlap=options.overlap,
        batch_size=options.batch_size,
        on_progress=on_progress,
    )
    return _to_numpy(out)


# The 8 symmetries of the square as (quarter turns, mirrored): test-time augmentation's views.
DIHEDRAL = tuple((turns, mirrored) for mirrored in (False, True) for turns in range(4))


def _view(image: np.ndarray, turns: int, mirrored: bool) -> np.ndarray:
    image = np.rot90(image, turns)
    return image[:, ::-1] if mirrored else image


def _unview(image: np.ndarray, turns: int, mirrored: bool) -> np.ndarray:
    return np.rot90(image[:, ::-1] if mirrored else image, -turns)


def _restore_views(
    restorer: Restorer, rgb: np.ndarray, options: RunOptions, on_progress: ProgressFn | None
) -> np.ndarray:
    """The mean of the restorations of the image's 8 flips and rotations, each turned back.

    The errors of a regression model differ from view to view while the image does not, so the
    mean is closer to the truth (the self-ensemble of SR papers, at 8 times the cost).
    """
    total: np.ndarray | None = None
    for index, (turns, mirrored) in enumerate(DIHEDRAL):

        def progress(done: int, count: int, _index: int = index) -> None:
            if on_progress is not None:
                on_progress(_index * count + done, len(DIHEDRAL) * count)

        view = _view(rgb, turns, mirrored)
        restored = _unview(_restore(restorer, view, options, on_progress=progress), turns, mirrored)
        total = restored.copy() if total is None else total + restored
    assert total is not None
    return total / len(DIHEDRAL)


def super_resolve(
    restorer: Restorer, image: LoadedImage, options: RunOptions, on_progress: ProgressFn | None = None
) -> Restored:
    """Upscale by the model's scale; alpha is upscaled on its own (bicubic) and kept.

    ``options.tta`` averages the restorations of the 8 flips and rotations of the image.
    """
    if options.tta:
        rgb = _restore_views(restorer, image.rgb, options, on_progress)
    else:
        rgb = _restore(restorer, image.rgb, options, on_progress=on_progress)
    alpha = None
    if image.alpha is not None:
        alpha = resize_alpha(image.alpha, (rgb.shape[1], rgb.shape[0]))
    return Restored(rgb, alpha)


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


def inpaint(
    restorer: Restorer,
    image: LoadedImage,
    hole: np.ndarray,
    options: RunOptions,
    on_progress: ProgressFn | None = None,
) -> Restored:
    """Fill the hole; outside it the output is the input, pixel for pixel (pasted back, as upstream)."""
    h, w = image.rgb.shape[:2]
    check_mask_size((hole.shape[1], hole.shape[0]), (w, h))
    notices = []
    if not hole.any():
        notices.append("the mask has no hole; the output is the input")
        return Restored(image.rgb.copy(), image.alpha, notices)
    if hole.all():
        notices.append("the mask covers the whole image; everything is generated")
    keep = (~hole)[..., None].astype(np.float32)
    # The network was trained on inputs whose hole is black; the mask says where it is.
    masked = image.rgb * keep
    mask_tensor = torch.from_numpy(hole.astype(np.float32))[None, None]
    restored = _restore(restorer, masked, options, mask=mask_tensor, on_progress=on_progress)
    rgb = np.where(hole[..., None], restored, image.rgb)
    return Restored(rgb, image.alpha, notices)


def restore_face(
    restorer: Restorer,
    image: LoadedImage,
    options: RunOptions,
    face_size: int,
    on_progress: ProgressFn | None = None,
) -> Restored:
    """Blind restoration of an aligned face; other sizes are resized to ``face_size`` and back."""
    h, w = image.rgb.shape[:2]
    notices = []
    rgb = image.rgb
    if (h, w) != (face_size, face_size):
        notices.append(
            f"the face model expects aligned {face_size}x{face_size} faces; "
            f"resized {w}x{h} to {face_size}x{face_size} and back"
        )
        rgb = _resize(rgb, face_size, face_size)
    restored = _restore(restorer, rgb, options, on_progress=on_progress)
    if (h, w) != (face_size, face_size):
        restored = _resize(restored, h, w)
    return Restored(restored, image.alpha, notices)


def _resize(rgb: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bicubic resize (antialiased when shrinking), clipped to [0, 1]."""
    tensor = _to_tensor(rgb)
    out = F.interpolate(tensor, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return _to_numpy(out.clamp(0, 1))
