"""Start-up of a real `resshift sr` process, part by part, against `python -c "import torch"`.

Writes full-size realsr-v3 and vq-f4 weights (random, safetensors, about 700 MB) to a folder once,
names them in a registry file (so they are "cached": nothing is downloaded or converted), then
launches `resshift sr` on two tiny inputs in fresh processes. It prints medians over the runs of:
the whole process's wall time; `import torch` alone; the two images' own `--json` seconds; what the
process spends beyond torch's import outside the images (the start-up cost); and, from an
instrumented launch, when each part ends after launch (imports, registry, weights resolved,
networks built, weights loaded, model on the device, first and second image, exit).

    python benchmarks/startup.py [--device cpu|cuda] [--runs 5] [--weights-dir DIR]
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
import atexit, json, os, sys, time
launched = float(os.environ["STARTUP_LAUNCHED"])
marks = {}
def mark(label):
    marks.setdefault(label, time.time() - launched)
atexit.register(lambda: print(json.dumps(marks), file=sys.stderr))
import torch
mark("import torch")
from resshift_cli import cli, hub, registry, restore
from resshift_cli.pipelines import loading, restorer
mark("import resshift_cli")

def after(module, name, label):
    original = getattr(module, name)
    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        mark(label)
        return out
    setattr(module, name, wrapped)

def before(module, name, label):
    original = getattr(module, name)
    def wrapped(*args, **kwargs):
        mark(label)
        return original(*args, **kwargs)
    setattr(module, name, wrapped)

after(registry, "load_registry", "registry read")
after(hub, "resolve_model", "weights resolved")
before(loading, "load_into", "networks built")
after(restorer.Restorer, "__post_init__", "model on the device")
calls = []
original_call = restore._Processor.__call__
def call(self, jobs):
    out = original_call(self, jobs)
    calls.append(1)
    mark("image 1 done" if len(calls) == 1 else "image 2 done")
    return out
restore._Processor.__call__ = call
sys.argv = ["resshift", *sys.argv[1:]]
cli.main()
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


def launch(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.time()
    proc = subprocess.run(args, capture_output=True, text=True, env=dict(env, STARTUP_LAUNCHED=repr(started)))
    seconds = time.time() - started
    if proc.returncode != 0:
        raise SystemExit(f"launch failed ({proc.returncode}): {proc.stderr[-800:]}")
    return seconds, proc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights-dir", type=Path, default=Path(tempfile.gettempdir()) / "resshift-startup")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    registry = write_weights(args.weights_dir)
    from PIL import Image

    inputs = []
    for name, colour in (("a.png", (120, 90, 60)), ("b.png", (60, 90, 120))):
        inputs.append(args.weights_dir / name)
        Image.new("RGB", (16, 16), colour).save(inputs[-1])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    resshift = str(Path(sys.executable).parent / "resshift")
    common = [*map(str, inputs), "-o", str(args.weights_dir / "out"), "--registry", str(registry)]
    common += ["--overwrite", "--json", "--device", args.device]

    torch_only, whole, images, marks = [], [], [], []
    for _ in range(args.runs):
        torch_only.append(launch([sys.executable, "-c", "import torch"], env)[0])
        seconds, proc = launch([resshift, "sr", *common, "-q"], env)
        whole.append(seconds)
        images.append([json.loads(line)["seconds"] for line in proc.stdout.splitlines()])
        _, proc = launch([sys.executable, "-c", _DRIVER, "sr", *common, "-q"], env)
        marks.append(json.loads(proc.stderr.strip().splitlines()[-1]))

    first = statistics.median(i[0] for i in images)
    second = statistics.median(i[1] for i in images)
    overhead = statistics.median(w - t - sum(i) for w, t, i in zip(whole, torch_only, images, strict=True))
    print(
        f"device {args.device}; medians of {args.runs} launches; two 16x16 inputs, realsr-v3 weights on disk"
    )
    print(f"  whole process                     {statistics.median(whole):7.3f} s")
    print(f"  python -c 'import torch'          {statistics.median(torch_only):7.3f} s")
    print(
        f"  the two images (--json seconds)   {first:7.3f} s, {second:7.3f} s "
        f"(second/first {second / first:.2f})"
    )
    print(f"  beyond import torch and images    {overhead:7.3f} s")
    print("  parts, seconds after launch (instrumented launches):")
    for label in marks[0]:
        values = [m[label] for m in marks if label in m]
        print(f"    {label:28} {statistics.median(values):7.3f}")


if __name__ == "__main__":
    main()
