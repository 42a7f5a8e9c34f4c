"""Access to the upstream reference data in ../shared/reference (or RESSHIFT_REFERENCE)."""

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


def reference_path(*parts: str) -> Path:
    """A path inside the reference data; the test fails (never skips) when it is missing."""
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"reference data missing: {path} (expected ../shared/reference beside the project)")
    return path


@cache
def manifest(name: str) -> dict[str, Any]:
    return json.loads(reference_path("manifests", f"{name}.json").read_text())


@cache
def case(name: str) -> dict[str, Any]:
    return json.loads(reference_path("parity", name, "case.json").read_text())
