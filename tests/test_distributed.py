"""Batch jobs sharded across ranks with torch.distributed: each input once, one summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from launch import torchrun
from PIL import Image
from tinymodels import write_registry

from resshift_cli.distributed import World

pytestmark = pytest.mark.shared  # needs ../shared


def test_shards_cover_every_item_exactly_once() -> None:
    items = list(range(11))
    for size in (1, 2, 3, 4):
        shards = [World(rank, size, rank).shard(items) for rank in range(size)]
        assert sorted(x for shard in shards for x in shard) == items
        assert all(len(s) in (len(items) // size, len(items) // size + 1) for s in shards)


def test_world_from_env(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert World.from_env() == World(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = World.from_env()
    assert (world.rank, world.size, world.local_rank, world.distributed, world.is_main) == (
        3,
        4,
        1,
        True,
        False,
    )


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("RESSHIFT_REGISTRY", None)
    return env


@pytest.mark.slow
def test_torchrun_two_cpu_ranks(tmp_path: Path) -> None:
    registry = write_registry(tmp_path)
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    names = [f"img{i}.png" for i in range(5)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(inputs / name)
    common = ["sr", str(inputs), "--registry", str(registry), "--model", "tiny-sr", "--json"]

    launch = torchrun("-m", "resshift_cli")
    dist = subprocess.run(
        [*launch, *common, "-o", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=300,
    )
    assert dist.returncode == 0, dist.stderr[-2000:]
    records = [json.loads(line) for line in dist.stdout.splitlines() if line.startswith("{")]
    assert sorted(Path(r["input"]).name for r in records) == names
    assert all(r["status"] == "done" for r in records)
    assert dist.stderr.count("5 restored") == 1  # rank 0's summary covers both ranks, printed once

    single = subprocess.run(
        [sys.executable, "-m", "resshift_cli", *common, "-o", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    for name in names:
        assert (tmp_path / "dist" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
