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
