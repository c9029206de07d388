"""Shared test set-up.

- Without a GPU, the Triton kernels are tested in Triton's interpreter: TRITON_INTERPRET=1 must be in the environment
  before layoutgen's Triton kernels are first loaded (triton decides at decoration time), so it is set here, before
  any test module runs. With a GPU it is left alone: the kernels compile for the GPU, the CUDA tests run them, and
  the CPU Triton tests skip.
- Tests marked `cuda` are skipped cleanly when no CUDA device is present.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(request):
    """One intra-op thread per test module: the tensors in tests are tiny, and on a busy 2-core machine OpenMP
    threads spin-waiting on each other made them up to 40x slower. A module sets USE_ALL_THREADS = True to opt out."""
    if getattr(request.module, "USE_ALL_THREADS", False):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def triton_cpu():
    """Skips a test of the Triton kernels on CPU tensors where they cannot run here (compiled for a GPU, or no
    triton)."""
    from triton_support import triton_skip_reason
    reason = triton_skip_reason("cpu")
    if reason:
        pytest.skip(reason)
