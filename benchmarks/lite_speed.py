"""Seconds per output megapixel of the bundled ``lite`` model next to realsr-v3, side by side.

realsr-v3 is the full-size architecture with random weights (it costs what the published weights
cost; nothing is downloaded), ``lite`` is the bundled model. Both run through the same
:class:`Restorer` as ``resshift sr`` (optimised path, fp32 on the CPU), interleaved run by run on
the same random inputs, so a busy moment hits both; medians are reported. ``lite --tta`` is the
same model over the 8 flips and rotations, as ``resshift sr --tta`` runs it.

    python benchmarks/lite_speed.py                      # outputs 256x256 and 1024x1024, 3 runs
    python benchmarks/lite_speed.py --sizes 256 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench import build

from resshift_cli.imagefiles import LoadedImage
from resshift_cli.pipelines.loading import load_restorer
from resshift_cli.pipelines.options import RunOptions
from resshift_cli.pipelines.restorer import Restorer
from resshift_cli.pipelines.tasks import super_resolve
from resshift_cli.registry import BUNDLED_SR_MODEL, load_registry
from resshift_cli.runtime import resolve_device


def seconds(restorer: Restorer, image: torch.Tensor) -> float:
    started = time.perf_counter()
    restorer.restore(image)
    return time.perf_counter() - started


def seconds_tta(restorer: Restorer, image: torch.Tensor) -> float:
    """As ``resshift sr --tta``: the 8 flips and rotations, restored and averaged."""
    rgb = image[0].permute(1, 2, 0).numpy()
    loaded = LoadedImage(rgb, None, False, 8, None, "PNG")
    started = time.perf_counter()
    super_resolve(restorer, loaded, RunOptions(tta=True))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,1024", help="output sizes (square), comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    device = resolve_device("cpu")
    realsr = build(device, None)
    registry = load_registry()
    lite = load_restorer(BUNDLED_SR_MODEL, registry=registry, device=device, precision="fp32")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; medians of {args.runs} runs")
    print(
        f"{'output':>10} {'realsr-v3 s':>12} {'s/MP':>7} {'lite s':>8} {'s/MP':>7} {'lite faster':>12}"
        f" {'lite --tta s':>13} {'faster':>7}"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        image = torch.rand(1, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(size))
        times: dict[str, list[float]] = {"realsr": [], "lite": [], "tta": []}
        seconds(realsr, image)  # warm-up: allocator, oneDNN primitives
        seconds(lite, image)
        for _ in range(args.runs):
            times["realsr"].append(seconds(realsr, image))
            times["lite"].append(seconds(lite, image))
            times["tta"].append(seconds_tta(lite, image))
        big, small, tta = (statistics.median(times[k]) for k in ("realsr", "lite", "tta"))
        mp = size * size / 1e6
        print(
            f"{size:>4}x{size:<5} {big:12.2f} {big / mp:7.1f} {small:8.2f} {small / mp:7.1f} "
            f"{big / small:11.1f}x {tta:13.2f} {big / tta:6.1f}x"
        )


if __name__ == "__main__":
    main()
