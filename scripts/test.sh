#!/usr/bin/env bash
# The one test command: set up .venv (scripts/setup.sh), then ruff and pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py="${RESSHIFT_VENV:-.venv}/bin/python"
"$py" -m ruff check .
exec "$py" -m pytest "$@"
