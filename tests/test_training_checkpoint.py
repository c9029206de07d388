"""Training-state checkpoints: exact resume, atomic saves, the NaN guard, best/pruning, tamper detection."""
from __future__ import annotations

import json
import math
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as sched

from layoutgen.training.checkpointing import (
    CheckpointManager,
    load_training_state,
    read_training_metadata,
    save_training_state,
)
from layoutgen.training.ema import EMA
from layoutgen.utils.checkpoint import CheckpointError

WARMUP, TOTAL = 2, 6


def _lr_lambda(step: int) -> float:  # a plain function: LambdaLR stores None for it
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (TOTAL - WARMUP)))


class _Warmup:  # a callable object: LambdaLR stores its __dict__
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps)


def _build(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = sched.LambdaLR(optimizer, _lr_lambda)
    ema = EMA(model, decay=0.9)
    return model, optimizer, scheduler, ema


def _train_step(model, optimizer, scheduler, ema) -> float:
    model.train()
    x = torch.randn(8, 5)  # data from the RNG too: the restore must put it back
    target = torch.randn(8, 2) + random.random() + float(np.random.rand())
    loss = nn.functional.mse_loss(model(x), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    ema.update(model)
    return loss.item()


def _save_args(model, optimizer, scheduler, ema):
    return dict(model=model, optimizer=optimizer, lr_scheduler=scheduler, ema=ema)


def test_resume_is_bit_exact(tmp_path):
    random.seed(1)
    np.random.seed(1)
    objs = _build()
    torch.manual_seed(123)
    full = [_train_step(*objs) for _ in range(TOTAL)]
    full_params = [p.detach().clone() for p in objs[0].parameters()]
    full_opt = objs[1].state_dict()
    full_ema = {k: v.clone() for k, v in objs[3].shadow.items()}

    random.seed(1)
    np.random.seed(1)
    objs = _build()
    torch.manual_seed(123)
    first = [_train_step(*objs) for _ in range(3)]
    path = tmp_path / "state.safetensors"
    save_training_state(path, **_save_args(*objs), step=3, epoch=1, extra={"sampler": {"position": 24}})
    saved_opt = objs[1].state_dict()
    del objs

    # fresh everything, different seeds: only the file can make the rest match
    random.seed(99)
    np.random.seed(99)
    model, optimizer, scheduler, ema = _build(seed=7)
    torch.manual_seed(999)
    info = load_training_state(path, **_save_args(model, optimizer, scheduler, ema))
    assert info["step"] == 3 and info["epoch"] == 1 and info["extra"] == {"sampler": {"position": 24}}

    # optimizer state restored exactly
    loaded_opt = optimizer.state_dict()
    assert loaded_opt["param_groups"] == saved_opt["param_groups"]
    for idx, state in saved_opt["state"].items():
        for name, value in state.items():
            assert torch.equal(loaded_opt["state"][idx][name], value), (idx, name)
    assert scheduler.get_last_lr() == pytest.approx([1e-2 * _lr_lambda(3)])
    assert ema.step == 3

    rest = [_train_step(model, optimizer, scheduler, ema) for _ in range(3)]
    assert first + rest == full  # bit-exact: float equality of every loss
    for p, q in zip(model.parameters(), full_params):
        assert torch.equal(p, q)
    for k, v in full_ema.items():
        assert torch.equal(ema.shadow[k], v), k
    final_opt = optimizer.state_dict()
    for idx, state in full_opt["state"].items():
        for name, value in state.items():
            assert torch.equal(final_opt["state"][idx][name], value)


def test_file_is_safetensors_and_loading_never_unpickles(tmp_path, monkeypatch):
    model, optimizer, scheduler, ema = _build()
    _train_step(model, optimizer, scheduler, ema)
    path = tmp_path / "state.safetensors"
    save_training_state(path, **_save_args(model, optimizer, scheduler, ema), step=1, epoch=0)
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    assert "optimizer.state.0.exp_avg" in header and "optimizer.state.0.exp_avg_sq" in header
    assert "model.0.weight" in header and "ema.shadow.0.weight" in header
    assert header["rng.torch_cpu"]["dtype"] == "U8"
    meta = header["__metadata__"]
    assert json.loads(meta["lr_scheduler"])["lr_lambdas"] == [None]
    assert meta["step"] == "1"

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    fresh = _build(seed=3)
    load_training_state(path, **_save_args(*fresh))
    assert torch.equal(fresh[0][0].weight, model[0].weight)


@pytest.mark.parametrize("make", [
    lambda o: sched.LambdaLR(o, [_Warmup(3)]),
    lambda o: sched.StepLR(o, 2, gamma=0.5),
    lambda o: sched.MultiStepLR(o, [2, 4]),
    lambda o: sched.ExponentialLR(o, 0.9),
    lambda o: sched.CosineAnnealingLR(o, 10),
    lambda o: sched.CosineAnnealingWarmRestarts(o, 3),
    lambda o: sched.OneCycleLR(o, 0.1, total_steps=10),
    lambda o: sched.CyclicLR(o, 0.01, 0.1),
    lambda o: sched.LinearLR(o, total_iters=4),
    lambda o: sched.SequentialLR(o, [sched.LinearLR(o, total_iters=2), sched.ExponentialLR(o, 0.9)], [2]),
    lambda o: sched.ReduceLROnPlateau(o),
], ids=["lambda_obj", "step", "multistep", "exp", "cosine", "warm_restarts", "onecycle", "cyclic", "linear",
        "sequential", "plateau"])
def test_common_lr_schedulers_round_trip(tmp_path, make):
    def build():
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, optimizer, make(optimizer)

    model, optimizer, scheduler = build()
    for _ in range(3):
        optimizer.step()
        scheduler.step(1.0) if isinstance(scheduler, sched.ReduceLROnPlateau) else scheduler.step()
    path = tmp_path / "s.safetensors"
    save_training_state(path, model=model, optimizer=optimizer, lr_scheduler=scheduler, step=3, epoch=0)
    model2, optimizer2, scheduler2 = build()
    load_training_state(path, model=model2, optimizer=optimizer2, lr_scheduler=scheduler2, restore_rng=False)
    assert scheduler2.state_dict().keys() == scheduler.state_dict().keys()
    for key, value in scheduler.state_dict().items():
        if key == "_schedulers":
            assert [s for s in scheduler2.state_dict()[key]] == value
        else:
            assert scheduler2.state_dict()[key] == value, key
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in optimizer.param_groups]


def test_grad_scaler_state_round_trip(tmp_path):
    model = nn.Linear(3, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    path = tmp_path / "s.safetensors"
    save_training_state(path, model=model, scaler=scaler, step=0, epoch=0)
    scaler2 = torch.amp.GradScaler("cpu")
    load_training_state(path, model=nn.Linear(3, 2), scaler=scaler2)
    assert scaler2.state_dict() == scaler.state_dict()


def test_missing_parts_and_mismatches_are_named(tmp_path):
    model, optimizer, scheduler, ema = _build()
    path = tmp_path / "model-only.safetensors"
    save_training_state(path, model=model, step=0, epoch=0)
    with pytest.raises(CheckpointError, match=r"model-only\.safetensors.*no optimizer state"):
        load_training_state(path, model=model, optimizer=optimizer)
    with pytest.raises(CheckpointError, match=r"no ema state"):
        load_training_state(path, model=model, ema=ema)
    wrong = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    with pytest.raises(CheckpointError, match=r"(?s)model-only\.safetensors.*shape mismatch 3\.weight"):
        load_training_state(path, model=wrong)
    # nothing is modified when a part is missing
    before = model[0].weight.clone()
    other, optimizer2, _, _ = _build(seed=5)
    with pytest.raises(CheckpointError):
        load_training_state(path, model=other, optimizer=optimizer2)
    assert not torch.equal(other[0].weight, before)
    # a plain model checkpoint is not a training state
    model_ckpt = tmp_path / "weights.safetensors"
    from layoutgen.utils.checkpoint import save_checkpoint_file
    save_checkpoint_file(model_ckpt, model.state_dict(), {"model_class": "X"})
    with pytest.raises(CheckpointError, match=r"weights\.safetensors: not a layoutgen training-state"):
        load_training_state(model_ckpt, model=model)
    with pytest.raises(TypeError, match="extra"):
        save_training_state(tmp_path / "x.safetensors", model=model, step=0, epoch=0, extra={"f": object()})


def test_layoutgen_model_stores_class_and_config(tmp_path):
    from layoutgen.models.encoder import Encoder

    enc = Encoder(latent_channels=4, base_channels=8, norm_groups=4, downsampling_steps=1)
    path = tmp_path / "enc.safetensors"
    save_training_state(path, model=enc, step=5, epoch=2)
    meta = read_training_metadata(path)
    assert meta["model_class"] == "Encoder"
    assert json.loads(meta["config"]) == enc.config
    enc2 = Encoder(enc.config)
    with torch.no_grad():
        for p in enc2.parameters():
            p.zero_()
    assert load_training_state(path, model=enc2)["step"] == 5
    for (k, v), v2 in zip(enc.state_dict().items(), enc2.state_dict().values()):
        assert torch.equal(v, v2), k


def test_tampered_and_truncated_files_are_rejected(tmp_path):
    model, optimizer, scheduler, ema = _build()
    path = tmp_path / "state.safetensors"
    save_training_state(path, **_save_args(model, optimizer, scheduler, ema), step=1, epoch=0)
    data = bytearray(path.read_bytes())
    tampered = tmp_path / "tampered.safetensors"
    data[-5] ^= 0xFF
    tampered.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tampered\.safetensors.*checksum"):
        load_training_state(tampered, **_save_args(*_build()))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors"):
        load_training_state(truncated, **_save_args(*_build()))
    with pytest.raises(CheckpointError, match=r"not found.*nope\.safetensors"):
        load_training_state(tmp_path / "nope.safetensors", model=model)


def _no_temp_files(folder) -> bool:
    return not [n for n in os.listdir(folder) if n.endswith(".tmp")]


@pytest.mark.parametrize("fail_call", [1, 2])
@pytest.mark.parametrize("target", ["replace", "fsync"])
def test_kill_during_save_leaves_previous_latest(tmp_path, monkeypatch, fail_call, target):
    model, optimizer, scheduler, ema = _build()
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=3)
    assert manager.latest() is None and manager.resume(model=model) is None
    _train_step(model, optimizer, scheduler, ema)
    assert manager.save(1, **_save_args(model, optimizer, scheduler, ema))
    good = model[0].weight.clone()
    _train_step(model, optimizer, scheduler, ema)

    real = getattr(os, target)
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(os, target, dying)
    with pytest.raises(KeyboardInterrupt):
        manager.save(2, **_save_args(model, optimizer, scheduler, ema))
    monkeypatch.setattr(os, target, real)

    assert _no_temp_files(manager.folder)
    fresh = _build(seed=4)
    info = load_training_state(manager.latest(), **_save_args(*fresh))
    assert info["step"] == 1
    assert torch.equal(fresh[0][0].weight, good)


def test_stale_temp_files_removed_on_start(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / ".latest.safetensors.0123456789abcdef.tmp").write_bytes(b"partial")
    (folder / "notes.tmp").write_bytes(b"user file")
    CheckpointManager(folder)
    assert sorted(os.listdir(folder)) == ["notes.tmp"]


def test_nan_never_overwrites_a_good_checkpoint(tmp_path):
    model, optimizer, scheduler, ema = _build()
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.save(1, **_save_args(model, optimizer, scheduler, ema), metric=0.5)
    files_before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}

    assert manager.save(2, **_save_args(model, optimizer, scheduler, ema), metric=float("nan")) is False
    with torch.no_grad():
        model[3].bias[0] = float("nan")
    assert manager.save(3, **_save_args(model, optimizer, scheduler, ema), metric=0.1) is False
    with torch.no_grad():
        model[3].bias[0] = float("inf")
    assert manager.save(4, **_save_args(model, optimizer, scheduler, ema)) is False

    files_after = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    assert files_after == files_before
    assert read_training_metadata(manager.latest())["step"] == "1"


def test_best_tracking_and_pruning(tmp_path):
    model, optimizer, scheduler, ema = _build()
    manager = CheckpointManager(tmp_path, keep_last=2)
    metrics = {1: 0.9, 2: 0.3, 3: 0.5, 4: 0.6, 5: 0.4}
    for step, metric in metrics.items():
        _train_step(model, optimizer, scheduler, ema)
        assert manager.save(step, **_save_args(model, optimizer, scheduler, ema), epoch=step // 2, metric=metric)
    assert [s for s, _ in manager.step_files()] == [2, 4, 5]  # last two + the best
    assert read_training_metadata(manager.best())["step"] == "2"
    assert read_training_metadata(manager.latest())["step"] == "5"
    assert manager.best_metric()[:2] == (0.3, 2)

    # a new manager on the same folder carries on from the stored best
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.save(6, **_save_args(model, optimizer, scheduler, ema), metric=0.35)
    assert read_training_metadata(manager.best())["step"] == "2"
    assert manager.save(7, **_save_args(model, optimizer, scheduler, ema), epoch=3, metric=0.1)
    assert read_training_metadata(manager.best())["step"] == "7"
    assert [s for s, _ in manager.step_files()] == [6, 7]

    # mode="max"
    max_manager = CheckpointManager(tmp_path / "max", keep_last=None)
    for step, metric in metrics.items():
        max_manager.save(step, model=model, metric=metric, mode="max")
    assert read_training_metadata(max_manager.best())["step"] == "1"
    assert len(max_manager.step_files()) == 5

    # resume loads latest
    fresh = _build(seed=8)
    info = manager.resume(**_save_args(*fresh))
    assert info["step"] == 7 and info["metric"] == 0.1 and info["epoch"] == 3
    assert torch.equal(fresh[0][0].weight, model[0].weight)


def test_every_only_writes_multiples(tmp_path):
    model = nn.Linear(2, 2)
    manager = CheckpointManager(tmp_path, every=3)
    assert manager.save(2, model=model) is False
    assert manager.latest() is None
    assert manager.save(3, model=model)
    assert manager.save(4, model=model, force=True)
    assert [s for s, _ in manager.step_files()] == [3, 4]
