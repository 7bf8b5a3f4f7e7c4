#!/usr/bin/env bash
# The test suite: set up (test tools included), then lint and run every test that needs no GPU.
#   scripts/test.sh                 # everything CI runs
#   scripts/test.sh -m "not slow"   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -m "not gpu" "$@"
