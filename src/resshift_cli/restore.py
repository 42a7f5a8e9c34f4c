"""The work behind ``resshift sr | inpaint | face``: plan, check inputs, load the model once,
restore, write.

Each input is loaded, restored, and written atomically; a failure is recorded and the batch goes
on. Inputs of the same size may share forward passes (``--batch-size``). The exit code says
whether everything was done.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from resshift_cli import interrupts
from resshift_cli.atomic import remove_stale_temporaries
from resshift_cli.batch import Interrupted, Job, Plan, Record, Summary, partition_existing
from resshift_cli.distributed import World
from resshift_cli.errors import EXIT_OK, InputError, ModelError, first_line
from resshift_cli.imagefiles import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    LoadedImage,
    load_image,
    probe_image,
    save_image,
)
from resshift_cli.pipelines.options import RunOptions
from resshift_cli.progress import Reporter

if TYPE_CHECKING:
    import numpy as np

    from resshift_cli.pipelines.restorer import Restorer
    from resshift_cli.pipelines.tasks import Prepared, Restored


@dataclass(frozen=True)
class RestoreSettings:
    """Everything a restore command was asked for, after parsing."""

    task: str
    model: str | None = None
    checkpoint: Path | None = None
    autoencoder: Path | None = None
    registry: Path | None = None
    options: RunOptions = field(default_factory=RunOptions)
    device: str = "auto"
    precision: str = "auto"
    overwrite: bool = False
    quiet: bool = False
    json: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS


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
            code = ModelError.exit_code
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

        def finish(record: Record) -> None:
            summary.records.append(record)
            reporter.end_image(record)

        for job in skipped:
            finish(Record(str(job.source), str(job.output), "skipped", notices=["output exists; skipped"]))
        for job in refused:
            error = "the output would overwrite the input; choose another -o or --suffix (or --overwrite)"
            finish(Record(str(job.source), str(job.output), "failed", error=error))
        # Inputs are checked before the weights are looked for: a bad mask is reported at once,
        # not after a download, and offline as what it is rather than as missing weights.
        sizes: dict[Job, tuple[int, int]] = {}
        for job in todo:
            try:
                sizes[job] = _probe(job, settings)
            except InputError as exc:
                finish(
                    Record(str(job.source), str(job.output), "failed", error=_unnamed(str(exc), job.source))
                )
        todo = [job for job in todo if job in sizes]
        if not todo:
            return summary.records, False, summary.started
        try:
            processor = _Processor.load(settings, reporter)
        except ModelError as exc:
            reporter.error(str(exc))
            for job in todo:
                record = Record(str(job.source), str(job.output), "failed", error=str(exc))
                summary.records.append(record)
                reporter.emit(record)
            return summary.records, True, summary.started
        try:
            for group in _groups(todo, sizes, processor.batch_size):
                names = group[0].source.name + (f" (+{len(group) - 1})" if len(group) > 1 else "")
                reporter.begin_image(names)
                for record in processor(group):
                    finish(record)
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


def _groups(jobs: Sequence[Job], sizes: dict[Job, tuple[int, int]], batch_size: int) -> Iterator[list[Job]]:
    """Runs of consecutive jobs whose inputs have one size, at most ``batch_size`` long."""
    group: list[Job] = []
    for job in jobs:
        if group and (len(group) == batch_size or sizes[job] != sizes[group[0]]):
            yield group
            group = []
        group.append(job)
    if group:
        yield group


@dataclass
class _Loaded:
    """A job whose files have been read, with its record so far."""

    job: Job
    record: Record
    image: LoadedImage
    prepared: Prepared
    started: float


class _Processor:
    """The loaded model and what it takes to turn jobs into written outputs and records."""

    def __init__(
        self,
        settings: RestoreSettings,
        restorer: Restorer,
        prepare: Callable[[LoadedImage, np.ndarray | None], Prepared],
        reporter: Reporter,
    ) -> None:
        self.settings = settings
        self.restorer = restorer
        self.prepare = prepare
        self.reporter = reporter

    @property
    def batch_size(self) -> int:
        """Images per forward pass (one at a time with test-time augmentation, which batches views)."""
        options = self.settings.options
        return 1 if options.tta else options.batch_size

    @classmethod
    def load(cls, settings: RestoreSettings, reporter: Reporter) -> _Processor:
        """Resolve and load the model once; every failure is a one-line ModelError."""
        import torch

        from resshift_cli.pipelines import tasks
        from resshift_cli.pipelines.loading import load_restorer
        from resshift_cli.registry import load_registry
        from resshift_cli.runtime import autocast_dtype, precision_name, resolve_device

        try:
            registry = load_registry(settings.registry)
            spec = registry.model(settings.model) if settings.model else registry.default_model(settings.task)
            if spec.task != settings.task:
                raise ModelError(
                    f"model {spec.name!r} is for '{spec.task}', not '{settings.task}'; "
                    f"use 'resshift {spec.task}' or pick another --model"
                )
            device = resolve_device(settings.device)
            precision = autocast_dtype(device, settings.precision)
            if device.type == "cpu" and precision == torch.float16:
                reporter.notice("fp16 on the CPU is many times slower than fp32 or bf16")
            reporter.info(f"loading {spec.name} on {device} ({precision_name(precision)})")
            restorer = load_restorer(
                spec,
                registry=registry,
                device=device,
                precision=settings.precision,
                checkpoint=settings.checkpoint,
                autoencoder=settings.autoencoder,
                quiet=settings.quiet,
            )
        except (RuntimeError, OSError) as exc:
            raise ModelError(f"cannot load {settings.model or settings.task} model: {exc}") from None
        face_size = int(spec.unet.get("lq_size", 512))

        def prepare(image: LoadedImage, hole: np.ndarray | None) -> Prepared:
            if hole is not None:
                return tasks.prepare_inpainting(image, hole)
            if settings.task == "face":
                return tasks.prepare_face(image, face_size)
            return tasks.prepare_super_resolution(image)

        return cls(settings, restorer, prepare, reporter)

    def __call__(self, jobs: Sequence[Job]) -> list[Record]:
        """Restore ``jobs`` (inputs of one size), together where they can share passes."""
        loaded: list[_Loaded] = []
        records: list[Record] = []
        for job in jobs:
            item = self._read(job)
            if isinstance(item, Record):
                records.append(item)
            else:
                loaded.append(item)
        if len(loaded) > 1:
            try:
                results = self._restore(loaded)
            except Exception:  # one image that cannot be restored must not fail the others
                pass
            else:
                done = [self._finish(item, lambda r=r: r) for item, r in zip(loaded, results, strict=True)]
                return records + done
        return records + [self._finish(item, lambda item=item: self._restore([item])[0]) for item in loaded]

    def _restore(self, items: list[_Loaded]) -> list[Restored]:
        from resshift_cli.pipelines import tasks

        options = self.settings.options
        if options.tta:
            return [tasks.super_resolve(self.restorer, items[0].image, options, self.reporter.image_progress)]
        prepared = [item.prepared for item in items]
        return tasks.restore_prepared(self.restorer, prepared, options, self.reporter.image_progress)

    def _read(self, job: Job) -> _Loaded | Record:
        """Read the job's image (and mask) and prepare it; a failed record if that is impossible."""
        started = time.monotonic()
        record = Record(str(job.source), str(job.output), "failed")
        try:
            image = load_image(job.source, max_pixels=self.settings.max_pixels)
            record.size = image.size
            record.notices += image.notices
            hole = None
            if job.mask is not None:
                from resshift_cli.pipelines import tasks

                mask = load_image(job.mask, max_pixels=self.settings.max_pixels)
                record.notices += [f"mask {job.mask}: {notice}" for notice in mask.notices]
                hole = tasks.hole_mask(mask.rgb)
            _make_directory(job.output)  # before the model runs, which would be wasted
            return _Loaded(job, record, image, self.prepare(image, hole), started)
        except InputError as exc:
            record.error = _unnamed(str(exc), job.source)
        record.seconds = round(time.monotonic() - started, 3)
        return record

    def _finish(self, item: _Loaded, restore: Callable[[], Restored]) -> Record:
        """Restore (unless done), write, and complete the record; failures fail this input only."""
        import torch

        record, image, job = item.record, item.image, item.job
        try:
            result = restore()
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
        except InputError as exc:
            record.error = _unnamed(str(exc), job.source)
        except OSError as exc:
            record.error = f"cannot write {job.output}: {exc.strerror or exc}"
        except torch.OutOfMemoryError:
            record.error = "out of memory; try a smaller --tile or --batch-size 1"
        except Exception as exc:  # a bug rather than a bad input: this image fails, the batch goes on
            record.error = f"internal error ({type(exc).__name__}: {first_line(exc)}); please report it"
        record.seconds = round(time.monotonic() - item.started, 3)
        return record


def _probe(job: Job, settings: RestoreSettings) -> tuple[int, int]:
    """The input's (width, height) from its header, after checking what headers can tell: that the
    image is readable and within the pixel limit, and an inpainting's mask is there and fits."""
    from resshift_cli.pipelines import tasks

    size = probe_image(job.source, max_pixels=settings.max_pixels)
    if settings.task == "inpaint":
        if job.mask is None:
            raise tasks.MaskError(f"no mask for {job.source.name} (masks are matched by file stem)")
        tasks.check_mask_size(probe_image(job.mask, max_pixels=settings.max_pixels), size)
    return size


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
