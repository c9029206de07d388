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

Every Triton-backed op asks `use_triton(x)` and nothing else. Under torch.compile the choice is made while tracing:
dynamo guards on set_backend / use_backend (a change recompiles) but reads the environment variable only once.
Attention has its own switch of the same shape in attention.py (LAYOUTGEN_ATTENTION_BACKEND), and GroupNorm's chunked
path one below (group_norm_chunked_path, LAYOUTGEN_GN_CHUNKED).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "LAYOUTGEN_KERNEL_BACKEND"

# Triton ships for Linux x86_64 only; checked without importing it (importing triton reads TRITON_INTERPRET).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Switch:
    """A named choice made in one place: the innermost `use` block (per thread), else `set` (the process), else an
    environment variable, else a default. The kernel backend and the attention backend are two of these."""

    def __init__(self, kind: str, choices: tuple[str, ...], default: str, env_var: str) -> None:
        self.kind, self.choices, self.default, self.env_var = kind, choices, default, env_var
        self.process_default: str | None = None
        self._local = threading.local()

    def check(self, name: object, source: str) -> str:
        if name not in self.choices:
            raise ValueError(f"{source}: unknown {self.kind} backend {name!r}; choose one of {list(self.choices)}")
        return name

    def get(self) -> str:
        stack = getattr(self._local, "stack", None)
        if stack:
            return stack[-1]
        if self.process_default is not None:
            return self.process_default
        return self.check(os.environ.get(self.env_var, self.default), f"environment variable {self.env_var}")

    def set(self, name: str, source: str) -> None:
        self.process_default = self.check(name, source)

    @contextlib.contextmanager
    def use(self, name: str, source: str) -> Iterator[str]:
        self.check(name, source)
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append(name)
        try:
            yield name
        finally:
            stack.pop()


kernel_backend = Switch("kernel", BACKENDS, "auto", ENV_VAR)

# GroupNorm+SiLU's groups too large for registers (the Triton kernels' chunked path): "two-pass" (the default: a
# statistics kernel, then an apply kernel) or "one-pass" (group_norm_silu_one_pass.py: every input read once, with a
# per-group barrier inside one launch).
GROUP_NORM_CHUNKED_PATHS = ("two-pass", "one-pass")
group_norm_chunked_path = Switch("GroupNorm chunked", GROUP_NORM_CHUNKED_PATHS, "two-pass", "LAYOUTGEN_GN_CHUNKED")


def get_backend() -> str:
    """The active backend: the innermost use_backend block, else set_backend's, else the environment, else auto."""
    return kernel_backend.get()


def set_backend(name: str) -> None:
    """Sets the backend for the whole process (use_backend blocks still take precedence)."""
    kernel_backend.set(name, "set_backend")


def use_backend(name: str) -> contextlib.AbstractContextManager[str]:
    """Uses `name` inside the block, in this thread."""
    return kernel_backend.use(name, "use_backend")


@contextlib.contextmanager
def use_kernel_choice(backend: str | None = None, group_norm_chunked: str | None = None) -> Iterator[None]:
    """The kernel backend and GroupNorm's chunked path for a block, in this thread (None leaves one as it is): what a
    benchmark holds over a whole step, since a backward reads the choices when it runs, not when its forward did."""
    with contextlib.ExitStack() as stack:
        if backend is not None:
            stack.enter_context(kernel_backend.use(backend, "use_kernel_choice"))
        if group_norm_chunked is not None:
            stack.enter_context(group_norm_chunked_path.use(group_norm_chunked, "use_kernel_choice"))
        yield


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op should run its Triton kernels on `x` under the active backend.

    auto: CUDA tensors of a Triton dtype when triton is installed; triton: every tensor of a Triton dtype (CPU ones
    need TRITON_INTERPRET=1, which the kernels check when they launch); reference: never. float64 always takes the
    reference (the kernels compute their statistics in float32).
    """
    name = get_backend()
    if name == "reference" or x.dtype not in TRITON_DTYPES:
        return False
    if name == "triton":
        if not TRITON_INSTALLED:
            raise RuntimeError("layoutgen.kernels: backend 'triton' was asked for but triton is not installed "
                               "(pip install triton, Linux x86_64), use 'auto' or 'reference'")
        return True
    return x.is_cuda and TRITON_INSTALLED
