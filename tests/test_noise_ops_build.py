"""kernels/noise_ops_build.py: when the CUDA noise ops can be built, and which CUDA toolkit the build uses.

Both matter on machines this CPU-only test machine does not resemble: a CUDA build of torch with nvcc but no visible
GPU (torch's cpp_extension then finds no architecture to build for and fails with an IndexError unless
TORCH_CUDA_ARCH_LIST is set), and an `nvcc` on PATH that is a wrapper script outside its toolkit (cpp_extension would
take the wrapper's parent folder as CUDA_HOME and fail to link libcudart). Fakes stand in for both here.
"""
from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import pytest
import torch

from layoutgen.kernels import noise_ops_build as build


@pytest.fixture
def cuda_torch(monkeypatch):
    """A torch that reports CUDA, no visible GPU, no arch list and no build switch set."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("TORCH_CUDA_ARCH_LIST", "LAYOUTGEN_BUILD_CUDA"):
        monkeypatch.delenv(name, raising=False)


def test_no_gpu_and_no_arch_list_blocks_the_cuda_build(cuda_torch, monkeypatch):
    ext = SimpleNamespace(CUDA_HOME="/opt/cuda")
    assert "TORCH_CUDA_ARCH_LIST" in build.cuda_build_blocker(ext)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert build.cuda_build_blocker(ext) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert build.cuda_build_blocker(ext) is None   # a visible GPU gives cpp_extension its architecture


@pytest.mark.parametrize("case,expected", [("switch_off", "LAYOUTGEN_BUILD_CUDA=0"), ("cpu_torch", "torch has no CUDA"),
                                           ("no_nvcc", "no CUDA toolkit")])
def test_other_blockers_are_named(cuda_torch, monkeypatch, case, expected):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    ext = SimpleNamespace(CUDA_HOME=None if case == "no_nvcc" else "/opt/cuda")
    if case == "switch_off":
        monkeypatch.setenv("LAYOUTGEN_BUILD_CUDA", "0")
    if case == "cpu_torch":
        monkeypatch.setattr(torch.version, "cuda", None)
    assert expected in build.cuda_build_blocker(ext)


def fake_toolkit(tmp_path, with_runtime: bool = True) -> str:
    root = tmp_path / "cuda-13.0"
    (root / "include").mkdir(parents=True)
    if with_runtime:
        (root / "include" / "cuda_runtime_api.h").write_text("/* fake */\n")
    return str(root)


def fake_nvcc_wrapper(tmp_path, top: str) -> str:
    """bin/nvcc, a shell script outside the toolkit that answers --dryrun as nvcc does (the '#$ TOP=' line)."""
    bin_dir = tmp_path / "wrapper" / "bin"
    bin_dir.mkdir(parents=True)
    nvcc = bin_dir / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "#$ _NVVM_BRANCH_=nvvm" >&2\necho "#$ TOP={top}/bin/.." >&2\n')
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return str(bin_dir)


@pytest.fixture
def no_cuda_env(monkeypatch):
    """Neither CUDA_HOME nor CUDA_PATH set, and whatever the code under test sets is undone afterwards (setenv first
    makes monkeypatch record the original state, absent included)."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_a_wrapper_nvcc_leads_to_its_real_toolkit(tmp_path, monkeypatch, no_cuda_env, cuda_torch):
    root = fake_toolkit(tmp_path)
    monkeypatch.setenv("PATH", fake_nvcc_wrapper(tmp_path, root) + os.pathsep + os.environ["PATH"])
    assert build.cuda_toolkit_root() == root

    wrong = SimpleNamespace(CUDA_HOME=str(tmp_path / "wrapper"))   # cpp_extension's guess: the wrapper's parent
    build.use_cuda_toolkit_root(wrong)
    assert wrong.CUDA_HOME == root and os.environ["CUDA_HOME"] == root

    monkeypatch.setattr(torch.version, "cuda", None)   # a CPU torch builds no CUDA: its guess is left alone
    cpu_guess = SimpleNamespace(CUDA_HOME=str(tmp_path / "wrapper"))
    build.use_cuda_toolkit_root(cpu_guess)
    assert cpu_guess.CUDA_HOME == str(tmp_path / "wrapper")


def test_no_change_where_the_guess_is_right_or_nothing_better_is_found(tmp_path, monkeypatch, no_cuda_env):
    root = fake_toolkit(tmp_path, with_runtime=False)   # the wrapper points at a folder without the CUDA runtime
    monkeypatch.setenv("PATH", fake_nvcc_wrapper(tmp_path, root) + os.pathsep + os.environ["PATH"])
    assert build.cuda_toolkit_root() is None
    monkeypatch.setenv("CUDA_HOME", "/somewhere/chosen")         # the user's choice is never second-guessed
    assert build.cuda_toolkit_root() is None
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))           # no nvcc at all
    assert build.cuda_toolkit_root() is None
