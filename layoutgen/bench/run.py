"""`layoutgen bench`: runs the op and model suites (or the compile matrix) and writes the report."""
from __future__ import annotations

import os
import sys
import time

import torch

from layoutgen.bench.machine import machine_info
from layoutgen.bench.report import write_report

SUITES = ("ops", "models", "all")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device: unknown device {name!r}; choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here; use --device cpu or auto")
    return torch.device(name)


def default_out(device: torch.device) -> str:
    card = machine_info(device, measure_bandwidth=False)["card"]
    slug = "".join(c if c.isalnum() or c in ".-" else "-" for c in card).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return os.path.join("runs", "bench", f"{time.strftime('%Y-%m-%d', time.gmtime())}-{slug}")


def cpu_threads(device: torch.device, quick: bool, threads: int | None) -> int | None:
    """The intra-op threads to bench a CPU with (None: leave torch's setting). --quick takes 1: on a shared 2-core
    machine OpenMP threads spin-waiting on a busy core made a training step 30-70x slower with 2 threads than with 1
    (measured: 0.17 s against 5-12 s for the quick autoencoder step), which no ratio survives."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        return threads
    return 1 if device.type == "cpu" and quick else None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_bench(quick: bool = False, suite: str = "all", out: str | None = None, device: str = "auto",
              compile_matrix: bool = False, threads: int | None = None, op_suites=None, model_suites=None,
              log=_log) -> tuple[dict, dict]:
    """Runs the benchmark and writes its files; returns (result, {kind: path}).

    op_suites / model_suites pick a subset (default: every suite); the command line runs them all. threads: CPU
    intra-op threads (default: 1 with quick on a CPU, else torch's setting; see cpu_threads).
    """
    if suite not in SUITES:
        raise ValueError(f"--suite: unknown suite {suite!r}; choose one of {list(SUITES)}")
    dev = resolve_device(device)
    previous_threads = torch.get_num_threads()
    threads = cpu_threads(dev, quick, threads)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(quick, suite, out, dev, compile_matrix, threads, op_suites, model_suites, log)
    finally:
        torch.set_num_threads(previous_threads)


def _run(quick, suite, out, dev, compile_matrix, threads, op_suites, model_suites, log) -> tuple[dict, dict]:
    from layoutgen.bench import compile_matrix as matrix
    from layoutgen.bench.models import MODEL_SUITES, run_model_suites
    from layoutgen.bench.ops import OP_SUITES, run_op_suites

    start = time.perf_counter()
    machine = machine_info(dev)
    command = ("layoutgen bench" + (" --quick" if quick else "") +
               (" --compile-matrix" if compile_matrix else f" --suite {suite}") + f" --device {dev.type}" +
               (f" --threads {threads}" if threads is not None else ""))
    rows, notes = [], []
    if compile_matrix:
        rows, notes = matrix.matrix_rows(dev, quick, models=model_suites or matrix.WORKLOADS, log=log)
        mode = "compile matrix" + (", quick" if quick else "")
    else:
        if suite in ("ops", "all"):
            rows += run_op_suites(dev, quick, machine["copy_bandwidth_gbs"], op_suites or OP_SUITES, log=log)
        if suite in ("models", "all"):
            rows += run_model_suites(dev, quick, model_suites or MODEL_SUITES, log=log)
        mode = "quick" if quick else "full"
        if quick:
            notes.append("--quick: tiny shapes and models scaled down (see layoutgen/bench/ops.py and models.py)")
    result = {"mode": mode, "command": command, "machine": machine, "rows": rows, "notes": notes,
              "seconds": time.perf_counter() - start}
    files = write_report(out or default_out(dev), result)
    return result, files

