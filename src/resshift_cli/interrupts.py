"""Termination signals handled as Ctrl-C is: the run stops between two pieces of work, removes its
temporary files, keeps what it finished, says how far it got, and exits with 128 + the signal.

SIGTERM (sent by ``timeout``, systemd, docker, ``kill``) and SIGHUP (a closed terminal) raise
:class:`Terminated`, a ``KeyboardInterrupt``, so every ``except KeyboardInterrupt`` and
``finally`` in the program does for them what it does for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HANDLED = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """A termination signal (``signum``) received while the run was going on."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def signal_number(exc: BaseException) -> int:
    """The signal behind an interrupt: the one of a :class:`Terminated`, else SIGINT (Ctrl-C)."""
    return getattr(exc, "signum", signal.SIGINT)


def exit_code(exc: BaseException) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (130 for Ctrl-C)."""
    return 128 + signal_number(exc)


def describe(exc: BaseException) -> str:
    """ "interrupted" for Ctrl-C, "terminated by SIGTERM" (or another name) for a signal."""
    number = signal_number(exc)
    if number == signal.SIGINT:
        return "interrupted"
    return f"terminated by {signal.Signals(number).name}"


@contextlib.contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread.

    After the first, further ones are ignored, so that the clean-up it starts can finish; the
    previous handlers come back when the block ends. Outside the main thread (where Python cannot
    set handlers) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, _frame: object) -> None:
        for number in HANDLED:
            signal.signal(number, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {number: signal.signal(number, handle) for number in HANDLED}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
