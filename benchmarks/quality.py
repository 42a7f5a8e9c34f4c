"""Quality of an x4 super-resolution model next to bicubic upsampling: PSNR and SSIM, Y and RGB.

Test sets (from ``../shared`` beside the project, or ``--shared``):

- ``kodak``: the 24 Kodak photos that lite's training holds out, the 256x256 centre crops that its
  validation scores, degraded as configs/lite.toml degrades (its seed): training's validation set;
- ``imagenet-val``: testdata/sr/imagenet-val, LQ made by the Real-ESRGAN degradation (lq -> gt);
- ``Set5``, ``Set14``, ``BSD100``: evaldata, HR cropped to a multiple of 4 and bicubic-downscaled
  (the usual protocol; ``resshift eval --make-lr`` makes the same LR files).

The model runs exactly as ``resshift sr`` runs it (same loader, pipeline, seed and 8-bit output);
bicubic is the model's own y0 (torch bicubic, as upstream), rounded to 8 bits too. Metrics shave
4 border pixels, as SR papers do.

    python benchmarks/quality.py                          # lite on all five sets
    python benchmarks/quality.py --sets imagenet-val --model lite
    python benchmarks/quality.py --registry runs/lite/registry.toml   # a model you trained
    python benchmarks/quality.py --tta                    # as resshift sr --tta
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from resshift_cli.imagefiles import IMAGE_SUFFIXES, find_images, load_image, save_image
from resshift_cli.metrics import make_lr_images, psnr, ssim
from resshift_cli.pipelines.loading import load_restorer
from resshift_cli.pipelines.options import RunOptions
from resshift_cli.pipelines.tasks import super_resolve
from resshift_cli.registry import load_registry
from resshift_cli.training.config import load_train_config
from resshift_cli.training.data import validation_pairs

SETS = ("kodak", "imagenet-val", "Set5", "Set14", "BSD100")
LITE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lite.toml"
BORDER = 4


def pairs(shared: Path, name: str, scratch: Path) -> list[tuple[Path, Path]]:
    """(LQ file, ground-truth file) of every image of set ``name``, matched by stem."""
    if name == "kodak":
        lq_dir, gt_dir = scratch / "kodak-lq", scratch / "kodak-gt"
        config = load_train_config(LITE_CONFIG)
        data = config.data
        crop = data.val_crop or data.crop
        made, _ = validation_pairs(
            shared / "traindata/kodak", 24, crop, 4, data.degradation, data.realesrgan, config.seed
        )
        lq_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        for pair in made:
            stem = Path(pair.name).stem
            save_image(lq_dir / f"{stem}.png", pair.lq.permute(1, 2, 0).numpy())
            save_image(gt_dir / f"{stem}.png", pair.hq.permute(1, 2, 0).numpy())
    elif name == "imagenet-val":
        lq_dir, gt_dir = shared / "testdata/sr/imagenet-val/lq", shared / "testdata/sr/imagenet-val/gt"
    else:
        gt_dir = shared / "evaldata" / name
        lq_dir = scratch / name
        make_lr_images(gt_dir, lq_dir, 4)
    gts = {p.stem: p for p in find_images(gt_dir, recursive=False, suffixes=IMAGE_SUFFIXES)[0]}
    lqs = find_images(lq_dir, recursive=False, suffixes=IMAGE_SUFFIXES)[0]
    return [(p, gts[p.stem]) for p in lqs if p.stem in gts]


def to_8bit(rgb: np.ndarray) -> np.ndarray:
    """[0, 1] float -> the values a saved 8-bit PNG holds, as float in [0, 1]."""
    return np.round(np.clip(rgb, 0, 1) * 255) / 255


def scores(out: np.ndarray, gt: np.ndarray) -> tuple[float, float, float, float]:
    """PSNR-Y, SSIM-Y, PSNR-RGB, SSIM-RGB of ``out`` against ``gt`` (gt cropped to ``out``)."""
    gt = gt[: out.shape[0], : out.shape[1]]
    return (
        psnr(out, gt, crop_border=BORDER, y_channel=True),
        ssim(out, gt, crop_border=BORDER, y_channel=True),
        psnr(out, gt, crop_border=BORDER),
        ssim(out, gt, crop_border=BORDER),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lite")
    parser.add_argument(
        "--registry", type=Path, help="a registry file of your own, e.g. runs/NAME/registry.toml"
    )
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, from {', '.join(SETS)}")
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--tta", action="store_true", help="as resshift sr --tta: 8 flips/rotations")
    args = parser.parse_args(argv)

    registry = load_registry(args.registry)
    spec = registry.model(args.model)
    restorer = load_restorer(spec, registry=registry, device="auto", precision="fp32")
    options = RunOptions(seed=args.seed, tta=args.tta)
    tta = ", --tta" if args.tta else ""
    print(f"model {spec.name}: x{spec.scale}, {spec.steps} steps, seed {args.seed}{tta}; border {BORDER} px")
    print(f"{'set':13} {'n':>4} {'method':8} {'PSNR-Y':>7} {'SSIM-Y':>7} {'PSNR':>7} {'SSIM':>7} {'s/MP':>6}")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.sets.split(","):
            rows: dict[str, list[tuple[float, float, float, float]]] = {"bicubic": [], spec.name: []}
            seconds = megapixels = 0.0
            for lq_path, gt_path in pairs(args.shared, name, Path(scratch)):
                lq, gt = load_image(lq_path), load_image(gt_path).rgb
                tensor = torch.from_numpy(lq.rgb).permute(2, 0, 1)[None]
                bicubic = restorer.diffusion.upsample(tensor)[0].permute(1, 2, 0).numpy()
                rows["bicubic"].append(scores(to_8bit(bicubic), gt))
                started = time.perf_counter()
                restored = super_resolve(restorer, lq, options).rgb
                seconds += time.perf_counter() - started
                megapixels += restored.shape[0] * restored.shape[1] / 1e6
                rows[spec.name].append(scores(to_8bit(restored), gt))
            for method, values in rows.items():
                mean = np.mean(np.array(values), axis=0)
                rate = f"{seconds / megapixels:6.1f}" if method == spec.name else ""
                print(
                    f"{name:13} {len(values):4d} {method:8} {mean[0]:7.2f} {mean[1]:7.4f} "
                    f"{mean[2]:7.2f} {mean[3]:7.4f} {rate:>6}"
                )


if __name__ == "__main__":
    main()
