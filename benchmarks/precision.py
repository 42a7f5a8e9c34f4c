"""How far fp16 and bf16 autocast land from fp32, on the authors' parity fixtures.

For each fixture of ../shared/reference/parity (sr, inpaint, face; random-weight models of the
published architectures), the single pass runs with the fixture's recorded noise in fp32, fp16 and
bf16 autocast, and the script prints the largest and the mean absolute difference from fp32 of the
final latent (before quantisation) and of the decoded output, both on the [-1, 1] scale, and fp32's
own difference from upstream's recorded values.

    python benchmarks/precision.py [--device cpu|cuda] [--reference ../shared/reference]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from resshift_cli import ResShiftScheduler, Restorer, UNet, VQAutoencoder
from resshift_cli.checkpoints import load_into, read_state_dict
from resshift_cli.pipelines.latent import LatentSpace
from resshift_cli.runtime import dtype_of, resolve_device

CASES = ("sr-tiny", "inpaint-tiny", "face-tiny")
DEFAULT_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def restorer_for(folder: Path, device: torch.device) -> Restorer:
    """The fixture's model as the CLI runs it (optimised path) on ``device``, fp32."""
    case = json.loads((folder / "case.json").read_text())
    unet = UNet(**case["unet_params"])
    autoencoder = VQAutoencoder(**case["autoencoder_params"])
    load_into(unet, read_state_dict(folder / "unet.safetensors"), "unet")
    load_into(autoencoder, read_state_dict(folder / "autoencoder.safetensors"), "autoencoder")
    params = case["diffusion_params"]
    return Restorer(unet, ResShiftScheduler(**params), LatentSpace.from_params(autoencoder, params), device)


def run(
    restorer: Restorer, tensors: dict[str, torch.Tensor], draws: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(final latent, decoded output) of the single pass with the recorded noise."""
    device = restorer.device
    lq = tensors["lq"].to(device)
    mask = tensors["mask"].to(device) if "mask" in tensors else None
    noise = [tensors[f"noise_{i}"].to(device) for i in range(draws)]
    with torch.inference_mode(), restorer.autocast():
        latent = restorer.chain(restorer.encode(lq), lq, mask=mask, noise=noise)
        output = restorer.decode(latent)
    return latent.float().cpu(), output.float().cpu()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}; absolute differences on the [-1, 1] scale")
    print(
        f"{'fixture':14} {'precision':9} {'latent max':>11} {'latent mean':>12} "
        f"{'output max':>11} {'output mean':>12}"
    )
    for name in CASES:
        folder = args.reference / "parity" / name
        tensors = load_file(str(folder / "tensors.safetensors"))
        draws = json.loads((folder / "case.json").read_text())["noise_draws"]
        full = restorer_for(folder, device)
        latent32, output32 = run(full, tensors, draws)
        rows = {
            "fp32 vs upstream": (latent32 - tensors["final_latent"], output32 - tensors["sample"]),
        }
        for precision in ("fp16", "bf16"):
            half = dataclasses.replace(full, precision=dtype_of(precision))
            latent, output = run(half, tensors, draws)
            rows[precision] = (latent - latent32, output - output32)
        for label, (latent_diff, output_diff) in rows.items():
            print(
                f"{name:14} {label:9} {latent_diff.abs().max():11.2e} {latent_diff.abs().mean():12.2e} "
                f"{output_diff.abs().max():11.2e} {output_diff.abs().mean():12.2e}"
            )


if __name__ == "__main__":
    main()
