"""Which rows each rank reads in each epoch: shuffling, class-balanced weighted sampling, DDP sharding, batching.

Both loading paths (the torch DataLoader and the DALI pipeline) draw their rows from the objects here, so for the same
seed, epoch, rank and batch size they read exactly the same rows in the same order.

Class balance: a row of class ``c`` is drawn with probability proportional to ``count[c] ** -power``. ``power=1``
gives every class the same expected share, ``power=0`` is the plain frequency, ``0.5`` is in between (the "square
root" re-weighting of Mahajan et al. 2018, "Exploring the limits of weakly supervised pretraining").

DDP: every rank draws the same global sample (one generator seeded with ``(seed, epoch)``), then takes its strided
slice ``draw[rank::num_replicas]``, as ``torch.utils.data.DistributedSampler`` does, so the ranks together see one
weighted draw per epoch and never the same draw position twice. Call ``set_epoch`` at the start of every epoch.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = [
    "LAST_BATCH_POLICIES",
    "ShardedSampler",
    "WeightedDistributedSampler",
    "EpochBatchSampler",
    "class_balance_weights",
    "distributed_world",
    "make_sampler",
]

LAST_BATCH_POLICIES = ("partial", "drop", "fill")


def distributed_world(num_replicas: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """(num_replicas, rank): the arguments where given, else torch.distributed's when initialised, else (1, 0)."""
    if num_replicas is None or rank is None:
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
    num_replicas, rank = int(num_replicas), int(rank)
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas - 1}], got {rank}")
    return num_replicas, rank


def class_balance_weights(labels: Sequence[int] | np.ndarray, power: float = 1.0) -> np.ndarray:
    """float64 [N] sampling weight of every row: ``count[label] ** -power``, normalised to sum to 1."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {labels.shape}")
    if labels.min() < 0:
        raise ValueError("labels must be >= 0")
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}")
    counts = np.bincount(labels).astype(np.float64)
    weights = counts[labels] ** -float(power)
    return weights / weights.sum()


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # One stream per (seed, epoch), the same on every rank; mixing through SeedSequence keeps (seed, epoch) and
    # (seed + 1, epoch - 1) apart, unlike DistributedSampler's seed + epoch.
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class _EpochSampler(Sampler[int]):
    """Common part: rank slicing of a global per-epoch draw, set_epoch, length."""

    def __init__(self, num_rows: int, num_samples: int | None, num_replicas: int | None, rank: int | None,
                 seed: int, drop_last: bool):
        self.num_rows = int(num_rows)
        if self.num_rows < 1:
            raise ValueError("cannot sample from an empty data set")
        self.num_replicas, self.rank = distributed_world(num_replicas, rank)
        self.global_samples = self.num_rows if num_samples is None else int(num_samples)
        if self.global_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.seed, self.epoch, self.drop_last = int(seed), 0, bool(drop_last)
        if self.drop_last:
            self.num_samples = self.global_samples // self.num_replicas
            if self.num_samples == 0:
                raise ValueError(f"drop_last with {self.global_samples} samples leaves nothing for "
                                 f"{self.num_replicas} replicas")
        else:
            self.num_samples = math.ceil(self.global_samples / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def global_draw(self) -> torch.Tensor:
        """int64 [global_samples]: the rows all ranks draw together this epoch."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        draw = self.global_draw()
        if self.drop_last:
            draw = draw[: self.total_size]
        elif self.total_size > len(draw):  # pad by repeating the start, as DistributedSampler does
            repeats = math.ceil((self.total_size - len(draw)) / len(draw))
            draw = torch.cat([draw, *([draw] * repeats)])[: self.total_size]
        return iter(draw[self.rank : self.total_size : self.num_replicas].tolist())


class ShardedSampler(_EpochSampler):
    """Every row once per epoch (shuffled with ``(seed, epoch)`` or in manifest order), sliced for this rank."""

    def __init__(self, num_rows: int, shuffle: bool = True, seed: int = 0, num_replicas: int | None = None,
                 rank: int | None = None, drop_last: bool = False):
        super().__init__(num_rows, None, num_replicas, rank, seed, drop_last)
        self.shuffle = bool(shuffle)

    def global_draw(self) -> torch.Tensor:
        if self.shuffle:
            return torch.randperm(self.num_rows, generator=_epoch_generator(self.seed, self.epoch))
        return torch.arange(self.num_rows)


class WeightedDistributedSampler(_EpochSampler):
    """Weighted sampling that works under DDP: one global draw of ``num_samples`` rows per epoch, sliced per rank.

    Args:
        weights: [N] non-negative sampling weight of every row (need not sum to 1).
        num_samples: rows drawn per epoch over all ranks (default N).
        replacement: draw with replacement (the usual choice for class balance); without it, num_samples <= N.
        num_replicas, rank: the DDP world (default: torch.distributed's, or a single process).
        seed: the same on every rank.
        drop_last: drop the tail that does not divide evenly among ranks instead of padding it.
    """

    def __init__(self, weights: Sequence[float] | np.ndarray | torch.Tensor, num_samples: int | None = None,
                 replacement: bool = True, num_replicas: int | None = None, rank: int | None = None,
                 seed: int = 0, drop_last: bool = False):
        weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        if weights.ndim != 1 or weights.numel() == 0:
            raise ValueError(f"weights must be a non-empty 1-D sequence, got shape {tuple(weights.shape)}")
        if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero")
        super().__init__(len(weights), num_samples, num_replicas, rank, seed, drop_last)
        self.weights, self.replacement = weights, bool(replacement)
        if not self.replacement and self.global_samples > int((weights > 0).sum()):
            raise ValueError(f"cannot draw {self.global_samples} rows without replacement from "
                             f"{int((weights > 0).sum())} rows of non-zero weight")

    @classmethod
    def from_labels(cls, labels: Sequence[int] | np.ndarray, power: float = 1.0,
                    **kwargs: Any) -> WeightedDistributedSampler:
        """Inverse class frequency to the power ``power`` (see :func:`class_balance_weights`)."""
        return cls(class_balance_weights(labels, power), **kwargs)

    def global_draw(self) -> torch.Tensor:
        return torch.multinomial(self.weights, self.global_samples, self.replacement,
                                 generator=_epoch_generator(self.seed, self.epoch))


class EpochBatchSampler(Sampler[list[int]]):
    """Groups a sampler's rows into batches with a last-batch policy.

    ``partial``: the last batch may be smaller; ``drop``: a short last batch is dropped; ``fill``: it is completed
    with rows from the start of the epoch (so every batch has ``batch_size`` rows).
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, last_batch: str = "partial"):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if last_batch not in LAST_BATCH_POLICIES:
            raise ValueError(f"last_batch: unknown policy {last_batch!r}; "
                             f"valid policies are {list(LAST_BATCH_POLICIES)}")
        self.sampler, self.batch_size, self.last_batch = sampler, int(batch_size), last_batch

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.last_batch == "drop" else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rows = list(self.sampler)
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            if len(batch) < self.batch_size:
                if self.last_batch == "drop":
                    return
                if self.last_batch == "fill":
                    while len(batch) < self.batch_size:  # a loop: the epoch may be shorter than one batch
                        batch += rows[: self.batch_size - len(batch)]
            yield batch


def make_sampler(num_rows: int, shuffle: bool = True, seed: int = 0, labels: Sequence[int] | None = None,
                 weighted: bool = False, power: float = 1.0, num_samples: int | None = None,
                 num_replicas: int | None = None, rank: int | None = None, drop_last: bool = False) -> Sampler[int]:
    """The sampler both loading paths use: :class:`WeightedDistributedSampler` with ``weighted`` (needs
    ``labels``), else :class:`ShardedSampler`."""
    if weighted:
        if labels is None:
            raise ValueError("weighted sampling needs the labels (a 'type' column in the manifest)")
        return WeightedDistributedSampler.from_labels(labels, power, num_samples=num_samples,
                                                      num_replicas=num_replicas, rank=rank, seed=seed,
                                                      drop_last=drop_last)
    if num_samples is not None:
        raise ValueError("num_samples applies to weighted sampling only")
    return ShardedSampler(num_rows, shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank,
                          drop_last=drop_last)
