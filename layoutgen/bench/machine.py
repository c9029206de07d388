"""What a benchmark ran on: machine, card, versions, commit, and the device's measured memory bandwidth.

The bandwidth ceiling is measured, not looked up: a large device-to-device copy on a GPU (1 GiB), a memcpy of a
128 MiB tensor on a CPU, counted as read + write. Ops' achieved GB/s are reported as a share of it.
"""
from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys

import torch

from layoutgen.bench.timing import gbs, time_ms


def copy_bandwidth_gbs(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """Achieved GB/s of a large tensor copy (counted as read + write): the memory ceiling to compare kernels with."""
    device = torch.device(device)
    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 27)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, repeats=10, flush_l2=False)
    return gbs(2 * nbytes, ms)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:  # noqa: BLE001 - ImportError, or a package that fails while importing (e.g. no GPU driver)
        return "not installed"


def environment_line(device: torch.device | str) -> str:
    triton = _version("triton")
    return ", ".join([f"device: {device_name(device)}", f"torch {torch.__version__}",
                      "no triton" if triton == "not installed" else f"triton {triton}"])


def git_commit() -> str:
    """The checkout's commit (with "+dirty" when files changed), or "unknown" outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def machine_info(device: torch.device | str, measure_bandwidth: bool = True) -> dict:
    """Everything a result needs to be read later: host, card, versions, commit, measured copy bandwidth."""
    device = torch.device(device)
    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "card": device_name(device),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "commit": git_commit(),
    }
    if measure_bandwidth:
        info["copy_bandwidth_gbs"] = copy_bandwidth_gbs(device)
        info["copy_bandwidth_method"] = ("device-to-device copy of 1 GiB" if device.type == "cuda"
                                         else "memcpy of a 128 MiB tensor") + ", counted as read + write"
    return info
