"""The training loop behind ``resshift train``: ResShift's x0-prediction loss on pairs made on the fly.

One step: take the global batch of (HQ crop, LQ) pairs for this step, encode HQ and the bicubic
upsampled LQ (latent space, frozen autoencoder) or keep them as pixels, draw timesteps and noise,
and minimise ``ResShiftScheduler.training_loss`` with AdamW; then update the EMA weights. The network is
conditioned on :meth:`LatentSpace.network_lq`: the LQ itself in latent space, as upstream,
and its bicubic upsampling in pixel space, where the network runs at the output size and its
feature extractor could only shrink the LQ (so a pixel-space model has ``lq_size == image_size``);
the sampler uses the same rule, so trained models restore with ``resshift sr`` unchanged.

Exact resumption: every random draw comes from a generator seeded by (seed, purpose, step[, sample])
(see :mod:`resshift_cli.training.data`); the global torch RNG (dropout) is reseeded from (seed, step,
rank) before each step; the learning rate is a function of the step. A checkpoint thus only needs
the weights, the EMA weights, the optimizer (and fp16 gradient-scaler) state and the step, and a
resumed run repeats the uninterrupted one bit for bit on the CPU.

Checkpoint ``<output_dir>/checkpoints/step-NNNNNNN/``:

* ``model.safetensors``, ``ema.safetensors``: UNet state dicts (plain upstream keys);
* ``optimizer.safetensors``: optimizer tensors keyed ``<parameter name>.<state name>``;
* ``state.json``: step, data position, seed, config hash and the trajectory config, the optimizer's
  parameter groups and non-tensor state, the gradient scaler's state, the last validation scores,
  and the losses of the logging interval in progress (so the resumed run logs the same means).

A checkpoint is written every ``train.checkpoint_every`` steps, at the end, and when SIGINT,
SIGTERM or SIGHUP asks the run to stop: the step in progress finishes and is saved.

No pickle anywhere. At the end ``<output_dir>/<name>.safetensors`` holds the EMA weights (stored as
``train.weights_dtype``) and ``<output_dir>/registry.toml`` an entry for them (``resshift sr
--registry ... --model <name>``).

Several processes (``torchrun --nproc-per-node N``): WORLD_SIZE/RANK/LOCAL_RANK are read from the
environment, the process group uses NCCL on CUDA and Gloo on the CPU, each process takes its slice
of the global batch, DistributedDataParallel averages the gradients, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from resshift_cli import interrupts
from resshift_cli.atomic import write_atomically
from resshift_cli.checkpoints import (
    CheckpointError,
    compact_state_dict,
    load_into,
    read_state_dict,
    save_safetensors,
)
from resshift_cli.distributed import World
from resshift_cli.hub import WeightsError
from resshift_cli.metrics import psnr, ssim
from resshift_cli.models.autoencoder import VQAutoencoder
from resshift_cli.models.unet import UNet
from resshift_cli.pipelines.latent import LatentSpace
from resshift_cli.pipelines.restorer import Restorer
from resshift_cli.registry import BUNDLED_SR_MODEL
from resshift_cli.runtime import RuntimeSetupError, dtype_of, resolve_device
from resshift_cli.scheduler import ResShiftScheduler
from resshift_cli.training.config import (
    OptimConfig,
    TrainConfig,
    TrainConfigError,
    config_hash,
    dump_toml,
    is_path_like,
    trajectory_dict,
)
from resshift_cli.training.data import (
    DataError,
    PairMaker,
    StepBatches,
    ValPair,
    derive_seed,
    generator,
    list_images,
    validation_pairs,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "TrainResult",
    "TrainingInterrupted",
    "latest_checkpoint",
    "load_optimizer_state",
    "lr_at",
    "optimizer_state",
    "run_training",
    "update_ema",
]

CHECKPOINT_FORMAT = "resshift-train-checkpoint/1"
_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    step: int
    """Optimizer steps done in total (including those before a resume)."""
    weights: Path
    """The final EMA weights (safetensors, plain UNet keys): the model to use."""
    checkpoint: Path
    """The last checkpoint directory."""
    log: Path
    """The JSONL log: ``{"step", "loss", "lr", "grad_norm", "time"}`` and ``{"step", "val_psnr",
    "val_ssim", "val_images", "time"}`` (``time``: ISO 8601, UTC)."""
    registry: Path
    """A registry file with an entry for the trained model."""
    loss: float | None
    """Mean loss of the last logged interval (None if this call ran no step)."""
    validation: dict[str, float] | None
    """The last validation scores, if any (rank 0 of a distributed run; None on the others)."""


class TrainingInterrupted(KeyboardInterrupt):
    """A signal (Ctrl-C, SIGTERM, SIGHUP) stopped the run; ``exit_code`` is 128 + its number.

    The first signal lets the step in progress finish and saves a checkpoint at it (``saved``);
    one during setup, or a second one, stops at once, and the last checkpoint is the newest before.
    """

    def __init__(
        self, signum: int, step: int | None = None, checkpoint: Path | None = None, saved: bool = False
    ) -> None:
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        self.saved = saved
        super().__init__(self.message())

    @property
    def exit_code(self) -> int:
        return interrupts.exit_code(self)

    def message(self) -> str:
        """The one line the CLI prints: what was saved, and how to go on."""
        try:
            name = signal.Signals(self.signum).name
        except ValueError:
            name = f"signal {self.signum}"
        how = f"interrupted by {name}"
        if self.saved:
            return f"{how} at step {self.step}: saved {self.checkpoint}; continue with --resume"
        if self.checkpoint is not None:
            return f"{how}: nothing saved after {self.checkpoint}; continue from it with --resume"
        return f"{how} before the first checkpoint: nothing saved"


# ---------------------------------------------------------------------------------------------------
# Schedule and EMA.


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warm-up, then constant or cosine.

    Warm-up reaches ``lr`` at step ``warmup_steps``; the cosine then falls to ``min_lr`` at
    ``total_steps``.
    """
    if step <= optim.warmup_steps:
        return optim.lr * step / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    return optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for every parameter; buffers are copied."""
    for averaged, current in zip(ema.parameters(), model.parameters(), strict=True):
        averaged.mul_(decay).add_(current.detach(), alpha=1 - decay)
    for averaged, current in zip(ema.buffers(), model.buffers(), strict=True):
        averaged.copy_(current)


# ---------------------------------------------------------------------------------------------------
# Optimizer state as tensors + JSON.


def _param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """The model's name of each optimizer parameter, in the optimizer's (state-dict) order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state split into tensors (``<param name>.<state name>``) and JSON values."""
    names = _param_names(optimizer, model)
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{names[index]}.{key}"] = value
            else:
                scalars.setdefault(names[index], {})[key] = value
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in group.items() if k != "params"}
        for group in state_dict["param_groups"]
    ]
    return tensors, {"param_groups": groups, "state": scalars}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
) -> None:
    """Restore what :func:`optimizer_state` saved (matched by parameter name, so order-proof)."""
    index = {name: i for i, name in enumerate(_param_names(optimizer, model))}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, sub = key.rpartition(".")
        if name not in index:
            raise TrainConfigError(f"optimizer state for unknown parameter {name!r}; is it the same model?")
        state.setdefault(index[name], {})[sub] = value
    for name, values in meta["state"].items():
        state.setdefault(index[name], {}).update(values)
    groups = []
    start = 0
    for saved, current in zip(meta["param_groups"], optimizer.param_groups, strict=True):
        group = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
        group["params"] = list(range(start, start + len(current["params"])))
        start += len(current["params"])
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------------------------------
# Processes and devices.


def _device(name: str, procs: World) -> torch.device:
    try:
        device = resolve_device(name)
    except RuntimeSetupError:
        raise RuntimeSetupError(
            f"train.device = {name!r} is not available here; use train.device=cpu (or auto)"
        ) from None
    if device.type == "cuda" and procs.size > 1:
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    return device


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if device.type != "cuda":
        raise TrainConfigError(f"train.precision = {precision!r} needs CUDA; use fp32 on {device.type}")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise TrainConfigError("train.precision: bf16 is not supported by this GPU; use fp16 or fp32")
    return dtype_of(precision)


# ---------------------------------------------------------------------------------------------------
# Models.


@dataclass
class _Models:
    unet: UNet
    diffusion: ResShiftScheduler
    latent: LatentSpace
    unet_params: dict[str, Any]
    diffusion_params: dict[str, Any]
    autoencoder_params: dict[str, Any] | None
    autoencoder_path: Path | None


def _build_models(config: TrainConfig, quiet: bool) -> _Models:
    """Build the UNet (random, or ``init``'s weights) and the frozen autoencoder, all on the CPU."""
    from resshift_cli import hub
    from resshift_cli.registry import load_registry

    model = config.model
    registry = load_registry(model.registry)
    unet_params = dict(model.unet)
    diffusion_params = dict(model.diffusion)
    ae_name = model.autoencoder
    init_spec = None
    if model.init is not None and not is_path_like(model.init):
        init_spec = registry.model(model.init)
        unet_params = {**init_spec.unet, **unet_params}
        diffusion_params = {**init_spec.diffusion, **diffusion_params}
        ae_name = ae_name if ae_name is not None else init_spec.autoencoder

    ae_params: dict[str, Any] | None = None
    ae_path: Path | None = None
    if ae_name is not None and is_path_like(ae_name):
        ae_params, ae_path = dict(model.autoencoder_params or {}), Path(ae_name)
    elif ae_name is not None:
        spec = registry.autoencoder(ae_name)
        ae_params = {"embed_dim": spec.embed_dim, "n_embed": spec.n_embed, "ddconfig": dict(spec.ddconfig)}
        try:
            ae_path = hub.fetch(ae_name, registry, quiet=quiet)[ae_name]
        except WeightsError as exc:
            raise type(exc)(_train_hints(str(exc))) from None

    try:
        unet = UNet(**unet_params)
    except (TypeError, ValueError) as exc:
        raise TrainConfigError(f"model.unet: {exc}") from None
    try:
        diffusion = ResShiftScheduler(**diffusion_params)
    except (TypeError, ValueError) as exc:
        raise TrainConfigError(f"model.diffusion: {exc}") from None
    if model.init is not None:
        if init_spec is not None:
            try:
                resolved = hub.resolve_model(init_spec, registry, autoencoder=ae_path, quiet=quiet)
            except WeightsError as exc:
                raise type(exc)(_train_hints(str(exc))) from None
            init_path = resolved.unet_path
        else:
            init_path = Path(model.init)
        load_into(unet, read_state_dict(init_path), f"the UNet (model.init = {model.init!r})")

    autoencoder = None
    if ae_params is not None and ae_path is not None:
        try:
            autoencoder = VQAutoencoder(**ae_params)
        except (TypeError, KeyError, ValueError) as exc:
            raise TrainConfigError(f"model.autoencoder_params: {exc}") from None
        load_into(autoencoder, read_state_dict(ae_path), f"the autoencoder {ae_name!r}")
        autoencoder.eval().requires_grad_(False)
    latent = LatentSpace.from_params(autoencoder, diffusion_params)
    return _Models(unet, diffusion, latent, unet_params, diffusion_params, ae_params, ae_path)


_TRAIN_HINTS = {
    f", or use the bundled model that needs no download: --model {BUNDLED_SR_MODEL}": "",
    "pass --checkpoint PATH": "give a weights file (model.init=PATH)",
    "pass --autoencoder PATH": "give an autoencoder file (model.autoencoder=PATH)",
}
"""The restore commands' options that weights messages suggest, and what ``train`` takes instead."""


def _train_hints(message: str) -> str:
    """A weights message that names ``train``'s keys instead of options ``train`` does not have."""
    for theirs, ours in _TRAIN_HINTS.items():
        message = message.replace(theirs, ours)
    return message


def _check_shapes(config: TrainConfig, models: _Models) -> None:
    """Refuse, with the reason, a model/crop combination the network cannot run on."""
    unet, diffusion, ae = models.unet, models.diffusion, models.latent.autoencoder
    sf = models.latent.sf
    if not unet.cond_lq or unet.cond_mask:
        raise TrainConfigError(
            "model.unet: super-resolution training needs cond_lq = true, cond_mask = false"
        )
    if ae is None:
        if diffusion.latent_flag:
            raise TrainConfigError("model.diffusion.latent_flag must be false for a pixel-space model")
        if unet.in_channels != 3 or unet.out_channels != 3:
            raise TrainConfigError("model.unet: a pixel-space model needs in_channels = out_channels = 3")
        if unet.lq_factor != 1:
            raise TrainConfigError(
                "model.unet: a pixel-space model is conditioned on the upsampled LQ at the output size, "
                "so lq_size must equal image_size"
            )
        factor = 1
    else:
        if not diffusion.latent_flag:
            raise TrainConfigError("model.diffusion.latent_flag must be true with an autoencoder")
        if unet.in_channels != ae.embed_dim or unet.out_channels != ae.embed_dim:
            raise TrainConfigError(
                f"model.unet: in_channels and out_channels must be the autoencoder's {ae.embed_dim} channels"
            )
        factor = ae.downsample_factor
        if factor != sf * unet.lq_factor:
            raise TrainConfigError(
                f"model.unet: the LQ (1/{sf} of the crop) must be lq_size/image_size = {unet.lq_factor} "
                f"times the latent (1/{factor} of the crop)"
            )
    multiple = math.lcm(factor * unet.size_multiple, sf)
    for key, crop in (("data.crop", config.data.crop), ("data.val_crop", config.data.val_crop)):
        if crop is not None and crop % multiple:
            raise TrainConfigError(f"{key} = {crop} must be a multiple of {multiple} for this model")


# ---------------------------------------------------------------------------------------------------
# Checkpoints.


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint of the highest step under ``output_dir/checkpoints``, or None."""
    return next(iter(_checkpoints(output_dir)), None)


def _checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.fullmatch(p.name)) and (p / "state.json").is_file()
    ]
    return [p for _, p in sorted(found, reverse=True)]


def _save_checkpoint(
    directory: Path,
    unet: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    state: dict[str, Any],
) -> None:
    """Write a checkpoint directory atomically (a temporary directory, renamed when complete)."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(unet.state_dict(), tmp / "model.safetensors")
    save_safetensors(ema.state_dict(), tmp / "ema.safetensors")
    tensors, meta = optimizer_state(optimizer, unet)
    save_safetensors(tensors, tmp / "optimizer.safetensors")
    full = {**state, "optimizer": meta, "grad_scaler": scaler.state_dict() if scaler is not None else None}
    (tmp / "state.json").write_text(json.dumps(full, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def _load_checkpoint(
    directory: Path,
    config: TrainConfig,
    unet: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    if state.get("format") != CHECKPOINT_FORMAT:
        raise TrainConfigError(f"{directory}: not a checkpoint of this trainer ({state.get('format')!r})")
    if state["config_hash"] != config_hash(config):
        changed = _changed_keys(state["config"], trajectory_dict(config))
        raise TrainConfigError(
            f"{directory}: the configuration changed since this checkpoint ({', '.join(changed)}); "
            "resuming would not continue the same run"
        )
    load_into(unet, read_state_dict(directory / "model.safetensors"), "the UNet (checkpoint)")
    load_into(ema, read_state_dict(directory / "ema.safetensors"), "the EMA UNet (checkpoint)")
    from safetensors.torch import load_file

    load_optimizer_state(
        optimizer, unet, load_file(str(directory / "optimizer.safetensors")), state["optimizer"]
    )
    if scaler is not None:
        scaler.load_state_dict(state["grad_scaler"])
    return state


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _remove_unfinished_checkpoints(output_dir: Path) -> None:
    """Remove the temporary folders of checkpoints whose writing a killed run left unfinished."""
    root = output_dir / "checkpoints"
    if root.is_dir():
        for tmp in root.glob(".step-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)


def _prune(output_dir: Path, keep: int) -> None:
    if keep:
        for old in _checkpoints(output_dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Log, progress and interrupts.


class _Log:
    """The JSONL log (rank 0 only), every record stamped with its UTC time; a resumed run drops the
    records after its checkpoint."""

    def __init__(self, path: Path, enabled: bool, start_step: int) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if start_step and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    step = json.loads(line)["step"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a crash
                if step <= start_step:
                    kept.append(line + "\n")
        path.write_text("".join(kept), encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        if self.enabled:
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({**record, "time": now.replace("+00:00", "Z")}) + "\n")


class _Progress:
    """Progress on stderr (nothing when quiet or not rank 0): a rich bar on a terminal; into a file
    or pipe, a plain line at every logged step with the loss, the time per step, the time elapsed
    and the time left."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.total = total
        self.start = self.step = start
        self.started = time.monotonic()  # again when entered: the rate counts the steps alone
        self.console = None
        self.progress = None
        if not enabled:
            return
        from rich.console import Console

        self.console = Console(stderr=True)
        if not self.console.is_terminal:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, status="")

    def __enter__(self) -> _Progress:
        self.started = time.monotonic()
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def notice(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def advance(self, status: str | None = None) -> None:
        self.step += 1
        if self.progress is not None:
            fields = {"status": status} if status is not None else {}
            self.progress.update(self.task, advance=1, **fields)
        elif status is not None:
            self.notice(f"step {self.step}/{self.total}  {status}  {self.timing()}")

    def timing(self) -> str:
        """Seconds per step of this call so far, the time elapsed, and the time left at that rate."""
        elapsed = time.monotonic() - self.started
        per_step = elapsed / max(1, self.step - self.start)
        left = per_step * (self.total - self.step)
        return f"{per_step:.3g} s/step  elapsed {_clock(elapsed)}  left {_clock(left)}"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


_STOP_SIGNALS = (signal.SIGINT, *interrupts.HANDLED)


class _Interrupts:
    """SIGINT, SIGTERM and SIGHUP while a run is in progress.

    While ``deferring`` (the training loop), the first signal is only recorded in ``requested``,
    so that the step in progress finishes and the loop can save a checkpoint at it; otherwise (setup,
    or a second signal) :class:`TrainingInterrupted` is raised at once. Handlers can only be set
    from the main thread; elsewhere signals keep their usual effect.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self.deferring = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in _STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.deferring and self.requested is None:
            self.requested = signum
            return
        raise TrainingInterrupted(signum)


def _worker_ignores_stop_signals(_worker_id: int) -> None:
    """Data workers leave stopping to the main process, which still needs them to finish its step
    (a terminal's Ctrl-C and a closed terminal signal every process of the job)."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _left_out_notices(left_out: Sequence[tuple[Path, str]], what: str, limit: int = 10) -> list[str]:
    """One line per file left out (the first ``limit``), then a count of the rest."""
    lines = [f"{what} left out: {path} ({reason})" for path, reason in left_out[:limit]]
    if len(left_out) > limit:
        lines.append(f"... and {len(left_out) - limit} more {what}s left out")
    return lines


def _check_output_dir(out: Path) -> None:
    """Refuse an output folder that cannot be created or written, before anything else is done.

    Nothing is created here: the nearest existing folder is where the run's files (or its missing
    folders) will be made, and a nameless temporary file proves that it takes writes.
    """
    existing = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise TrainConfigError(f"output_dir {out}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise TrainConfigError(
            f"output_dir {out}: cannot write in {existing} ({exc.strerror or exc})"
        ) from None


# ---------------------------------------------------------------------------------------------------
# The run.


def run_training(config: TrainConfig, *, resume: bool, quiet: bool) -> TrainResult:
    """Train (or, with ``resume``, continue training) the model described by ``config``.

    Without ``resume`` the output directory must hold no checkpoint; with it, training continues
    from the latest one and repeats exactly what an uninterrupted run would have done. Started by
    ``torchrun`` it runs one process of a distributed run (see the module docstring). The caller's
    global RNG state is left as it was. Called from the main thread, SIGINT, SIGTERM and SIGHUP
    stop the run after the current step with a checkpoint at it and raise
    :class:`TrainingInterrupted`.
    """
    procs = World.from_env()
    with _Interrupts() as interrupts:
        device = _device(config.train.device, procs)
        started_group = False
        if procs.size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            started_group = True
        fork_devices = [device.index or 0] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=fork_devices):
                return _Run(config, procs, device, resume=resume, quiet=quiet).train(interrupts)
        except TrainingInterrupted as exc:
            if not exc.saved:
                exc.checkpoint = latest_checkpoint(config.output_dir)
                exc.args = (exc.message(),)
            raise
        finally:
            if started_group:
                dist.destroy_process_group()


class _Run:
    """One process's share of a training run: models, optimizer, data, and the loop."""

    def __init__(
        self, config: TrainConfig, procs: World, device: torch.device, *, resume: bool, quiet: bool
    ) -> None:
        self.config = config
        self.procs = procs
        self.device = device
        self.quiet = quiet
        self.out = config.output_dir
        self.dtype = _autocast_dtype(config.train.precision, device)

        # Every path first: a wrong one is reported before weights are downloaded or built.
        _check_output_dir(self.out)
        self.resumed_from = latest_checkpoint(self.out)
        if resume and self.resumed_from is None:
            raise TrainConfigError(f"{self.out}: no checkpoint to resume from")
        if not resume and self.resumed_from is not None:
            raise TrainConfigError(
                f"{self.out}: already holds checkpoints; resume the run or choose another output_dir"
            )
        data = config.data
        paths, left_out = list_images(data.train, data.crop)
        self.notices = _left_out_notices(left_out, "training image")
        if data.val is not None and procs.is_main:
            list_images(data.val, data.val_crop or data.crop)
        for key, value in (
            ("model.init", config.model.init),
            ("model.autoencoder", config.model.autoencoder),
        ):
            if value is not None and is_path_like(value) and not Path(value).is_file():
                raise CheckpointError(f"{key}: checkpoint not found: {value}")

        torch.manual_seed(derive_seed(config.seed, "init"))
        # Rank 0 first: it alone downloads missing weights, the others then find them cached.
        self._barrier(not procs.is_main)
        self.models = _build_models(config, quiet)
        self._barrier(procs.is_main)
        _check_shapes(config, self.models)
        self.unet = self.models.unet.to(device)
        if self.models.latent.autoencoder is not None:
            self.models.latent.autoencoder.to(device)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False)
        # Validation restores with the EMA weights as `resshift sr` does. Made before the first
        # step, so the layout it gives the EMA and the autoencoder holds for a whole run, resumed
        # or not (the frozen autoencoder's encoding is part of every training step).
        self.restorer = Restorer(self.ema, self.models.diffusion, self.models.latent, device, self.dtype)
        optim = config.optim
        self.optimizer = torch.optim.AdamW(
            self.unet.parameters(),
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None

        self.start = 0
        self.validation: dict[str, float] | None = None
        # The losses of the logging interval that a checkpoint cut: summed over processes, and steps.
        self.carried = (0.0, 0)
        if self.resumed_from is not None:
            state = _load_checkpoint(
                self.resumed_from, config, self.unet, self.ema, self.optimizer, self.scaler
            )
            self.start = int(state["step"])
            self.validation = state.get("validation")
            interval = state.get("log_interval") or {"loss_sum": 0.0, "steps": 0}
            self.carried = (float(interval["loss_sum"]), int(interval["steps"]))

        sf = self.models.latent.sf
        self.maker = PairMaker(
            paths, data.crop, sf, data.degradation, data.realesrgan, data.rotate, config.seed, data.shrink
        )
        self.val_pairs: list[ValPair] = []
        if data.val is not None and procs.is_main:
            self.val_pairs, val_left_out = validation_pairs(
                data.val,
                data.val_images,
                data.val_crop or data.crop,
                sf,
                data.degradation,
                data.realesrgan,
                config.seed,
            )
            self.notices += _left_out_notices(val_left_out, "validation image")
        self.net: nn.Module = self.unet
        if procs.size > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.unet, device_ids=device_ids)

    def _barrier(self, wait: bool) -> None:
        if wait and self.procs.size > 1:
            dist.barrier()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train(self, interrupts: _Interrupts) -> TrainResult:
        config, procs, out = self.config, self.procs, self.out
        total = config.train.steps
        if procs.is_main:
            out.mkdir(parents=True, exist_ok=True)
            text = dump_toml(config.to_dict())
            write_atomically(out / "config.toml", lambda temp: temp.write_text(text, encoding="utf-8"))
            _remove_unfinished_checkpoints(out)
        log = _Log(out / "log.jsonl", procs.is_main, self.start)
        batches = StepBatches(
            self.maker, self.start + 1, total, config.train.batch_size, procs.rank, procs.size
        )
        loader = torch.utils.data.DataLoader(
            batches,
            batch_size=None,
            num_workers=config.data.workers,
            worker_init_fn=_worker_ignores_stop_signals,
        )
        step = self.start
        interval: list[torch.Tensor] = []
        last_loss: float | None = None
        reported: set[str] = set()
        with _Progress(procs.is_main and not self.quiet, total, self.start) as progress:
            for line in self.notices:
                progress.notice(line)
            if self.start:
                progress.notice(f"resuming from {self.resumed_from} (step {self.start})")
            interrupts.deferring = True
            for step, batch in zip(range(self.start + 1, total + 1), loader, strict=True):
                for message in batch.unreadable:
                    if message not in reported:
                        reported.add(message)
                        progress.notice(f"training image left out: {message}")
                if batch.error is not None or batch.hq is None or batch.lq is None:
                    raise DataError(batch.error or "no batch")
                torch.manual_seed(derive_seed(config.seed, "global", step, procs.rank))
                lr = lr_at(step, config.optim, total)
                loss, grad_norm = self._step(step, lr, batch.hq, batch.lq)
                interval.append(loss)
                status = None
                if step % config.train.log_every == 0 or step == total:
                    loss_sum, steps = self._interval(interval)
                    last_loss = loss_sum / (steps * procs.size)
                    interval, self.carried = [], (0.0, 0)
                    log.write({"step": step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm})
                    status = f"loss {last_loss:.4g}  lr {lr:.3g}"
                every = config.train.val_every
                if self.val_pairs and ((every and step % every == 0) or step == total):
                    self.validation = self._validate()
                    log.write({"step": step, **self.validation, "val_images": len(self.val_pairs)})
                    progress.notice(
                        f"step {step}: PSNR {self.validation['val_psnr']:.2f} dB, "
                        f"SSIM {self.validation['val_ssim']:.4f} (Y channel)"
                    )
                saved = step % config.train.checkpoint_every == 0 or step == total
                if saved:
                    self._checkpoint(step, interval)
                progress.advance(status)
                signum = self._stop_requested(interrupts)
                if signum is not None:
                    if not saved:
                        self._checkpoint(step, interval)
                    raise TrainingInterrupted(signum, step, self._checkpoint_dir(step), saved=True)
            interrupts.deferring = False

        weights = out / f"{config.name}.safetensors"
        registry = out / "registry.toml"
        if procs.is_main:
            stored = compact_state_dict(self.ema.state_dict(), dtype_of(config.train.weights_dtype))
            save_safetensors(stored, weights)
            entry = _registry_entry(config, self.models, weights, step)
            write_atomically(registry, lambda temp: temp.write_text(entry, encoding="utf-8"))
        self._barrier(True)
        return TrainResult(
            step, weights, self._checkpoint_dir(step), log.path, registry, last_loss, self.validation
        )

    def _interval(self, losses: Sequence[torch.Tensor]) -> tuple[float, int]:
        """The logging interval so far: its losses summed over steps and processes, and its steps."""
        total = (
            torch.stack(list(losses)).double().sum()
            if losses
            else torch.zeros((), dtype=torch.float64, device=self.device)
        )
        if self.procs.size > 1:
            dist.all_reduce(total)
        return self.carried[0] + float(total), self.carried[1] + len(losses)

    def _stop_requested(self, interrupts: _Interrupts) -> int | None:
        """The signal that asks to stop after this step, agreed by every process (they must all save
        the same step)."""
        signum = interrupts.requested or 0
        if self.procs.size > 1:
            flag = torch.tensor([signum], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum or None

    def _checkpoint_dir(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step-{step:07d}"

    def _step(self, step: int, lr: float, hq: torch.Tensor, lq: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One optimizer step on this process's slice; returns its (unreduced) loss and the gradient norm."""
        config, diffusion, latent = self.config, self.models.diffusion, self.models.latent
        hq = hq.to(self.device) * 2 - 1
        lq = lq.to(self.device) * 2 - 1
        with torch.no_grad(), self._autocast():
            z_start = latent.encode(hq).float()
            z_y = latent.encode(latent.upsample(lq)).float()
        cond = latent.network_lq(lq)

        # Timesteps and noise of the whole global batch, then this process's slice: the same draws
        # whatever the number of processes.
        gen = generator(config.seed, "diffusion", step)
        batch, per_rank = config.train.batch_size, z_start.shape[0]
        t = torch.randint(diffusion.num_timesteps, (batch,), generator=gen)
        noise = torch.randn((batch, *z_start.shape[1:]), generator=gen)
        part = slice(self.procs.rank * per_rank, (self.procs.rank + 1) * per_rank)
        t, noise = t[part].to(self.device), noise[part].to(self.device)

        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self._autocast():
            loss = diffusion.training_loss(
                self.net, z_start, z_y, t, noise, {"lq": cond}, loss=config.train.loss
            ).mean()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        clip = config.optim.grad_clip if config.optim.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.unet.parameters(), clip))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema, self.unet, config.optim.ema_decay)
        return loss.detach(), grad_norm

    def _validate(self) -> dict[str, float]:
        """Mean PSNR/SSIM (Y channel, ``sf`` border pixels cropped) of the EMA model's restorations."""
        restorer = self.restorer
        scores = []
        for index, pair in enumerate(self.val_pairs):
            lq = pair.lq[None].to(self.device) * 2 - 1
            gen = generator(self.config.seed, "val-noise", index)
            shape = (1, *restorer.latent_shape(*lq.shape[-2:]))
            noise = [torch.randn(shape, generator=gen).to(self.device) for _ in range(restorer.noise_draws)]
            out = restorer.sample(lq, noise=noise)
            restored, truth = _to_uint8((out[0] + 1) / 2), _to_uint8(pair.hq)
            border = restorer.scale
            scores.append(
                (
                    psnr(restored, truth, crop_border=border, y_channel=True),
                    ssim(restored, truth, crop_border=border, y_channel=True),
                )
            )
        return {
            "val_psnr": float(np.mean([s[0] for s in scores])),
            "val_ssim": float(np.mean([s[1] for s in scores])),
        }

    def _checkpoint(self, step: int, interval: Sequence[torch.Tensor]) -> None:
        config = self.config
        loss_sum, steps = self._interval(interval)  # every process takes part
        if self.procs.is_main:
            samples = step * config.train.batch_size
            epoch, position = self.maker.order.position(samples)
            state = {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "samples_seen": samples,
                "epoch": epoch,
                "epoch_position": position,
                "seed": config.seed,
                "random_draws": "seeded by blake2b(seed:purpose:step[:index]); no RNG state to keep",
                "config_hash": config_hash(config),
                "config": trajectory_dict(config),
                "world_size": self.procs.size,
                "torch_version": torch.__version__,
                "validation": self.validation,
                "log_interval": {"loss_sum": loss_sum, "steps": steps},
            }
            directory = self._checkpoint_dir(step)
            _save_checkpoint(directory, self.unet, self.ema, self.optimizer, self.scaler, state)
            _prune(self.out, config.train.keep_checkpoints)
        self._barrier(True)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> H x W x 3 uint8, as a saved image would be."""
    return torch.round(image.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _registry_entry(config: TrainConfig, models: _Models, weights: Path, step: int) -> str:
    """A registry file naming the trained weights (and their autoencoder), for ``--registry``."""
    name = config.name
    diffusion = {"sf": models.latent.sf, **models.diffusion_params}
    diffusion.setdefault("steps", ResShiftScheduler.__init__.__kwdefaults__["steps"])
    entry: dict[str, Any] = {
        "description": f"trained with resshift train ({step} steps)",
        "task": "sr",
        "scale": diffusion["sf"],
        "steps": diffusion["steps"],
        "path": weights.name,
    }
    tables: dict[str, Any] = {"models": {name: entry}}
    if models.autoencoder_params is not None and models.autoencoder_path is not None:
        entry["autoencoder"] = f"{name}-autoencoder"
        tables["autoencoders"] = {
            f"{name}-autoencoder": {
                "embed_dim": models.autoencoder_params["embed_dim"],
                "n_embed": models.autoencoder_params["n_embed"],
                "path": str(models.autoencoder_path.resolve()),
                "ddconfig": models.autoencoder_params["ddconfig"],
            }
        }
    entry["unet"] = models.unet_params
    entry["diffusion"] = diffusion
    usage = (
        f"# The model trained here: resshift sr --registry {weights.parent / 'registry.toml'} --model {name}"
    )
    return f"{usage}\n\n" + dump_toml(tables)
