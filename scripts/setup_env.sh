#!/usr/bin/env bash
# Sets up a fresh machine for layoutgen: a virtual environment (unless one is already active), torch (only where it
# is missing: an unpinned torch on a CPU-only machine would pull a multi-GB CUDA build), then the package itself.
# `--no-build-isolation` so the build sees the installed torch instead of downloading another one.
# Prints the path of the Python to use on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  VENV="${LAYOUTGEN_VENV:-.venv}"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  PY="$VENV/bin/python"
fi

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@" >&2; }

"$PY" -c "import setuptools, wheel, sys; sys.exit(int(tuple(map(int, setuptools.__version__.split('.')[:2])) < (69, 0)))" 2>/dev/null \
  || pip_install "setuptools>=69" wheel
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "torch==${LAYOUTGEN_TORCH_VERSION:-2.13.0}"
fi
pip_install --no-build-isolation -e ".[${LAYOUTGEN_EXTRAS:-dev}]"
echo "$PY"
