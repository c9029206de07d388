"""Samplers: shuffling, class-balanced weighted sampling (statistical checks), DDP slicing, batching policies."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from layoutgen.models.datasets.sampling import (
    EpochBatchSampler,
    ShardedSampler,
    WeightedDistributedSampler,
    class_balance_weights,
    make_sampler,
)

# Class sizes as unbalanced as the synthetic layout types (0.55 / 0.25 / 0.13 / 0.07).
COUNTS = np.array([550, 250, 130, 70])
LABELS = np.repeat(np.arange(4), COUNTS)


def expected_shares(power: float) -> np.ndarray:
    mass = COUNTS * COUNTS.astype(float) ** -power
    return mass / mass.sum()


def assert_shares(draw, power: float) -> None:
    """Every class's share of the draw within 5 binomial standard deviations of its expectation."""
    draw = np.asarray(draw)
    shares = np.bincount(LABELS[draw], minlength=4) / len(draw)
    expected = expected_shares(power)
    sigma = np.sqrt(expected * (1 - expected) / len(draw))
    assert np.all(np.abs(shares - expected) < 5 * sigma), (shares, expected, sigma)


def test_class_balance_weights():
    w = class_balance_weights([0, 0, 0, 1], power=1.0)
    np.testing.assert_allclose(w, [1 / 6, 1 / 6, 1 / 6, 1 / 2])
    np.testing.assert_allclose(class_balance_weights([0, 0, 0, 1], power=0.0), [0.25] * 4)
    half = class_balance_weights([0, 0, 0, 0, 1], power=0.5)
    assert half[4] / half[0] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        class_balance_weights([], 1.0)
    with pytest.raises(ValueError):
        class_balance_weights([0, 1], -1.0)


@pytest.mark.parametrize("power", [1.0, 0.5, 0.0])
def test_weighted_sampler_class_balance(power):
    sampler = WeightedDistributedSampler.from_labels(LABELS, power=power, num_samples=20000, seed=1,
                                                     num_replicas=1, rank=0)
    draw = list(sampler)
    assert len(draw) == len(sampler) == 20000
    assert_shares(draw, power)
    if power == 1.0:  # balanced: the rarest class is drawn ~0.25 of the time, far above its 0.07 frequency
        assert np.bincount(LABELS[draw])[3] / 20000 > 0.22


def test_weighted_sampler_epochs_and_determinism():
    make = lambda: WeightedDistributedSampler.from_labels(LABELS, num_samples=500, seed=3, num_replicas=1, rank=0)
    a, b = make(), make()
    assert list(a) == list(b)  # deterministic for a seed
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first  # a new draw every epoch
    b.set_epoch(1)
    assert list(a) == list(b)
    c = WeightedDistributedSampler.from_labels(LABELS, num_samples=500, seed=4, num_replicas=1, rank=0)
    assert list(c) != first


def test_weighted_sampler_two_ranks_slice_one_global_draw():
    """Simulated 2-rank DDP: both ranks together are exactly the single-process global draw of the epoch."""
    kwargs = dict(power=1.0, num_samples=20001, seed=7)
    for epoch in (0, 3):
        ranks = [WeightedDistributedSampler.from_labels(LABELS, num_replicas=2, rank=r, **kwargs) for r in (0, 1)]
        single = WeightedDistributedSampler.from_labels(LABELS, num_replicas=1, rank=0, **kwargs)
        for s in (*ranks, single):
            s.set_epoch(epoch)
        draws = [list(s) for s in ranks]
        assert len(draws[0]) == len(draws[1]) == len(ranks[0]) == 10001  # 20001 padded to 20002
        global_draw = list(single)
        assert draws[0] == global_draw[0::2]
        assert draws[1] == (global_draw + global_draw[:1])[1::2]
        for draw in draws:  # every rank on its own is balanced too
            assert_shares(draw, 1.0)
        assert_shares(draws[0] + draws[1], 1.0)
    dropped = WeightedDistributedSampler.from_labels(LABELS, num_replicas=2, rank=1, num_samples=9, drop_last=True)
    assert len(list(dropped)) == len(dropped) == 4


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sampler = WeightedDistributedSampler.from_labels(LABELS, power=1.0, num_samples=4000, seed=11)
        sampler.set_epoch(2)
        draws = [None] * world
        dist.all_gather_object(draws, list(sampler))
        if rank == 0:
            torch.save({"draws": draws, "world": sampler.num_replicas}, os.path.join(out_dir, "draws.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_weighted_sampler_under_real_torch_distributed(tmp_path):
    """Two gloo processes: the samplers read world size and rank from torch.distributed."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "draws.pt", weights_only=True)
    assert result["world"] == 2
    draws = result["draws"]
    single = WeightedDistributedSampler.from_labels(LABELS, power=1.0, num_samples=4000, seed=11, num_replicas=1,
                                                    rank=0)
    single.set_epoch(2)
    global_draw = list(single)
    assert draws[0] == global_draw[0::2] and draws[1] == global_draw[1::2]
    assert_shares(draws[0] + draws[1], 1.0)


def test_sharded_sampler_covers_every_row_once_per_epoch():
    for shuffle in (True, False):
        ranks = [ShardedSampler(10, shuffle=shuffle, seed=5, num_replicas=3, rank=r) for r in range(3)]
        draws = [list(s) for s in ranks]
        assert all(len(d) == 4 for d in draws)  # 10 rows padded to 12
        union = [i for d in draws for i in d]
        assert set(union) == set(range(10)) and len(union) == 12
        if not shuffle:
            assert draws[0] == [0, 3, 6, 9]
    s = ShardedSampler(50, seed=1, num_replicas=1, rank=0)
    e0 = list(s)
    s.set_epoch(1)
    assert sorted(e0) == list(range(50)) and list(s) != e0
    dropped = [list(ShardedSampler(10, seed=5, num_replicas=3, rank=r, drop_last=True)) for r in range(3)]
    assert all(len(d) == 3 for d in dropped) and len({i for d in dropped for i in d}) == 9


def test_batch_sampler_last_batch_policies():
    base = ShardedSampler(10, shuffle=False, num_replicas=1, rank=0)
    partial = list(EpochBatchSampler(base, 4, "partial"))
    assert partial == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and len(EpochBatchSampler(base, 4, "partial")) == 3
    assert list(EpochBatchSampler(base, 4, "drop")) == partial[:2] and len(EpochBatchSampler(base, 4, "drop")) == 2
    assert list(EpochBatchSampler(base, 4, "fill"))[-1] == [8, 9, 0, 1]
    tiny = ShardedSampler(2, shuffle=False, num_replicas=1, rank=0)
    assert list(EpochBatchSampler(tiny, 5, "fill")) == [[0, 1, 0, 1, 0]]
    with pytest.raises(ValueError, match="valid policies"):
        EpochBatchSampler(base, 4, "pad")
    with pytest.raises(ValueError):
        EpochBatchSampler(base, 0)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(10, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="empty"):
        ShardedSampler(0, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="non-negative"):
        WeightedDistributedSampler([1.0, -1.0], num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="without replacement"):
        WeightedDistributedSampler([1.0, 0.0, 1.0], num_samples=3, replacement=False, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="labels"):
        make_sampler(10, weighted=True)
    without = WeightedDistributedSampler([1.0] * 6, num_samples=6, replacement=False, num_replicas=1, rank=0)
    assert sorted(without) == list(range(6))
    assert math.isclose(sum(class_balance_weights(LABELS)), 1.0)
