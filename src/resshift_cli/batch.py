"""Batch runs: which inputs become which outputs, the loop over them, and what is reported.

Planning happens before any model is loaded, so usage errors are immediate and a run whose
outputs all exist finishes without touching the weights.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from resshift_cli import interrupts
from resshift_cli.errors import EXIT_OK, EXIT_SOME_FAILED, UsageError
from resshift_cli.imagefiles import IMAGE_SUFFIXES, INPUT_SUFFIXES, find_images, output_extension


class PlanError(UsageError):
    """The inputs and output options do not make a valid run (a usage error)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or a termination signal (``signum``) in the middle of a batch, with how far it got:
    ``done`` of the ``total`` images to do. ``rank`` is set under torchrun, where every rank
    reports its own share; ``overwrite`` says whether the run was redoing existing outputs."""

    def __init__(
        self, done: int, total: int, rank: int | None = None, *, signum: int, overwrite: bool = False
    ) -> None:
        super().__init__(done, total, rank)
        self.done = done
        self.total = total
        self.rank = rank
        self.signum = signum
        self.overwrite = overwrite

    def message(self) -> str:
        """The one line the CLI prints, with how a rerun goes on from here."""
        who = f"rank {self.rank}: " if self.rank is not None else ""
        what = interrupts.describe(self)
        if not self.done:
            return f"{who}{what}; no output was written"
        rerun = (
            "run the same command without --overwrite to do only the rest"
            if self.overwrite
            else "run the same command again to do the rest: existing outputs are skipped"
        )
        return f"{who}{what} after {self.done} of {self.total} images; finished outputs are kept ({rerun})"


@dataclass(frozen=True)
class Job:
    """One input image, where its restoration goes, and its mask (inpainting)."""

    source: Path
    output: Path
    mask: Path | None = None


@dataclass
class Plan:
    """Jobs to run, plus what was found but will not be processed."""

    jobs: list[Job]
    ignored: list[Path] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def collect_inputs(
    paths: Sequence[Path], recursive: bool, exclude: Path | None = None
) -> tuple[list[tuple[Path, Path | None]], list[Path], list[str]]:
    """Expand files and directories into ``(image, root directory or None)`` pairs, sorted.

    Directories give their image files (all levels with ``recursive``; symlinked directories are
    followed once, so loops end; the directory ``exclude``, the output, is not entered).
    Non-image files inside directories are returned separately. A file reached more than once
    (named twice, or named and inside a named directory) is kept once, with a notice.
    """
    images: list[tuple[Path, Path | None]] = []
    ignored: list[Path] = []
    for path in paths:
        if path.is_dir():
            found, skipped = find_images(path, recursive=recursive, exclude=exclude)
            images += [(p, path) for p in found]
            ignored += skipped
        elif path.exists():
            images.append((path, None))
        else:
            raise PlanError(f"input not found: {path}")
    times = Counter(_key(source) for source, _ in images)
    unique: list[tuple[Path, Path | None]] = []
    seen: set[Path] = set()
    for source, root in images:
        if _key(source) not in seen:
            seen.add(_key(source))
            unique.append((source, root))
    notices = [
        f"{source} was given {times[_key(source)]} times; it is restored once"
        for source, _ in unique
        if times[_key(source)] > 1
    ]
    return unique, ignored, notices


def plan_jobs(
    inputs: Sequence[Path],
    output: Path,
    *,
    recursive: bool = False,
    suffix: str = "",
    ext: str = "auto",
    masks: Path | None = None,
) -> Plan:
    """Map inputs to outputs: ``output`` is a file for one input file, else a directory.

    Inside a directory input the relative layout is kept. Two inputs that would land on the same
    output (``a.png`` and ``a.jpg``) keep apart: the later one's name carries its source suffix
    (and a number, if need be). No output lands on another input; only on its own, which
    :func:`partition_existing` refuses unless ``--overwrite``.
    """
    for bad in {os.sep, os.altsep or os.sep, "\0"}:
        if bad in suffix:
            raise PlanError(f"--suffix {suffix!r} must not contain {bad!r}: it is part of a file name")
    output = landing_path(output)
    images, ignored, notices = collect_inputs(inputs, recursive, exclude=output)
    if not images:
        raise PlanError(
            "no input images found" + (f" ({len(ignored)} non-image files ignored)" if ignored else "")
        )
    single_file = len(images) == 1 and images[0][1] is None
    to_file = single_file and output.suffix.lower() in IMAGE_SUFFIXES and not output.is_dir()
    if not single_file and (
        output.is_file() or (output.suffix.lower() in IMAGE_SUFFIXES and not output.is_dir())
    ):
        raise PlanError(f"-o {output}: several inputs need an output directory, not an image file name")
    plan = Plan(jobs=[], ignored=ignored, notices=notices)
    inputs_at = {_key(source): source for source, _ in images}
    claimed: dict[Path, Path] = {}
    for source, root in images:
        if to_file:
            target = output
        else:
            rel = source.relative_to(root).parent if root is not None else Path()
            target = landing_path(output / rel / f"{source.stem}{suffix}{output_extension(source, ext)}")
            other = claimed.get(_key(target)) or inputs_at.get(_key(target))
            if other is not None and other != source:
                stem = f"{source.stem}{suffix}-{source.suffix.lstrip('.').lower()}"
                alt = target.with_name(f"{stem}{target.suffix}")
                number = 1
                while _key(alt) in claimed or _key(alt) in inputs_at:
                    number += 1
                    alt = target.with_name(f"{stem}-{number}{target.suffix}")
                if _key(target) in claimed:
                    clash = f"{source} and {other} would both write {target}"
                else:
                    clash = f"the output of {source} would overwrite the input {other}"
                plan.notices.append(f"{clash}; writing {alt.name}")
                target = alt
        claimed[_key(target)] = source
        plan.jobs.append(Job(source, target, _mask_for(source, masks, single_file)))
    return plan


def _key(path: Path) -> Path:
    return Path(os.path.normcase(resolved(path)))


def resolved(path: Path) -> Path:
    """The absolute path the kernel reaches through ``path`` once its missing folders exist:
    symlinks of the existing part followed, and ``..`` applied after them (``out/new/../a.png``
    is ``out/a.png``, wherever ``out`` links to)."""
    return Path(os.path.realpath(path))


def landing_path(path: Path) -> Path:
    """``path`` as a write will really land: written without ``.`` and ``..`` where that names the
    same file (so messages stay short and relative), else its resolved absolute form. Checks for
    existing files and inputs made on it therefore see the file the write would replace."""
    plain = Path(os.path.normpath(path))
    real = resolved(path)
    return plain if Path(os.path.abspath(plain)) == real else real


def _mask_for(source: Path, masks: Path | None, single_file: bool) -> Path | None:
    if masks is None:
        return None
    if masks.is_dir():
        for candidate in sorted(masks.iterdir()):
            if candidate.stem == source.stem and candidate.suffix.lower() in INPUT_SUFFIXES:
                return candidate
        return None
    if not masks.exists():
        raise PlanError(f"mask not found: {masks}")
    if not single_file:
        raise PlanError("several inputs need --mask DIR (one mask per image, matched by file stem)")
    return masks


@dataclass
class Record:
    """The outcome for one input, as printed with ``--json``."""

    input: str
    output: str
    status: str
    seconds: float = 0.0
    size: tuple[int, int] | None = None
    output_size: tuple[int, int] | None = None
    error: str | None = None
    notices: list[str] = field(default_factory=list)

    def as_json(self) -> str:
        """Every field, unknown ones as null, so that each record has the same keys."""
        return json.dumps(self.__dict__)


@dataclass
class Summary:
    """Totals of a run, for the closing report and the exit code."""

    records: list[Record] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.records)

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.count("failed") else EXIT_OK

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


def partition_existing(jobs: Iterable[Job], overwrite: bool) -> tuple[list[Job], list[Job], list[Job]]:
    """Split jobs into (to run, skipped because the output exists, refused: output is the input)."""
    run: list[Job] = []
    skipped: list[Job] = []
    refused: list[Job] = []
    for job in jobs:
        same = job.output.exists() and os.path.samefile(job.output, job.source)
        if same and not overwrite:
            refused.append(job)
        elif job.output.exists() and not overwrite:
            skipped.append(job)
        else:
            run.append(job)
    return run, skipped, refused

