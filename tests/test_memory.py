"""Large CPU tensors are allocated on transparent huge pages once resshift_cli is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

_PROBE = """
import os, resource
import resshift_cli
import torch
x = torch.ones(16 * 2**20)  # 64 MB: above glibc's mmap threshold, so each product is mapped afresh
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    y = x * 2.0
    del y
print(os.environ["THP_MEM_ALLOC_ENABLE"], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(setting: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    value, faults = out.stdout.split()
    return value, int(faults)


def test_import_turns_huge_pages_on_unless_the_user_said_no() -> None:
    on, faults_on = _probe(None)
    off, faults_off = _probe("0")
    assert (on, off) == ("1", "0")
    # 10 x 64 MB in 4 KB pages is ~164k page faults; in 2 MB pages, a few hundred.
    assert faults_off > 100_000
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are disabled in this kernel")
    assert faults_on < faults_off / 20, (faults_on, faults_off)
