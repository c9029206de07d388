#!/usr/bin/env bash
# Sets up the machine (scripts/setup_env.sh), then runs the main job: `layoutgen quickstart`.
# Extra arguments go to the command, e.g. --out DIR, --set diffusion.training.max_steps=2000 or --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup_env.sh | tail -n 1)"
exec "$PY" -m layoutgen quickstart "$@"
