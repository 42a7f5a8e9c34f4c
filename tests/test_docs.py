"""The documentation keeps its promises: the README's example runs, and docs/reliability.md names
real tests, every reliability test among them."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
RELIABILITY = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
NODE = re.compile(r"`(test_\w+\.py)::(test_\w+)`")


def _tests_in(module: str) -> set[str]:
    tree = ast.parse((ROOT / "tests" / module).read_text(encoding="utf-8"))
    return {
        node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def test_every_test_named_in_docs_reliability_exists() -> None:
    named = NODE.findall(RELIABILITY)
    assert len(named) > 40
    missing = [f"{module}::{name}" for module, name in named if name not in _tests_in(module)]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"


@pytest.mark.parametrize("module", ["test_reliability.py", "test_weights_reliability.py"])
def test_every_reliability_test_is_in_docs_reliability(module: str) -> None:
    named = {name for mod, name in NODE.findall(RELIABILITY) if mod == module}
    unnamed = sorted(_tests_in(module) - named)
    assert not unnamed, f"add these to docs/reliability.md: {unnamed}"


def test_readme_is_short_and_links_the_details() -> None:
    assert len(README.splitlines()) <= 250
    for doc in (
        "docs/reliability.md",
        "docs/weights.md",
        "docs/lite.md",
        "docs/PERFORMANCE.md",
        "docs/DEVELOPMENT.md",
    ):
        assert f"]({doc})" in README and (ROOT / doc).is_file(), doc
    assert (ROOT / "docs" / "images" / "lite-example.png").is_file()


@pytest.mark.slow
def test_the_readme_python_example_runs_offline(tmp_path: Path) -> None:
    """As written, in an empty folder, offline with an empty cache: it uses the bundled model."""
    (block,) = re.findall(r"```python\n(.*?)```", README, re.S)
    proc = subprocess.run(
        [sys.executable, "-c", block],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"},
        },
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(192, 256, 3)"
    assert (tmp_path / "small_x4.png").is_file()
