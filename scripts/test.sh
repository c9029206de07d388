#!/usr/bin/env bash
# Sets up the machine (scripts/setup_env.sh), then runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests exercise the optional DALI loader too: install the `dali` extra (nvidia-dali-cuda130, Linux wheels only,
# about 200 MB to download, 590 MB installed; it runs CPU-only pipelines without a GPU). LAYOUTGEN_EXTRAS overrides.
if [ -z "${LAYOUTGEN_EXTRAS:-}" ]; then
  case "$(uname -s)-$(uname -m)" in
    Linux-x86_64|Linux-aarch64) export LAYOUTGEN_EXTRAS="dev,dali" ;;
    *) export LAYOUTGEN_EXTRAS="dev" ;;
  esac
fi
PY="$(bash scripts/setup_env.sh | tail -n 1)"
exec "$PY" -m pytest -q "$@"
