"""benchmarks/gpu_check.sh on the CPU: its steps, budget, failure status and the files it hands back.

A lent GPU machine gives minutes and returns at most 8 files from $OUT, at most 2 folders down, with plain names; the
script must keep to that whatever it ran, so these tests run its cheap steps here and check what lands in $OUT.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
MAX_FILES_BACK = 8
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def run_check(tmp_path: Path, *steps: str, **env: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    out, results = tmp_path / "out", tmp_path / "results" / "run"
    full_env = dict(os.environ, OUT=str(out), LAYOUTGEN_GPU_CHECK_RESULTS=str(results), PYTHON=sys.executable, **env)
    proc = subprocess.run(["bash", str(SCRIPT), *steps], env=full_env, capture_output=True, text=True, timeout=300)
    return proc, out, results


def returned_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file()]


def test_env_step_publishes_few_plain_files_and_an_archive(tmp_path):
    proc, out, results = run_check(tmp_path, "env", "wheels")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = returned_files(out)
    assert 0 < len(files) <= MAX_FILES_BACK
    for path in files:
        rel = path.relative_to(out)
        assert len(rel.parts) <= 3, rel          # $OUT/a/b/file at most
        assert all(NAME.match(part) for part in rel.parts), rel
    assert {p.name for p in files} >= {"summary.txt", "environment.txt", "results.tar.gz"}
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^env: exit 0, ", summary, re.M), summary
    assert re.search(r"^wheels: exit 0, ", summary, re.M), summary
    assert "torch: " in (out / "environment.txt").read_text()
    with tarfile.open(out / "results.tar.gz") as archive:
        names = archive.getnames()
    assert "run/summary.txt" in names and "run/environment.txt" in names, names
    assert (results / "summary.txt").read_text() == summary


def test_a_failed_step_sets_the_exit_status_and_the_next_steps_still_run(tmp_path):
    empty = tmp_path / "no_wheels"
    empty.mkdir()
    proc, out, _ = run_check(tmp_path, "wheels", "env", LAYOUTGEN_GPU_CHECK_WHEELS=str(empty))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^wheels: exit [1-9]", summary, re.M), summary
    assert re.search(r"^env: exit 0, ", summary, re.M), summary


def test_steps_past_the_budget_are_listed_not_run(tmp_path):
    proc, out, _ = run_check(tmp_path, "env", "cuda-tests", LAYOUTGEN_GPU_CHECK_BUDGET_S="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    assert "env: not run (budget" in summary and "cuda-tests: not run (budget" in summary


# Collecting the whole suite takes several seconds (torch alone takes over one to import): stopped at 1 s, by the
# whole run's budget (any step) or by the CUDA tests' own cap within a larger budget.
@pytest.mark.parametrize("step,limit,log,stopped", [
    ("cpu-tests", {"LAYOUTGEN_GPU_CHECK_BUDGET_S": "1"}, "tests.log", "budget"),
    ("cuda-tests", {"LAYOUTGEN_GPU_CHECK_TESTS_CAP_S": "1"}, "cuda_tests.log", "its 1 s cap"),
])
def test_a_step_running_too_long_is_stopped_and_reported(tmp_path, step, limit, log, stopped):
    proc, out, results = run_check(tmp_path, step, LAYOUTGEN_GPU_CHECK_MIN_STEP_S="1", LAYOUTGEN_GPU_CHECK_WORKERS="0",
                                   LAYOUTGEN_GPU_CHECK_PYTEST_ARGS="--collect-only tests", **limit)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{step}: exit 124 (stopped: {stopped})" in (out / "summary.txt").read_text()
    assert (results / log).exists()


@pytest.mark.parametrize("step", ["bogus", "cuda_tests"])
def test_an_unknown_step_is_refused_by_name(tmp_path, step):
    proc, out, _ = run_check(tmp_path, "env", step)
    assert proc.returncode == 2
    assert f"unknown step '{step}'" in proc.stderr and "cuda-tests" in proc.stderr
    assert not out.exists()   # refused before anything ran
