"""Files that are never seen half-written: written under a temporary name beside the target, then
renamed over it.

The temporary name carries the writer's process id, so a temporary file left by a process that
died without cleaning up (SIGKILL, a power cut) is recognised and removed by the next write of
the same target.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp")


def temporary_path(dest: Path) -> Path:
    """A fresh hidden name beside ``dest`` that identifies this process as its writer."""
    return dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is named as :func:`temporary_path` names temporary files."""
    return _TEMPORARY.fullmatch(path.name) is not None


def remove_stale_temporaries(directory: Path, name: str | None = None) -> list[Path]:
    """Delete the temporary files in ``directory`` (of the target ``name`` only, if given) whose
    writing process no longer exists; returns them.

    A file whose process is alive (this one, or another run writing the same target) is kept.
    """
    pattern = f".{glob.escape(name)}.*-*.tmp" if name is not None else ".*.*-*.tmp"
    try:
        names = glob.glob(pattern, root_dir=directory)
    except OSError:
        return []
    removed = []
    for found in names:
        match = _TEMPORARY.fullmatch(found)
        if match is None or (name is not None and match["name"] != name) or _alive(int(match["pid"])):
            continue
        path = directory / found
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or a pid this system cannot have: leave it alone
    return True


def write_atomically(dest: Path, write: Callable[[Path], None], *, fsync: bool = True) -> None:
    """Create the file ``dest`` with ``write(temporary_path)``, then rename it into place.

    ``write`` must create the file it is given. On any failure or interruption (Ctrl-C, a handled
    signal) the temporary file is removed and ``dest`` is as it was. The new file gets the usual
    mode for new files (some writers create theirs private). Stale temporary files of ``dest``
    left by dead processes are removed first.
    """
    remove_stale_temporaries(dest.parent, dest.name)
    temp = temporary_path(dest)
    try:
        write(temp)
        if fsync:
            with open(temp, "rb") as f:
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)
        os.replace(temp, dest)
    except BaseException:
        # The name is this process's own, so whatever is there is ours (even if an interrupt came
        # between the file's creation and anything that could note it).
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
