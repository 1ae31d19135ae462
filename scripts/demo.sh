#!/usr/bin/env bash
# Sets up pop3d in .venv (first run only) and runs the embedded demo server on
# 127.0.0.1:1110 with the user demo/demo.  Needs only python3 (3.11+); no root, no apt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/pop3d ]]; then
    "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e .
fi
exec .venv/bin/pop3d serve "$@"
