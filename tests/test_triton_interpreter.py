"""layoutgen.kernels.triton_interpreter: the probe of Triton's CPU interpreter, and the launchers' refusal when it
fails (triton <= 3.6 with NumPy >= 2.4 cannot run loops over a runtime bound: triton-lang/triton#9171)."""
from __future__ import annotations

import pytest
import torch

from layoutgen.kernels import group_norm_silu, use_backend


def test_the_probe_passes_with_the_installed_triton_and_numpy(triton_cpu):
    # The test environment installs a triton whose interpreter works (the chunked kernel tests depend on it).
    from layoutgen.kernels.triton_interpreter import interpreter_problem
    assert interpreter_problem() is None


def test_a_failing_interpreter_is_refused_with_its_remedy(triton_cpu, monkeypatch):
    from layoutgen.kernels import triton_interpreter
    monkeypatch.setattr(triton_interpreter, "interpreter_problem",
                        lambda: "triton 3.6.0's interpreter cannot run a loop over a runtime bound with NumPy 2.4.0 "
                                "(...). This is triton-lang/triton#9171: upgrade triton (3.9 works), or install "
                                "numpy<2.4")
    with use_backend("triton"), pytest.raises(RuntimeError) as info:
        group_norm_silu(torch.randn(1, 8, 4, 4), 4)
    message = str(info.value)
    assert "triton-lang/triton#9171" in message and "numpy<2.4" in message and "'reference' backend" in message


def test_the_probe_reports_an_interpreter_error(triton_cpu, monkeypatch):
    from layoutgen.kernels import triton_interpreter

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch

    monkeypatch.setattr(triton_interpreter, "_runtime_bound_loop_probe", Broken())
    triton_interpreter.interpreter_problem.cache_clear()
    try:
        problem = triton_interpreter.interpreter_problem()
    finally:
        triton_interpreter.interpreter_problem.cache_clear()
    assert problem is not None and "only 0-dimensional arrays" in problem and "#9171" in problem
