"""End-to-end benchmark of x4 super-resolution with a full-size architecture (realsr-v3 by default).

No downloads: the networks get random weights (seeded), which cost exactly what the published
ones cost. For each output size it prints seconds and peak memory per stage (encode, each UNet
step, decode, and the tiling overhead around them), end to end, seconds per output megapixel,
the achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode on shape-only copies of the
models) and the machine's fp32 matrix-product GFLOP/s measured in the same run. The plain eager
path (channels_last, the folded upsampling convolutions, the cached attention biases and the
chunked full-resolution attention off) runs in the same process after the optimised one, each
with one model in memory, and the script checks that both give the same output within 1e-3.

    python benchmarks/bench.py                       # 256, 1024, 2048; 3 runs each
    python benchmarks/bench.py --sizes 256 --runs 5  # a quick look
    python benchmarks/bench.py --sizes 256 --no-plain --model sinsr   # one network call
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from resshift_cli.models import set_fast_paths
from resshift_cli.models.autoencoder import VQAutoencoder
from resshift_cli.models.unet import UNet
from resshift_cli.pipelines.latent import LatentSpace
from resshift_cli.pipelines.options import RunOptions
from resshift_cli.pipelines.restorer import Restorer
from resshift_cli.registry import load_registry
from resshift_cli.runtime import autocast_dtype, resolve_device
from resshift_cli.scheduler import ResShiftScheduler


class PeakMemory:
    """Peak memory while a block runs: CUDA's allocator peak, or the process's RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._peak = 0
        self._running = False
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._peak = self.rss()
        self._running = True
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while self._running:
            self._peak = max(self._peak, self.rss())
            time.sleep(0.005)

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        self._running = False
        if self._thread is not None:
            self._thread.join()
        return max(self._peak, self.rss())


@dataclass
class Call:
    stage: str
    seconds: float
    peak: int
    shapes: tuple[tuple[int, ...], ...]
    latent: torch.Tensor | None = None  # a decode call's input, and its codes after quantisation
    codes: torch.Tensor | None = None
    timestep: int | None = None  # a network call's step: the calls of one step share it


@dataclass
class Run:
    seconds: float
    peak: int
    calls: list[Call] = field(default_factory=list)
    output: torch.Tensor | None = None


def instrument(restorer: Restorer, calls: list[Call]) -> None:
    """Time every encode, decode and UNet call of ``restorer``'s models (on the instances)."""
    device = restorer.device

    def wrap(obj: object, attr: str, stage: str) -> None:
        original = getattr(obj, attr)

        def timed(*args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
            memory = PeakMemory(device)
            memory.start()
            started = time.perf_counter()
            out = original(*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
            shapes = tuple(tuple(a.shape) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
            latent = args[0].detach().float().cpu() if stage == "decode" else None
            timestep = int(args[1].reshape(-1)[0]) if stage == "unet" else None
            calls.append(Call(stage, seconds, memory.stop(), shapes, latent, timestep=timestep))
            return out

        setattr(obj, attr, timed)

    assert restorer.latent.autoencoder is not None
    wrap(restorer.latent.autoencoder, "encode", "encode")
    wrap(restorer.latent.autoencoder, "decode", "decode")
    wrap(restorer.unet, "forward", "unet")


def build(
    device: torch.device,
    precision: torch.dtype | None,
    optimize: bool = True,
    unet_memory: float | None = None,
    model: str = "realsr-v3",
) -> Restorer:
    """``model`` (a latent SR model of the registry) with random weights drawn from seed 0: every
    build has the same weights, and costs what the published ones cost.

    ``unet_memory`` caps the network's estimated memory (bytes; None: the restorer's default)."""
    registry = load_registry()
    spec = registry.model(model)
    ae_spec = registry.autoencoder(spec.autoencoder or "vq-f4")
    torch.manual_seed(0)
    unet = UNet(**spec.unet)
    autoencoder = VQAutoencoder(ae_spec.embed_dim, ae_spec.n_embed, ae_spec.ddconfig)
    latent = LatentSpace.from_params(autoencoder, spec.diffusion)
    return Restorer(
        unet,
        ResShiftScheduler(**spec.diffusion),
        latent,
        device,
        precision,
        sample_steps=spec.sample_steps,
        optimize=optimize,
        unet_memory=unet_memory,
    )


class FlopTable:
    """FLOPs per stage call, counted once per input shape on shape-only (meta) models."""

    def __init__(self, model: str = "realsr-v3") -> None:
        registry = load_registry()
        spec = registry.model(model)
        ae_spec = registry.autoencoder(spec.autoencoder or "vq-f4")
        with torch.device("meta"):
            self.unet = UNet(**spec.unet)
            self.autoencoder = VQAutoencoder(ae_spec.embed_dim, ae_spec.n_embed, ae_spec.ddconfig)
        # The index buffers are computed on the CPU even under the meta device: move them too.
        self.unet.to("meta")
        self.autoencoder.to("meta")
        # Nominal FLOPs: upstream's computation, so rates compare with upstream's; the fast paths
        # do some of it with fewer operations (the folded upsampling convolutions).
        set_fast_paths(self.unet, False)
        set_fast_paths(self.autoencoder, False)
        self._cache: dict[tuple[str, tuple[tuple[int, ...], ...]], int] = {}

    def flops(self, call: Call) -> int:
        key = (call.stage, call.shapes)
        if key not in self._cache:
            tensors = [torch.randn(s, device="meta") for s in call.shapes]
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                if call.stage == "encode":
                    self.autoencoder.encode(tensors[0])
                elif call.stage == "decode":
                    self.autoencoder.decode(tensors[0])
                else:
                    x, _t, lq = tensors
                    self.unet(x, torch.zeros(x.shape[0], dtype=torch.long, device="meta"), lq=lq)
            self._cache[key] = counter.get_total_flops()
        return self._cache[key]


def matmul_gflops(device: torch.device, repeats: int = 10) -> float:
    """Median fp32 2048 x 2048 matrix-product rate: the machine's practical peak."""
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def run_once(restorer: Restorer, image: torch.Tensor, seed: int) -> Run:
    """Restore ``image`` once with every stage of ``restorer`` timed."""
    calls: list[Call] = []
    instrument(restorer, calls)
    memory = PeakMemory(restorer.device)
    memory.start()
    started = time.perf_counter()
    output = restorer.restore(image, options=RunOptions(seed=seed))
    seconds = time.perf_counter() - started
    peak = memory.stop()
    # Undo the instance-level wrappers so the next run wraps the original methods again.
    for obj in (restorer.latent.autoencoder, restorer.unet):
        for attr in ("encode", "decode", "forward"):
            obj.__dict__.pop(attr, None)
    assert restorer.latent.autoencoder is not None
    quantise = restorer.latent.autoencoder.quantize
    with torch.inference_mode():
        for call in calls:
            if call.latent is not None:
                call.codes = quantise(call.latent.to(restorer.device, quantise.embedding.weight.dtype)).cpu()
    return Run(seconds, peak, calls, output)


def run_path(
    device: torch.device,
    precision: torch.dtype | None,
    optimize: bool,
    image: torch.Tensor,
    args: argparse.Namespace,
    rates: list[float],
) -> list[Run]:
    """Build one path's restorer, warm it up, time ``args.runs`` restorations, and free it.

    One model at a time is in memory, as in a user's process, so the peaks are a user's peaks.
    """
    unet_memory = None if args.unet_memory is None else args.unet_memory * 2**30
    restorer = build(device, precision, optimize, unet_memory, args.model)
    for _ in range(args.warmup):  # allocator, oneDNN primitives, the models' caches
        run_once(restorer, image, args.seed)
    runs = []
    for _ in range(args.runs):
        runs.append(run_once(restorer, image, args.seed))
        rates.append(matmul_gflops(device))
    del restorer
    gc.collect()
    return runs


def summarise(label: str, runs: list[Run], flops: FlopTable, pixels: int, peak_rate: float) -> float:
    """Print per-stage medians for ``runs``; returns the median end-to-end seconds."""
    per_stage: dict[str, list[float]] = defaultdict(list)
    peaks: dict[str, int] = defaultdict(int)
    stage_flops: dict[str, int] = defaultdict(int)
    for run in runs:
        totals: dict[str, float] = defaultdict(float)
        steps, timestep = 0, None
        for call in run.calls:
            name = call.stage
            if call.stage == "unet":
                # Tiles of one step share its timestep; each step gets one line.
                if call.timestep != timestep:
                    steps, timestep = steps + 1, call.timestep
                name = f"unet step {steps}"
            totals[name] += call.seconds
            peaks[name] = max(peaks[name], call.peak)
        for name, seconds in totals.items():
            per_stage[name].append(seconds)
        per_stage["tiling overhead"].append(run.seconds - sum(totals.values()))
        peaks["end to end"] = max(peaks["end to end"], run.peak)
    for call in runs[0].calls:
        stage = call.stage if call.stage != "unet" else "unet"
        stage_flops[stage] += flops.flops(call)
    total_flops = sum(stage_flops.values())
    e2e = statistics.median(r.seconds for r in runs)
    first_step = [c for c in runs[0].calls if c.stage == "unet"]
    first_step = [c for c in first_step if c.timestep == first_step[0].timestep]
    tiles = sum(c.shapes[0][0] for c in first_step)
    side = "x".join(str(n) for n in first_step[0].shapes[0][-2:])
    where = "on the whole latent" if tiles == 1 else f"in {tiles} tiles of {side} latent px at every step"
    print(f"  {label}: {len(runs)} runs; the network {where}")
    print(f"    {'stage':18} {'median s':>9} {'peak MB':>9}")
    for name in sorted(per_stage, key=_stage_order):
        print(f"    {name:18} {statistics.median(per_stage[name]):9.3f} {peaks.get(name, 0) / 2**20:9.0f}")
    achieved = total_flops / e2e / 1e9
    print(f"    {'end to end':18} {e2e:9.3f} {peaks['end to end'] / 2**20:9.0f}")
    print(
        f"    {e2e / (pixels / 1e6):.2f} s per output megapixel; {total_flops / 1e9:.0f} GFLOP "
        f"(encode {stage_flops['encode'] / 1e9:.0f}, unet {stage_flops['unet'] / 1e9:.0f}, "
        f"decode {stage_flops['decode'] / 1e9:.0f}); {achieved:.0f} GFLOP/s = "
        f"{achieved / peak_rate:.2f} of the matrix-product rate ({peak_rate:.0f})"
    )
    return e2e


def compare_outputs(fast: Run, plain: Run, limit: float = 1e-3) -> str:
    """One line on how the two paths' outputs agree for the same seed.

    "ok" within ``limit``. Past it, the latents are compared before quantisation: float rounding
    moves a few latent vectors across the middle between two of the 8192 densely packed codes,
    the quantiser picks the other one, and the decoded pixels around it differ. That is "ok
    before quantisation" when the latents agree within ``limit``, and a MISMATCH otherwise.
    """
    gap = (fast.output - plain.output).abs()
    diff = gap.max().item()
    if diff <= limit:
        return f"outputs agree to {diff:.2e} (ok, limit {limit:g})"
    pairs = [(f, p) for f, p in zip(fast.calls, plain.calls, strict=True) if f.latent is not None]
    before = max(float((f.latent - p.latent).abs().max()) for f, p in pairs)
    flipped = sum(int((f.codes != p.codes).any(1).sum()) for f, p in pairs)
    vectors = sum(f.codes[:, 0].numel() for f, _ in pairs)
    share = (gap.amax(1) > limit).float().mean().item()
    verdict = "ok before quantisation" if before <= limit else "MISMATCH"
    return (
        f"outputs agree to {diff:.2e}; the latents before quantisation to {before:.1e} ({verdict}, "
        f"limit {limit:g}): {flipped} of {vectors} latent vectors (tile overlaps counted twice) took "
        f"another code, {share:.3%} of output pixels differ by more than {limit:g}"
    )


def _stage_order(name: str) -> tuple[int, str]:
    order = {"encode": 0, "decode": 8, "tiling overhead": 9}
    if name.startswith("unet step"):
        return (1 + int(name.split()[-1]), name)
    return (order.get(name, 10), name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,1024,2048", help="output sizes (square), comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="runs per size and path (medians are reported)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--model",
        default="realsr-v3",
        help="a latent x4 model of the registry: realsr-v1, realsr-v3, sinsr, ...",
    )
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--no-plain", action="store_true", help="skip the plain eager comparison")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs before the measured ones")
    parser.add_argument(
        "--unet-memory",
        type=float,
        help=f"cap on the network's estimated memory in GiB (default {Restorer.UNET_MEMORY / 2**30:g}); "
        "latents above it run the network in tiles at every step",
    )
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    precision = autocast_dtype(device, args.precision)
    flops = FlopTable(args.model)
    rate_before = matmul_gflops(device)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; device {device}, "
        f"precision {'fp32' if precision is None else precision}; model {args.model} (random weights)"
    )
    print(f"fp32 matrix product (2048^2): {rate_before:.0f} GFLOP/s (measured again after every run)")
    rates = [rate_before]
    for size in (int(s) for s in args.sizes.split(",")):
        generator = torch.Generator().manual_seed(size)
        image = torch.rand(1, 3, size // 4, size // 4, generator=generator)
        print(
            f"\noutput {size}x{size} (input {size // 4}x{size // 4}); autoencoder tiles of at most "
            f"{Restorer.AE_TILE.get(device.type, Restorer.AE_TILE['cpu'])} latent px"
        )
        fast_runs = run_path(device, precision, True, image, args, rates)
        plain_runs = [] if args.no_plain else run_path(device, precision, False, image, args, rates)
        # The machine's rate is the best seen: a busy moment must not flatter the ratio.
        peak_rate = max(rates)
        e2e = summarise("optimised", fast_runs, flops, size * size, peak_rate)
        if plain_runs:
            e2e_plain = summarise("plain eager", plain_runs, flops, size * size, peak_rate)
            print(f"  speed-up {e2e_plain / e2e:.2f}x; {compare_outputs(fast_runs[0], plain_runs[0])}")
    print(f"\nmatrix-product rate over the run: {', '.join(f'{r:.0f}' for r in rates)} GFLOP/s")


if __name__ == "__main__":
    main()
