"""Access to ../shared beside the project: upstream's reference data (or RESSHIFT_REFERENCE), the
test images, the training photos.

A test that needs a missing part of it is skipped, saying what is missing; where the data must be
there (CI sets RESSHIFT_REQUIRE_SHARED=1), it fails instead.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = Path(os.environ.get("RESSHIFT_REFERENCE") or SHARED / "reference")
MANIFESTS = ("realsr-v1", "realsr-v3", "realsr-x2", "bicsr", "inpaint-imagenet", "inpaint-face", "faceir")
PARITY_CASES = ("sr-tiny", "inpaint-tiny", "face-tiny")


REQUIRED = os.environ.get("RESSHIFT_REQUIRE_SHARED") == "1"


def missing(path: Path) -> None:
    """Skip the test that needs ``path`` (fail it where ../shared is required)."""
    message = f"needs {path} (../shared beside the project)"
    if REQUIRED:
        pytest.fail(message)
    pytest.skip(message)


def reference_path(*parts: str) -> Path:
    """A path inside the reference data."""
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        missing(path)
    return path


def shared_path(*parts: str) -> Path:
    """A path inside ../shared (testdata, traindata, evaldata)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        missing(path)
    return path


@cache
def manifest(name: str) -> dict[str, Any]:
    return json.loads(reference_path("manifests", f"{name}.json").read_text())


@cache
def case(name: str) -> dict[str, Any]:
    return json.loads(reference_path("parity", name, "case.json").read_text())
