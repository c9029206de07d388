"""Which implementation the fast ops use, chosen in one place.

    layoutgen.kernels.set_backend("reference")          # for the rest of the process
    with layoutgen.kernels.use_backend("triton"): ...   # for a block
    LAYOUTGEN_KERNEL_BACKEND=reference python train.py  # from the environment

Names:
- "auto" (default): the fused kernels where they run natively (Triton on CUDA tensors, the compiled noise-op
  extension wherever it is built), the PyTorch references elsewhere;
- "triton": the fused kernels everywhere, Triton kernels on CPU tensors included (they then need
  TRITON_INTERPRET=1, which is how the tests check them without a GPU);
- "reference": the pure-PyTorch references, for comparison and debugging.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "LAYOUTGEN_KERNEL_BACKEND"

_state = threading.local()
_process_default: str | None = None


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown kernel backend {name!r}; choose one of {list(BACKENDS)}")
    return name


def get_backend() -> str:
    """The active backend: the innermost use_backend block, else set_backend's, else the environment, else auto."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    if _process_default is not None:
        return _process_default
    return _check(os.environ.get(ENV_VAR, "auto"), f"environment variable {ENV_VAR}")


def set_backend(name: str) -> None:
    """Sets the backend for the whole process (use_backend blocks still take precedence)."""
    global _process_default
    _process_default = _check(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Uses `name` inside the block, in this thread."""
    _check(name, "use_backend")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()
