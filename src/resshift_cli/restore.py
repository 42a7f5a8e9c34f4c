"""The work behind ``resshift sr | inpaint | face``: plan, load the model once, restore each input.

Each input is loaded, restored, and written atomically; a failure is recorded and the batch goes
on. The exit code says whether everything was done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from resshift_cli import interrupts
from resshift_cli.atomic import remove_stale_temporaries
from resshift_cli.batch import (
    EXIT_MODEL,
    EXIT_OK,
    Interrupted,
    Job,
    Plan,
    Record,
    Summary,
    partition_existing,
)
from resshift_cli.distributed import World
from resshift_cli.imageio import DEFAULT_MAX_PIXELS, ImageError, load_image, probe_image, save_image
from resshift_cli.progress import Reporter


@dataclass(frozen=True)
class RestoreSettings:
    """Everything a restore command was asked for, after parsing."""

    task: str
    model: str | None = None
    checkpoint: Path | None = None
    autoencoder: Path | None = None
    registry: Path | None = None
    seed: int = 12345
    tile: int | None = None
    overlap: int = 16
    batch_size: int = 1
    tta: bool = False
    device: str = "auto"
    precision: str = "auto"
    overwrite: bool = False
    quiet: bool = False
    json: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS


class ModelUnavailable(Exception):
    """The model could not be resolved, loaded or placed on the device (exit code 3)."""


def run(plan: Plan, settings: RestoreSettings) -> int:
    """Restore every job of ``plan`` (this rank's share under torchrun); returns the exit code."""
    world = World.from_env()
    device = world.device_name(settings.device)
    settings = replace(settings, device=device)
    world.start("cuda" if device.startswith("cuda") else "cpu")
    try:
        records, model_failed, started = _run_share(world, plan, settings)
        records = world.gather(records)
        failed_ranks = world.gather([model_failed])
        code = EXIT_OK
        if world.is_main and any(failed_ranks):
            code = EXIT_MODEL
        elif world.is_main:
            summary = Summary(records=records, started=started)
            with Reporter(quiet=settings.quiet) as reporter:
                reporter.summary(summary, ignored=plan.ignored)
            code = summary.exit_code
        return world.broadcast(code)
    finally:
        world.stop()


def _run_share(world: World, plan: Plan, settings: RestoreSettings) -> tuple[list[Record], bool, float]:
    """Restore this rank's jobs; returns their records, whether the model failed, the start time."""
    quiet = settings.quiet or not world.is_main
    summary = Summary()
    with Reporter(quiet=quiet, json_records=settings.json) as reporter:
        for notice in plan.notices:
            reporter.notice(notice)
        share = world.shard(plan.jobs)
        # What a killed run (SIGKILL, a power cut) left behind beside these outputs goes first.
        for directory in dict.fromkeys(job.output.parent for job in share):
            remove_stale_temporaries(directory)
        todo, skipped, refused = partition_existing(share, settings.overwrite)
        reporter.start(len(todo) + len(skipped) + len(refused))
        for job in skipped:
            record = Record(str(job.source), str(job.output), "skipped", notices=["output exists; skipped"])
            summary.records.append(record)
            reporter.end_image(record)
        for job in refused:
            error = "the output would overwrite the input; choose another -o or --suffix (or --overwrite)"
            record = Record(str(job.source), str(job.output), "failed", error=error)
            summary.records.append(record)
            reporter.end_image(record)
        # Inputs are checked before the weights are looked for: a bad mask is reported at once,
        # not after a download, and offline as what it is rather than as missing weights.
        checked = []
        for job in todo:
            problem = _input_problem(job, settings)
            if problem is None:
                checked.append(job)
                continue
            record = Record(str(job.source), str(job.output), "failed", error=problem)
            summary.records.append(record)
            reporter.end_image(record)
        todo = checked
        if not todo:
            return summary.records, False, summary.started
        try:
            process = _processor(settings, reporter)
        except ModelUnavailable as exc:
            reporter.error(str(exc))
            for job in todo:
                record = Record(str(job.source), str(job.output), "failed", error=str(exc))
                summary.records.append(record)
                reporter.emit(record)
            return summary.records, True, summary.started
        try:
            for job in todo:
                reporter.begin_image(job.source.name)
                record = process(job)
                summary.records.append(record)
                reporter.end_image(record)
        except KeyboardInterrupt as exc:
            rank = world.rank if world.distributed else None
            raise Interrupted(
                summary.count("done"),
                len(todo),
                rank,
                signum=interrupts.signal_number(exc),
                overwrite=settings.overwrite,
            ) from None
    return summary.records, False, summary.started


def _processor(settings: RestoreSettings, reporter: Reporter):
    """Load the model once and return the function that restores one job."""
    import torch

    from resshift_cli.checkpoints import CheckpointError
    from resshift_cli.hub import WeightsError
    from resshift_cli.pipelines import tasks
    from resshift_cli.pipelines.loading import load_restorer
    from resshift_cli.registry import RegistryError, load_registry
    from resshift_cli.runtime import RuntimeSetupError, autocast_dtype, resolve_device

    try:
        registry = load_registry(settings.registry)
        spec = registry.model(settings.model) if settings.model else registry.default_model(settings.task)
        if spec.task != settings.task:
            raise ModelUnavailable(
                f"model {spec.name!r} is for '{spec.task}', not '{settings.task}'; "
                f"use 'resshift {spec.task}' or pick another --model"
            )
        device = resolve_device(settings.device)
        precision = autocast_dtype(device, settings.precision)
        if device.type == "cpu" and precision == torch.float16:
            reporter.notice("fp16 on the CPU is many times slower than fp32 or bf16")
        reporter.info(
            f"loading {spec.name} on {device} "
            f"({'fp32' if precision is None else str(precision).removeprefix('torch.')})"
        )
        restorer = load_restorer(
            spec,
            registry,
            device=device,
            precision=precision,
            checkpoint=settings.checkpoint,
            autoencoder=settings.autoencoder,
            quiet=settings.quiet,
        )
    except (RegistryError, WeightsError, CheckpointError, RuntimeSetupError) as exc:
        raise ModelUnavailable(str(exc)) from None
    except (RuntimeError, OSError) as exc:
        raise ModelUnavailable(f"cannot load {settings.model or settings.task} model: {exc}") from None

    options = tasks.RunOptions(
        seed=settings.seed,
        tile=settings.tile,
        overlap=settings.overlap,
        batch_size=settings.batch_size,
        tta=settings.tta,
    )
    face_size = int(spec.unet.get("lq_size", 512))

    def process(job: Job) -> Record:
        started = time.monotonic()
        record = Record(str(job.source), str(job.output), "failed")
        try:
            image = load_image(job.source, max_pixels=settings.max_pixels)
            record.size = image.size
            record.notices += image.notices
            hole = None
            if job.mask is not None:
                mask = load_image(job.mask, max_pixels=settings.max_pixels)
                record.notices += [f"mask {job.mask}: {notice}" for notice in mask.notices]
                hole = tasks.hole_mask(mask.rgb)
            _make_directory(job.output)  # before the model runs, which would be wasted
            if hole is not None:
                result = tasks.inpaint(restorer, image, hole, options, reporter.image_progress)
            elif settings.task == "face":
                result = tasks.restore_face(restorer, image, options, face_size, reporter.image_progress)
            else:
                result = tasks.super_resolve(restorer, image, options, reporter.image_progress)
            save_image(
                job.output,
                result.rgb,
                alpha=result.alpha,
                grayscale=image.grayscale,
                bit_depth=image.bit_depth,
                icc_profile=image.icc_profile,
            )
            record.notices += result.notices
            record.status = "done"
            record.output_size = (result.rgb.shape[1], result.rgb.shape[0])
        except (ImageError, tasks.MaskError, ValueError) as exc:
            record.error = _unnamed(str(exc), job.source)
        except OSError as exc:
            record.error = f"cannot write {job.output}: {exc.strerror or exc}"
        except torch.OutOfMemoryError:
            record.error = "out of memory; try a smaller --tile or --batch-size 1"
        except Exception as exc:  # a bug rather than a bad input: this image fails, the batch goes on
            lines = str(exc).strip().splitlines() or [""]
            record.error = f"internal error ({type(exc).__name__}: {lines[0]}); please report it"
        record.seconds = round(time.monotonic() - started, 3)
        return record

    return process


def _input_problem(job: Job, settings: RestoreSettings) -> str | None:
    """Why ``job`` cannot be restored, as far as the headers of its image and mask tell, or None."""
    from resshift_cli.pipelines import tasks

    try:
        size = probe_image(job.source, max_pixels=settings.max_pixels)
        if settings.task == "inpaint":
            if job.mask is None:
                raise tasks.MaskError(f"no mask for {job.source.name} (masks are matched by file stem)")
            tasks.check_mask_size(probe_image(job.mask, max_pixels=settings.max_pixels), size)
    except (ImageError, tasks.MaskError) as exc:
        return _unnamed(str(exc), job.source)
    return None


def _unnamed(message: str, source: Path) -> str:
    """``message`` without its leading "cannot read SOURCE": the record and the error line already
    name the input, so "in.png: cannot read in.png: ..." becomes "in.png: cannot read: ...". Errors
    about another file (a mask, the output) keep their path."""
    return message.replace(f"cannot read {source}: ", "cannot read: ", 1)


def _make_directory(output: Path) -> None:
    """Create the directory ``output`` goes into; a one-line ImageError if that is impossible."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in (output.parent, *output.parent.parents) if p.is_file()), None)
        why = f"{blocker} is a file, not a directory" if blocker is not None else exc.strerror or exc
        raise ImageError(f"cannot write {output}: cannot create its directory ({why})") from None
