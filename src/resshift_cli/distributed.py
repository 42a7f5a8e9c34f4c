"""Batch jobs across processes and machines with torch.distributed (launched by torchrun).

Every rank plans the same sorted job list and takes every world_size-th job from its rank on, so
each input is done exactly once and no two ranks write the same file. Records are gathered on
rank 0, which prints the summary; all ranks exit with the same code. NCCL joins GPU ranks (each
on its own device), gloo CPU ranks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a torchrun launch (1 process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        """Read RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share: items rank, rank + size, rank + 2 * size, ..."""
        return list(items[self.rank :: self.size])

    def device_name(self, requested: str) -> str:
        """With several ranks on CUDA, each rank takes the GPU of its local rank."""
        if self.distributed and requested in ("auto", "cuda"):
            import torch

            if torch.cuda.is_available():
                return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def start(self, device_type: str) -> None:
        """Join the process group: NCCL for CUDA ranks, gloo otherwise."""
        if not self.distributed:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")

    def gather(self, items: list[T]) -> list[T]:
        """Every rank's items, in rank order, on rank 0 (other ranks get an empty list)."""
        if not self.distributed:
            return items
        import torch.distributed as dist

        gathered: list[list[T]] | None = [[] for _ in range(self.size)] if self.is_main else None
        dist.gather_object(items, gathered, dst=0)
        return [item for part in gathered or [] for item in part]

    def broadcast(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return int(box[0])

    def stop(self) -> None:
        if not self.distributed:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
