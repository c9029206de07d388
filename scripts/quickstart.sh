#!/usr/bin/env bash
# Sets up the machine (scripts/setup_env.sh), then runs the main job: `layoutgen quickstart`.
# Extra arguments go to the command, e.g. --out DIR or --set training.epochs=2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup_env.sh | tail -n 1)"
exec "$PY" -m layoutgen quickstart "$@"
