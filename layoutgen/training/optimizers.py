"""The optimizer behind `training.optimizer`: AdamW from torch (plain or fused) or NVIDIA apex's FusedAdam.

    auto             apex FusedAdam (adam_w_mode) when apex imports and the device is CUDA; else torch AdamW,
                     fused on CUDA (one kernel for all parameters) and plain on the CPU
    adamw            torch AdamW (foreach)
    fused_adamw      torch AdamW(fused=True) (CUDA, and the CPU on torch versions that have a fused CPU kernel)
    apex_fused_adam  apex.optimizers.FusedAdam(adam_w_mode=True); needs apex and a CUDA device

All of them compute AdamW's decoupled weight decay, so switching changes speed, not the training recipe.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["OPTIMIZERS", "apex_available", "build_optimizer", "resolve_optimizer"]

OPTIMIZERS = ("auto", "adamw", "fused_adamw", "apex_fused_adam")


def apex_available() -> bool:
    """True when NVIDIA apex's fused optimizers import (apex built with its CUDA extensions)."""
    try:
        from apex.optimizers import FusedAdam  # noqa: F401
    except Exception:  # ImportError, or an apex built without its CUDA extensions failing at import
        return False
    return True


def resolve_optimizer(name: str, device: torch.device) -> str:
    """The concrete choice ("adamw", "fused_adamw" or "apex_fused_adam") for `name` on `device`."""
    if name not in OPTIMIZERS:
        raise ValueError(f"training.optimizer: unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")
    on_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        if on_cuda:
            return "apex_fused_adam" if apex_available() else "fused_adamw"
        return "adamw"
    if name == "apex_fused_adam":
        if not on_cuda:
            raise ValueError(f"training.optimizer: apex_fused_adam needs a CUDA device, the run is on {device}; "
                             f"use adamw or auto")
        if not apex_available():
            raise ValueError("training.optimizer: apex_fused_adam needs NVIDIA apex (apex.optimizers.FusedAdam), "
                             "which does not import here; install apex with its CUDA extensions, or use auto")
    return name


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `name` (see the module docstring) over `params`."""
    choice = resolve_optimizer(name, device)
    params = list(params)
    if choice == "apex_fused_adam":
        from apex.optimizers import FusedAdam
        return FusedAdam(params, lr=lr, weight_decay=weight_decay, adam_w_mode=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if choice == "fused_adamw" else None)
