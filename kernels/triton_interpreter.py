"""Whether Triton's CPU interpreter (TRITON_INTERPRET=1) can run the project's kernels in this environment.

Triton's interpreter holds each scalar kernel argument as a one-element NumPy array. Up to triton 3.6 it turned one
into a loop bound with `int(array)`, which NumPy 2.4 and later refuse ("only 0-dimensional arrays can be converted to
Python scalars"; triton-lang/triton#9171, fixed in later triton releases), so every kernel with a loop over a
runtime bound (the chunked GroupNorm paths) fails there. `interpreter_problem()` runs one tiny such kernel once and
says what went wrong, so the launchers can refuse with the remedy instead of failing deep inside a kernel.
"""
from __future__ import annotations

import functools

import numpy
import torch
import triton
import triton.language as tl


@triton.jit
def _runtime_bound_loop_probe(X, Out, N, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, N, BLOCK):   # a loop over a runtime bound, like the kernels' spatial loops
        offsets = start + tl.arange(0, BLOCK)
        acc += tl.load(X + offsets, mask=offsets < N, other=0.0)
    tl.store(Out, tl.sum(acc, axis=0))


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str | None:
    """None when the interpreter runs a runtime-bound loop correctly; else a sentence saying what failed and why."""
    x = torch.arange(5, dtype=torch.float32)
    out = torch.zeros(1)
    try:
        _runtime_bound_loop_probe[(1,)](x, out, x.numel(), BLOCK=2)
    except Exception as error:  # noqa: BLE001 - the interpreter wraps what went wrong in its own error types
        cause = " ".join(str(error).split())[:200]
        return (f"triton {triton.__version__}'s interpreter cannot run a loop over a runtime bound with NumPy "
                f"{numpy.__version__} ({type(error).__name__}: {cause}). This is triton-lang/triton#9171: upgrade "
                f"triton (3.9 works), or install numpy<2.4")
    if out.item() != 10.0:
        return f"triton {triton.__version__}'s interpreter summed 0..4 to {out.item()}, not 10"
    return None
