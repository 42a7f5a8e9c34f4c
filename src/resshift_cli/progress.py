"""What a run tells the user: rich progress on stderr, notices, errors, the summary, JSON records.

Human output goes to stderr so that ``--json`` records on stdout stay machine-readable; with
``quiet`` only errors are printed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from resshift_cli.batch import Record, Summary

_SHOWN = 10
"""Non-image files listed by name in the summary; more are counted."""


class Reporter:
    """Progress bars for images and for the steps of the current image, plus messages."""

    def __init__(self, *, quiet: bool = False, json_records: bool = False) -> None:
        self.quiet = quiet
        self.json_records = json_records
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self._progress: Progress | None = None
        self._images: TaskID | None = None
        self._current: TaskID | None = None

    def __enter__(self) -> Reporter:
        if not self.quiet:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def start(self, total_images: int) -> None:
        if self._progress is not None:
            self._images = self._progress.add_task("images", total=total_images)

    def begin_image(self, name: str) -> None:
        if self._progress is not None:
            if self._current is not None:
                self._progress.remove_task(self._current)
            self._current = self._progress.add_task(f"  {name}", total=None)

    def image_progress(self, done: int, total: int) -> None:
        if self._progress is not None and self._current is not None:
            self._progress.update(self._current, completed=done, total=total)

    def end_image(self, record: Record) -> None:
        if self._progress is not None:
            if self._current is not None:
                self._progress.remove_task(self._current)
                self._current = None
            if self._images is not None:
                self._progress.advance(self._images)
        self.emit(record)
        if record.status == "failed":
            self.error(f"{record.input}: {record.error}")
        for notice in record.notices:
            self.notice(f"{record.input}: {notice}")

    def emit(self, record: Record) -> None:
        """Print ``record`` as a JSON line on stdout, when asked for ``--json``."""
        if self.json_records:
            sys.stdout.write(record.as_json() + "\n")
            sys.stdout.flush()

    def notice(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"[yellow]note:[/] {_escape(message)}", markup=True)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(printable(message), markup=False)

    def error(self, message: str) -> None:
        self.console.print(f"[red]error:[/] {_escape(message)}", markup=True)

    def summary(self, summary: Summary, ignored: Sequence[Path] = ()) -> None:
        """Every failure with its reason, the non-image files passed over, then the totals."""
        done, skipped, failed = summary.count("done"), summary.count("skipped"), summary.count("failed")
        if failed:
            self.console.print(f"[red]{failed} failed:[/]", markup=True)
            for record in summary.records:
                if record.status == "failed":
                    self.console.print(printable(f"  {record.input}: {record.error}"), markup=False)
        if self.quiet:
            return
        if ignored:
            self.console.print("ignored, not image files:", markup=False)
            for path in ignored[:_SHOWN]:
                self.console.print(printable(f"  {path}"), markup=False)
            if len(ignored) > _SHOWN:
                self.console.print(f"  ... and {len(ignored) - _SHOWN} more", markup=False)
        sizes = sorted({f"{r.output_size[0]}x{r.output_size[1]}" for r in summary.records if r.output_size})
        parts = [
            f"{done} restored",
            f"{skipped} skipped (output exists; --overwrite to redo)" if skipped else "",
        ]
        if failed:
            parts.append(f"{failed} failed")
        if ignored:
            parts.append(f"{len(ignored)} non-image files ignored")
        line = ", ".join(p for p in parts if p) + f" in {summary.seconds:.1f} s"
        if sizes:
            line += f"; output sizes {', '.join(sizes[:5])}{' ...' if len(sizes) > 5 else ''}"
        self.console.print(line, markup=False)


def printable(text: str) -> str:
    """``text`` with control characters written as escapes (``\\n``, ``\\x1b``): a file name
    holding a newline must not split a message in two, nor an escape sequence colour the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _escape(text: str) -> str:
    """Printable and free of rich markup."""
    from rich.markup import escape

    return escape(printable(text))
