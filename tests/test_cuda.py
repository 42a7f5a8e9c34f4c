"""On a CUDA GPU: parity with upstream in fp32, half precisions close to it, one pass where it must
be, images sharing passes, and a real out-of-memory error handled. Skipped without CUDA.

On a device machine, where ../shared does not travel: ``bash scripts/cuda-tests.sh`` (it says how).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from reference import PARITY_CASES, case, reference_path
from safetensors.torch import load_file
from tinymodels import tiny_restorer

from resshift_cli.pipelines.options import RunOptions
from resshift_cli.pipelines.restorer import Restorer

pytestmark = [pytest.mark.cuda, pytest.mark.shared]

CUDA = torch.device("cuda")


def _on_cuda(name: str, optimize: bool = True) -> Restorer:
    restorer = tiny_restorer(name, optimize=optimize)
    return dataclasses.replace(restorer, device=CUDA)


def _single_pass(restorer: Restorer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    t = load_file(str(reference_path("parity", name, "tensors.safetensors")), device="cuda")
    noise = [t[f"noise_{i}"] for i in range(case(name)["noise_draws"])]
    with torch.inference_mode(), restorer.autocast():
        latent = restorer.chain(restorer.encode(t["lq"]), t["lq"], mask=t.get("mask"), noise=noise)
        return latent.float().cpu(), restorer.decode(latent).float().cpu()


def _reference(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(reference_path("parity", name, "tensors.safetensors")))


@pytest.mark.parametrize("optimize", [True, False], ids=["optimised", "plain"])
@pytest.mark.parametrize("name", PARITY_CASES)
def test_fp32_parity_with_upstream(name: str, optimize: bool) -> None:
    latent, sample = _single_pass(_on_cuda(name, optimize), name)
    t = _reference(name)
    assert (latent - t["final_latent"]).abs().max() < 1e-3
    assert (sample - t["sample"]).abs().max() < 1e-2


@pytest.mark.parametrize(
    ("precision", "bound"), [(torch.float16, 0.1), (torch.bfloat16, 0.5)], ids=["fp16", "bf16"]
)
@pytest.mark.parametrize("name", PARITY_CASES)
def test_half_precisions_stay_close_to_fp32(name: str, precision: torch.dtype, bound: float) -> None:
    """The latent before quantisation (the decoded outputs of these random-weight models can differ
    more, where the quantiser picks another codebook entry)."""
    full = _on_cuda(name)
    latent32, _ = _single_pass(full, name)
    latent, _ = _single_pass(dataclasses.replace(full, precision=precision), name)
    assert 0 < (latent - latent32).abs().max() < bound


def test_an_image_that_fits_one_tile_is_the_single_pass() -> None:
    restorer = _on_cuda("sr-tiny")
    image = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    out = restorer.restore(image, options=RunOptions(seed=7))
    noise_gen = torch.Generator().manual_seed(7)
    shape = (1, *restorer.latent_shape(24, 32))
    noise = [torch.randn(shape, generator=noise_gen).to(CUDA) for _ in range(restorer.noise_draws)]
    ref = restorer.sample(image.to(CUDA) * 2 - 1, noise=noise)
    assert torch.equal(out, ((ref.clamp(-1, 1) + 1) / 2).cpu())


def test_images_sharing_passes_equal_one_by_one() -> None:
    restorer = _on_cuda("sr-tiny")
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    together = restorer.restore(images, options=RunOptions(seed=3, batch_size=3))
    for i in range(3):
        alone = restorer.restore(images[i : i + 1], options=RunOptions(seed=3))
        assert (together[i : i + 1] - alone).abs().max() < 1e-4


def test_tiles_on_the_gpu_agree_with_the_cpu() -> None:
    image = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(2))
    options = RunOptions(seed=5, tile=16, overlap=8, batch_size=2)
    on_gpu = _on_cuda("sr-tiny").restore(image, options=options)
    on_cpu = tiny_restorer("sr-tiny", optimize=True).restore(image, options=options)
    assert (on_gpu - on_cpu).abs().max() < 1e-2


def test_a_real_out_of_memory_error_is_retried_then_sent_to_the_cpu() -> None:
    """With the process allowed only a sliver of the GPU, a large image does not fit: the restorer
    retries with smaller tiles and, if need be, on the CPU, and the result is complete."""
    restorer = _on_cuda("sr-tiny")
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(CUDA).total_memory
    allowed = torch.cuda.memory_allocated(CUDA) + 64 * 2**20
    torch.cuda.set_per_process_memory_fraction(allowed / total, CUDA)
    notices: list[str] = []
    try:
        image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(4))
        out = restorer.restore(image, options=RunOptions(seed=1, tile=512), on_notice=notices.append)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
    assert notices and notices[0].startswith("out of cuda memory")
    assert out.shape == (1, 3, 2048, 2048) and torch.isfinite(out).all()
