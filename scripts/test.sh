#!/usr/bin/env bash
# Sets up the machine (scripts/setup_env.sh), then runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup_env.sh | tail -n 1)"
exec "$PY" -m pytest -q "$@"
