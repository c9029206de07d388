"""Whether the project's Triton kernels can run on a device in this test process (shared by the kernel tests)."""
from __future__ import annotations

import importlib

from layoutgen.kernels import backend


def triton_skip_reason(device: str) -> str | None:
    """None where the 'triton' backend runs on `device` here; else why it cannot (the reason a test skips with)."""
    if not backend.TRITON_INSTALLED:
        return "triton is not installed"
    if device == "cpu":
        triton_impl = importlib.import_module("layoutgen.kernels.group_norm_silu_triton")
        if not triton_impl.INTERPRETED:
            return "the Triton kernels were compiled for a GPU (TRITON_INTERPRET is not 1); the CUDA tests cover them"
    return None
