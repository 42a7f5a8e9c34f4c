#!/usr/bin/env bash
# Set up .venv: torch 2.13.0 (CPU build) when no torch imports, then this package with its test
# extras, editable. Reinstalls only when pyproject.toml changed, so a second run takes a moment.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${RESSHIFT_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"

if ! "$py" -c "import torch" >/dev/null 2>&1; then
    # Pinned: a looser requirement would make pip fetch the newest CUDA build (several GB).
    "$py" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi

stamp="$venv/.resshift-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$py" -m pip install --quiet --disable-pip-version-check -e ".[test]"
    echo "$want" > "$stamp"
fi
