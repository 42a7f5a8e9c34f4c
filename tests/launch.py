"""Launching a test command under torchrun with two CPU processes on 127.0.0.1."""

from __future__ import annotations

import socket
import sys


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (torchrun's rendezvous needs a known port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*command: str, processes: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` with ``processes`` local ranks, then ``command``."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *command,
    ]  # fmt: skip
