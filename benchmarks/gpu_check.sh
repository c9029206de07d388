#!/usr/bin/env bash
# The GPU check, one command for a fresh lent GPU machine (torch and triton preinstalled, no network):
#
#     bash benchmarks/gpu_check.sh            # or: PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# 1. installs layoutgen in place without touching the network (pip --no-deps --no-build-isolation -e .; set
#    LAYOUTGEN_GPU_CHECK_SKIP_INSTALL=1 to skip it on a machine where it is installed already);
# 2. runs the whole test suite, CUDA tests included (autotuning off, except in the test that checks it, so the suite
#    stays within minutes; LAYOUTGEN_GPU_CHECK_PYTEST_ARGS adds pytest arguments, e.g. "-m 'not slow'");
# 3. runs every benchmarks/bench_*.py --quick in script mode (new bench files are picked up automatically).
# Everything goes to RESULTS=${OUT:-benchmarks/results}/<UTC date>-<gpu name>/ (environment.txt, install.log,
# tests.log, bench_<name>.md, summary.txt). $OUT is the device tool's output folder: copy the folder from there into
# benchmarks/results/ to keep it. The exit status is non-zero when the install, a test or a bench failed.
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

start=$(date +%s)
if "$PY" -c "import pytest" 2>/dev/null; then
    (
        export LAYOUTGEN_TRITON_AUTOTUNE=0
        eval "\"\$PY\" -m pytest -q -ra --durations=20 ${LAYOUTGEN_GPU_CHECK_PYTEST_ARGS:-}"
    ) > "$RESULTS/tests.log" 2>&1
    rc=$?
    echo "tests: exit $rc, $(tail -n 1 "$RESULTS/tests.log"), $(( $(date +%s) - start )) s" | tee -a "$RESULTS/summary.txt"
    [ "$rc" -eq 0 ] || status=1
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

echo "gpu_check: done (status $status); results in $RESULTS"
exit "$status"
