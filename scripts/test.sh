#!/usr/bin/env bash
# Sets up everything the tests need (apt tools, .venv with test/lint groups) and runs the
# whole suite: ruff, mypy, then pytest.  Exits non-zero on any failure, including a pytest
# run that collects no test (exit 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff" >&2
.venv/bin/ruff check src tests bench
echo "== mypy" >&2
.venv/bin/mypy
echo "== pytest" >&2
exec .venv/bin/python -bb -m pytest -q "$@"
