#!/usr/bin/env bash
# The GPU check: one command for a fresh lent GPU machine (torch, triton and pytest preinstalled, no network).
#
#     bash benchmarks/gpu_check.sh [STEP ...]       # default: every step below, in this order
#
# Steps, most important first (a lent machine gives minutes, so the order is the priority):
#   env            environment.txt: card, driver, versions, which optional packages import
#   wheels         pip installs the wheels in $LAYOUTGEN_GPU_CHECK_WHEELS (a carried folder; --no-index --no-deps),
#                  e.g. diffusers for the models bench's peer column; nothing when the variable is unset
#   install        pip install --no-deps --no-build-isolation -e . (builds the noise-op extension) -> install.log;
#                  the extension's status -> extension.txt
#   cuda-tests     pytest -m cuda -> cuda_tests.log (pytest-xdist workers when it is installed; at most
#                  LAYOUTGEN_GPU_CHECK_TESTS_CAP_S, default 240 s, so that the benches get their turn)
#   op-benches     benchmarks/bench_<op>.py --quick: GroupNorm+SiLU and the noise ops first, then every other op
#                  bench (bench_data.py only where DALI imports)
#   bench          layoutgen bench --device cuda (full sizes: ops and model training steps) -> bench/
#   compile-matrix layoutgen bench --compile-matrix $LAYOUTGEN_GPU_CHECK_MATRIX_ARGS (default --quick) -> compile_matrix/
#   profile        layoutgen profile of the seed's autoencoder, 3 steps -> profile/
#   cpu-tests      the rest of the suite (pytest -m "not cuda") with a GPU present -> tests.log
#
# Time: the whole run has LAYOUTGEN_GPU_CHECK_BUDGET_S seconds (default 540); each step is stopped (SIGINT, so pytest
# still prints its summary) when the budget runs out, and a step that cannot start with LAYOUTGEN_GPU_CHECK_MIN_STEP_S
# (default 30) seconds left is listed as "not run (budget)". Triton autotuning is off in the tests
# (LAYOUTGEN_TRITON_AUTOTUNE=0) except in the test that checks it; the benches autotune.
#
# Output: RESULTS=benchmarks/results/<UTC date>-<gpu name>/ (override with LAYOUTGEN_GPU_CHECK_RESULTS) gets every log
# and table, summary.txt a line per step. When $OUT is set (the device tool's output folder, which brings back at most
# 8 files), the results are also published there after every step, so a run cut short still returns what it did:
# summary.txt, environment.txt, the main markdown tables, and results.tar.gz (the whole folder but the Chrome trace).
# Unpack with: tar xzf results.tar.gz -C benchmarks/results/
#
# Other settings: PYTHON (default python3, else python), LAYOUTGEN_GPU_CHECK_PYTEST_ARGS (added to both pytest
# steps, e.g. "tests/test_group_norm_silu.py"), LAYOUTGEN_GPU_CHECK_WORKERS (xdist workers, default 8; 0 = none).
# The exit status is non-zero when a step failed (steps cut by the budget are not failures).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif command -v python3 > /dev/null; then PY=python3
else PY=python
fi
BUDGET_S="${LAYOUTGEN_GPU_CHECK_BUDGET_S:-540}"
MIN_STEP_S="${LAYOUTGEN_GPU_CHECK_MIN_STEP_S:-30}"
DEADLINE=$(( $(date +%s) + BUDGET_S ))
ALL_STEPS="env wheels install cuda-tests op-benches bench compile-matrix profile cpu-tests"
STEPS="${*:-$ALL_STEPS}"
for s in $STEPS; do
    case " $ALL_STEPS " in *" $s "*) ;; *) echo "gpu_check: unknown step '$s' (steps: $ALL_STEPS)" >&2; exit 2 ;; esac
done

gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
gpu="${gpu:-no-gpu}"
slug="$(echo "$gpu" | tr -cs 'A-Za-z0-9.-' '-' | sed 's/-*$//')"
RESULTS="${LAYOUTGEN_GPU_CHECK_RESULTS:-benchmarks/results/$(date -u +%Y-%m-%d)-${slug}}"
mkdir -p "$RESULTS"
echo "gpu_check: $gpu; steps: $STEPS; budget ${BUDGET_S} s; writing to $RESULTS"
echo "gpu_check on $gpu, $(date -u +%Y-%m-%dT%H:%M:%SZ), steps: $STEPS, budget ${BUDGET_S} s" > "$RESULTS/summary.txt"
status=0

# The tables that travel back beside the archive (the device tool returns at most 8 files).
PUBLISHED_TABLES="bench_group_norm_silu.md bench_attention.md bench_noise_ops.md bench/bench.md"
publish() {
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT"
    cp "$RESULTS/summary.txt" "$OUT/"
    [ -f "$RESULTS/environment.txt" ] && cp "$RESULTS/environment.txt" "$OUT/"
    for table in $PUBLISHED_TABLES; do
        [ -f "$RESULTS/$table" ] && cp "$RESULTS/$table" "$OUT/$(basename "$table")"
    done
    tar czf "$OUT/results.tar.gz.part" --exclude=trace.json -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" &&
        mv "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
}

# run_step [--cap S] LOG NAME COMMAND...: COMMAND's output to $RESULTS/LOG, stopped when the budget (or its own cap
# of S seconds) runs out; one summary line.
run_step() {
    local cap=""
    if [ "$1" = --cap ]; then cap="$2"; shift 2; fi
    local log="$1" name="$2" begin rc left
    shift 2
    left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -lt "$MIN_STEP_S" ]; then
        echo "$name: not run (budget: ${left} s left)" | tee -a "$RESULTS/summary.txt"
        return 0
    fi
    local limit="$left"
    if [ -n "$cap" ] && [ "$cap" -lt "$left" ]; then limit="$cap"; fi
    begin=$(date +%s)
    # bash -c: the step may be one of the (exported) functions below, which timeout alone cannot run
    timeout --signal=INT --kill-after=15 "$limit" bash -c '"$@"' step "$@" > "$RESULTS/$log" 2>&1
    rc=$?
    local note=""
    [ "$rc" -eq 124 ] && note=" (stopped: $([ "$limit" = "$left" ] && echo budget || echo "its ${limit} s cap"))"
    echo "$name: exit $rc$note, $(tail -n 1 "$RESULTS/$log"), $(( $(date +%s) - begin )) s" |
        tee -a "$RESULTS/summary.txt"
    [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || status=1
    publish
}

step_env() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
    nvidia-smi 2>&1 || true
    echo "nvcc: $(command -v nvcc || echo none) $(nvcc --version 2>/dev/null | tail -n 1); CUDA_HOME=${CUDA_HOME:-unset}"
    "$PY" - <<'EOF'
import importlib, platform, sys
print("python", sys.version.split()[0], sys.executable, platform.platform())
for name in ["torch", "triton", "numpy", "yaml", "safetensors", "pandas", "PIL", "tqdm", "matplotlib", "pytest",
             "xdist", "pytest_benchmark", "diffusers", "xformers", "apex", "nvidia.dali"]:
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', 'present')}")
    except Exception as error:  # noqa: BLE001
        print(f"{name}: MISSING ({type(error).__name__})")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
}

step_wheels() {
    local dir="${LAYOUTGEN_GPU_CHECK_WHEELS:-}"
    if [ -z "$dir" ]; then echo "no LAYOUTGEN_GPU_CHECK_WHEELS folder: nothing to install"; return 0; fi
    "$PY" -m pip install --no-index --no-deps "$dir"/*.whl
}

step_install() {
    "$PY" -m pip install --no-deps --no-build-isolation -e . > "$RESULTS/install.log" 2>&1 || {
        echo "install FAILED (see install.log); the steps after this test the source tree as it is"; return 1; }
    "$PY" -m layoutgen.kernels.noise_ops > "$RESULTS/extension.txt" 2>&1
    local rc=$?
    echo "extension: $(head -n 1 "$RESULTS/extension.txt")"
    return "$rc"
}

# step_pytest MARK: the tests with that marker expression, without autotuning (the test that checks it turns it on)
step_pytest() {
    export LAYOUTGEN_TRITON_AUTOTUNE=0
    local workers="${LAYOUTGEN_GPU_CHECK_WORKERS:-8}" parallel=""
    if [ "$workers" != 0 ] && "$PY" -c "import xdist" 2> /dev/null; then parallel="-n $workers"; fi
    # eval: LAYOUTGEN_GPU_CHECK_PYTEST_ARGS may hold quoted words ("-k 'not slow'")
    eval "\"\$PY\" -m pytest -q -ra --durations=20 -m \"\$1\" $parallel ${LAYOUTGEN_GPU_CHECK_PYTEST_ARGS:-}"
}

# The op benches, the ones with targets to check first (GroupNorm+SiLU, then the noise ops), then any other.
step_op_benches() {
    local rc=0 bench name first="benchmarks/bench_group_norm_silu.py benchmarks/bench_noise_ops.py"
    for bench in $first $(ls benchmarks/bench_*.py | grep -v -e bench_group_norm_silu.py -e bench_noise_ops.py); do
        name="$(basename "$bench" .py)"
        if [ "$name" = bench_data ] && ! "$PY" -c "import nvidia.dali" 2> /dev/null; then
            echo "$name: skipped (nvidia-dali is not installed)"
            continue
        fi
        local begin=$(date +%s)
        "$PY" "$bench" --quick > "$RESULTS/$name.md" 2> "$RESULTS/$name.stderr.log"
        local one=$?
        echo "$name: exit $one, $(( $(date +%s) - begin )) s"
        [ "$one" -eq 0 ] || rc=1
        [ -s "$RESULTS/$name.stderr.log" ] || rm -f "$RESULTS/$name.stderr.log"
    done
    return "$rc"
}

export PY RESULTS
export -f step_env step_wheels step_install step_pytest step_op_benches
for s in $STEPS; do
    case "$s" in
        env) run_step environment.txt env step_env ;;
        wheels) run_step wheels.log wheels step_wheels ;;
        install) run_step install_step.log install step_install ;;
        cuda-tests) run_step --cap "${LAYOUTGEN_GPU_CHECK_TESTS_CAP_S:-240}" cuda_tests.log cuda-tests step_pytest cuda ;;
        op-benches) run_step op_benches.log op-benches step_op_benches ;;
        bench) run_step bench.log "layoutgen bench" "$PY" -m layoutgen bench --device cuda --out "$RESULTS/bench" ;;
        compile-matrix)
            # shellcheck disable=SC2086  # the matrix arguments are words
            run_step compile_matrix.log "layoutgen bench --compile-matrix" "$PY" -m layoutgen bench --device cuda \
                --compile-matrix ${LAYOUTGEN_GPU_CHECK_MATRIX_ARGS---quick} --out "$RESULTS/compile_matrix" ;;
        profile)
            run_step profile.log "layoutgen profile" "$PY" -m layoutgen profile \
                --config experiments/autoencoder_layout512.yaml --steps 3 --device cuda --out "$RESULTS/profile" ;;
        cpu-tests) run_step tests.log cpu-tests step_pytest 'not cuda' ;;
    esac
done

echo "gpu_check: done (status $status); results in $RESULTS" | tee -a "$RESULTS/summary.txt"
publish
exit "$status"
