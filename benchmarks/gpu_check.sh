#!/usr/bin/env bash
# The GPU check, one command for a fresh lent GPU machine (torch and triton preinstalled, no network):
#
#     bash benchmarks/gpu_check.sh            # or: PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# 1. installs layoutgen in place without touching the network (pip --no-deps --no-build-isolation -e .), which
#    builds the noise-op extension, and records the extension's status (set LAYOUTGEN_GPU_CHECK_SKIP_INSTALL=1 to
#    skip the install on a machine where it is installed already);
# 2. runs the CUDA tests (pytest -m cuda -> cuda_tests.log), then the rest of the suite (-m "not cuda" -> tests.log;
#    autotuning off, except in the test that checks it, so the suite stays within minutes;
#    LAYOUTGEN_GPU_CHECK_PYTEST_ARGS adds pytest arguments to both, e.g. "-m 'not slow'");
# 3. runs every benchmarks/bench_*.py --quick in script mode (new bench files are picked up automatically);
# 4. runs `layoutgen bench` in GPU mode (full sizes: ops and model training steps) -> bench/, the compile matrix
#    (`layoutgen bench --compile-matrix $LAYOUTGEN_GPU_CHECK_MATRIX_ARGS`, default --quick: the scaled-down models,
#    every mode including max-autotune, whose autotuning of the full-size models alone would take many minutes)
#    -> compile_matrix/ (LAYOUTGEN_GPU_CHECK_MATRIX_ARGS= , set but empty, runs it at full size), and
#    `layoutgen profile` of the seed's autoencoder for 3 steps -> profile/.
# Everything goes to RESULTS=${OUT:-benchmarks/results}/<UTC date>-<gpu name>/ (environment.txt, install.log,
# extension.txt, cuda_tests.log, tests.log, bench_<name>.md, bench/, compile_matrix/, profile/, summary.txt). $OUT is
# the device tool's output folder: copy the folder from there into benchmarks/results/ to keep it. The exit status
# is non-zero when the install, a test or a bench failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
gpu="${gpu:-no-gpu}"
slug="$(echo "$gpu" | tr -cs 'A-Za-z0-9.-' '-' | sed 's/-*$//')"
RESULTS="${OUT:-benchmarks/results}/$(date -u +%Y-%m-%d)-${slug}"
mkdir -p "$RESULTS"
echo "gpu_check: writing to $RESULTS"
status=0

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
    nvidia-smi 2>&1 || true
    "$PY" - <<'EOF'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.platform())
for name in ["torch", "triton", "numpy", "yaml", "safetensors", "pandas", "PIL", "tqdm", "pytest", "pytest_benchmark",
             "xformers", "apex", "nvidia.dali"]:
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', 'present')}")
    except Exception as error:  # noqa: BLE001
        print(f"{name}: MISSING ({type(error).__name__})")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
} > "$RESULTS/environment.txt" 2>&1
cat "$RESULTS/environment.txt" | grep -E "MISSING|cuda |torch:|triton:" || true

start=$(date +%s)
if [ "${LAYOUTGEN_GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
    echo "install: skipped (LAYOUTGEN_GPU_CHECK_SKIP_INSTALL=1)" >> "$RESULTS/summary.txt"
elif ! "$PY" -m pip install --no-deps --no-build-isolation -e . > "$RESULTS/install.log" 2>&1; then
    echo "gpu_check: install FAILED (see install.log); testing the source tree as it is" | tee -a "$RESULTS/summary.txt"
    status=1
else
    echo "install: $(( $(date +%s) - start )) s" >> "$RESULTS/summary.txt"
fi

"$PY" -m layoutgen.kernels.noise_ops > "$RESULTS/extension.txt" 2>&1
echo "extension: exit $?, $(head -n 1 "$RESULTS/extension.txt")" | tee -a "$RESULTS/summary.txt"

# step LOG NAME COMMAND...: runs COMMAND with its output in $RESULTS/LOG, one summary line with status and seconds
step() {
    local log="$1" name="$2" start rc
    shift 2
    start=$(date +%s)
    "$@" > "$RESULTS/$log" 2>&1
    rc=$?
    echo "$name: exit $rc, $(tail -n 1 "$RESULTS/$log"), $(( $(date +%s) - start )) s" | tee -a "$RESULTS/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

if "$PY" -c "import pytest" 2>/dev/null; then
    export LAYOUTGEN_TRITON_AUTOTUNE=0
    eval "step cuda_tests.log cuda-tests \"\$PY\" -m pytest -q -ra --durations=20 -m cuda ${LAYOUTGEN_GPU_CHECK_PYTEST_ARGS:-}"
    eval "step tests.log tests \"\$PY\" -m pytest -q -ra --durations=20 -m \"not cuda\" ${LAYOUTGEN_GPU_CHECK_PYTEST_ARGS:-}"
    unset LAYOUTGEN_TRITON_AUTOTUNE
else
    echo "tests: SKIPPED, pytest is not installed on this machine" | tee -a "$RESULTS/summary.txt"
    status=1
fi

for bench in benchmarks/bench_*.py; do
    name="$(basename "$bench" .py)"
    start=$(date +%s)
    "$PY" "$bench" --quick > "$RESULTS/$name.md" 2> "$RESULTS/$name.stderr.log"
    rc=$?
    echo "$name: exit $rc, $(( $(date +%s) - start )) s" | tee -a "$RESULTS/summary.txt"
    [ "$rc" -eq 0 ] || status=1
    [ -s "$RESULTS/$name.stderr.log" ] || rm -f "$RESULTS/$name.stderr.log"
done

step bench.log "layoutgen bench" "$PY" -m layoutgen bench --device cuda --out "$RESULTS/bench"
# shellcheck disable=SC2086  # the matrix arguments are words
step compile_matrix.log "layoutgen bench --compile-matrix" "$PY" -m layoutgen bench --device cuda --compile-matrix \
    ${LAYOUTGEN_GPU_CHECK_MATRIX_ARGS---quick} --out "$RESULTS/compile_matrix"
step profile.log "layoutgen profile" "$PY" -m layoutgen profile --config experiments/autoencoder_layout512.yaml \
    --steps 3 --device cuda --out "$RESULTS/profile"

echo "gpu_check: done (status $status); results in $RESULTS"
exit "$status"
