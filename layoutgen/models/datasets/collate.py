"""Collating dict samples into dict batches, with optional keys.

A sample is a dict of tensors (and plain numbers or strings). A sample may be ``None`` (a row skipped with
``on_error: skip``): it is dropped from its batch. A key that is ``None`` or absent in some samples but not all is
optional: its batch tensor is zero where a sample had none, and ``has_<key>`` (bool [B]) tells which samples had it.
A key absent from every sample is absent from the batch.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["collate_dicts", "stack_values"]


def stack_values(key: str, values: Sequence[Any]) -> Any:
    """One batch entry from the samples' values of ``key`` (all present)."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ValueError(f"collate: {key!r} has different shapes in one batch {sorted(shapes)}; "
                             f"set image_size to resize images to one size")
        return torch.stack(list(values))
    if isinstance(first, bool):
        return torch.tensor(values, dtype=torch.bool)
    if isinstance(first, int):
        return torch.tensor(values, dtype=torch.int64)
    if isinstance(first, float):
        return torch.tensor(values, dtype=torch.float32)
    return list(values)


def collate_dicts(samples: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """list of sample dicts -> one batch dict (see the module docstring); an empty dict when every sample is None."""
    samples = [s for s in samples if s is not None]
    if not samples:
        return {}
    keys: list[str] = []
    for sample in samples:
        keys.extend(k for k in sample if k not in keys)
    batch: dict[str, Any] = {}
    for key in keys:
        present = [sample.get(key) is not None for sample in samples]
        values = [sample[key] for sample, has in zip(samples, present) if has]
        if not values:
            continue
        if all(present):
            batch[key] = stack_values(key, values)
            continue
        if not isinstance(values[0], torch.Tensor):
            raise ValueError(f"collate: optional key {key!r} must hold tensors, got {type(values[0]).__name__}")
        stacked = stack_values(key, values)
        full = stacked.new_zeros((len(samples), *stacked.shape[1:]))
        mask = torch.tensor(present, dtype=torch.bool)
        full[mask] = stacked
        batch[key] = full
        batch[f"has_{key}"] = mask
    return batch
