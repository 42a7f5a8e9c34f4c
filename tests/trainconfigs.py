"""Tiny training configurations for the `resshift train` tests: a pixel-space UNet, its schedule,
and folders of generated photos."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from resshift_cli.training.config import dump_toml

TINY_UNET: dict[str, Any] = {
    "image_size": 32,
    "in_channels": 3,
    "model_channels": 32,
    "out_channels": 3,
    "attention_resolutions": [16],
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "num_head_channels": 16,
    "use_scale_shift_norm": True,
    "swin_depth": 2,
    "swin_embed_dim": 32,
    "window_size": 4,
    "mlp_ratio": 2,
    "cond_lq": True,
    "lq_size": 32,
}
PIXEL_DIFFUSION: dict[str, Any] = {
    "sf": 4,
    "steps": 4,
    "min_noise_level": 0.2,
    "kappa": 2.0,
    "etas_end": 0.99,
    "latent_flag": False,
    "schedule_kwargs": {"power": 0.3},
}


def training_images(folder: Path, count: int, size: int, seed: int) -> Path:
    """``count`` smooth-plus-texture RGB PNGs of ``size`` x ``size``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        waves = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy) + seed)], -1)
        image = np.clip(0.5 + 0.4 * waves + rng.normal(0, 0.05, waves.shape), 0, 1)
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def config_file(tmp: Path, extra: dict[str, Any] | None = None, **tables: dict[str, Any]) -> Path:
    """A tiny pixel-space config (two 32x32 training images) in ``tmp/train.toml``."""
    data: dict[str, Any] = {
        "name": "tiny",
        "output_dir": "out",
        "seed": 3,
        "model": {"unet": TINY_UNET, "diffusion": PIXEL_DIFFUSION},
        "data": {"train": str(training_images(tmp / "hq", 2, 32, 0)), "crop": 32},
        "optim": {"lr": 2e-3, "warmup_steps": 3, "ema_decay": 0.9},
        "train": {"steps": 6, "batch_size": 4, "log_every": 1, "checkpoint_every": 3, "val_every": 0},
    }
    for name, values in tables.items():
        data[name] = {**data.get(name, {}), **values}
    data.update(extra or {})
    path = tmp / "train.toml"
    path.write_text(dump_toml(data), encoding="utf-8")
    return path
