"""Start-up of the command line: `resshift --help`, and a real `resshift sr` until its first compute.

Writes full-size realsr-v3 and vq-f4 weights (random, safetensors, about 700 MB) to a folder once,
names them in a registry file, then launches `resshift sr` in fresh processes and records, from
the moment of launch, when the first network call starts (the encoder) and when the first UNet
step starts. Medians of several launches.

    python benchmarks/startup.py [--weights-dir /tmp/resshift-startup] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_DRIVER = r"""
import os, sys, time
launched = float(os.environ["STARTUP_LAUNCHED"])
marks = {}
from resshift_cli.models import autoencoder, unet

def mark(cls, name, label, stop):
    original = getattr(cls, name)
    def wrapped(self, *args, **kwargs):
        marks.setdefault(label, time.time() - launched)
        if stop:
            print(marks["encode"], marks["unet"], flush=True)
            os._exit(0)
        return original(self, *args, **kwargs)
    setattr(cls, name, wrapped)

mark(autoencoder.VQAutoencoder, "encode", "encode", False)
mark(unet.UNet, "forward", "unet", True)
from resshift_cli.cli import main
main(sys.argv[1:])
"""


def write_weights(folder: Path) -> Path:
    """Random full-size weights and a registry file naming them; reused when already there."""
    registry = folder / "registry.toml"
    if registry.exists():
        return registry
    import torch

    from resshift_cli.checkpoints import save_safetensors
    from resshift_cli.models.autoencoder import VQAutoencoder
    from resshift_cli.models.unet import UNet
    from resshift_cli.registry import load_registry

    spec = load_registry().model("realsr-v3")
    ae = load_registry().autoencoder("vq-f4")
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(UNet(**spec.unet).state_dict(), folder / "unet.safetensors")
    save_safetensors(
        VQAutoencoder(ae.embed_dim, ae.n_embed, ae.ddconfig).state_dict(), folder / "ae.safetensors"
    )
    registry.write_text(
        f'[models.realsr-v3]\npath = "{folder / "unet.safetensors"}"\n\n'
        f'[autoencoders.vq-f4]\npath = "{folder / "ae.safetensors"}"\n'
    )
    return registry


def launch(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.time()
    env = dict(env, STARTUP_LAUNCHED=repr(started))
    proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"launch failed ({proc.returncode}): {proc.stderr[-500:]}")
    return time.time() - started, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights-dir", type=Path, default=Path(tempfile.gettempdir()) / "resshift-startup")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    registry = write_weights(args.weights_dir)
    image = args.weights_dir / "input.png"
    if not image.exists():
        from PIL import Image

        Image.new("RGB", (64, 64), (120, 90, 60)).save(image)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    resshift = str(Path(sys.executable).parent / "resshift")

    helps = [launch([resshift, "--help"], env)[0] for _ in range(args.runs)]
    sr_helps = [launch([resshift, "sr", "--help"], env)[0] for _ in range(args.runs)]
    encode, first_step = [], []
    for _ in range(args.runs):
        out = args.weights_dir / "out.png"
        _, stdout = launch(
            [
                sys.executable,
                "-c",
                _DRIVER,
                "sr",
                str(image),
                "-o",
                str(out),
                "--registry",
                str(registry),
                "--overwrite",
                "-q",
            ],
            env,
        )
        e, u = (float(v) for v in stdout.split())
        encode.append(e)
        first_step.append(u)
    report = {
        "resshift --help (s, wall, median)": statistics.median(helps),
        "resshift sr --help (s, wall, median)": statistics.median(sr_helps),
        "launch to first network call, the encoder (s, median)": statistics.median(encode),
        "launch to first UNet step (s, median)": statistics.median(first_step),
        "runs": args.runs,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
