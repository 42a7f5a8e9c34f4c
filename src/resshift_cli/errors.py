"""The errors a user can cause, each carrying the exit code the command line ends with.

Every expected failure is a :class:`ResShiftError` with a one-line message; the command line
prints ``error: MESSAGE`` and exits with its ``exit_code``. Anything else is a bug.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_SOME_FAILED = 1
"""Some inputs of a batch failed; the others were written."""


class ResShiftError(Exception):
    """A failure with a one-line message a person can act on."""

    exit_code = 1


class InputError(ResShiftError):
    """One input cannot be restored (unreadable image, mask that does not fit); the batch goes on."""

    exit_code = 1


class UsageError(ResShiftError):
    """The command was asked for something that does not make sense (bad options, no inputs)."""

    exit_code = 2


class ModelError(ResShiftError):
    """The model cannot be used: weights missing or corrupt, registry invalid, device unavailable."""

    exit_code = 3


def first_line(exc: object) -> str:
    """The first line of an error's message, or its type's name when it has none: what a one-line
    message quotes of an exception from a library."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
