"""Training-state checkpoints: everything a run needs to resume exactly, in one safetensors file.

`save_training_state` writes ONE file, atomically (temp file, fsync, rename: a crash or Ctrl-C never leaves a
half-written file in place of a good one), through `layoutgen.utils.checkpoint.save_checkpoint_file`, which adds the
checksums that `load_training_state` verifies. Nothing in the file is pickled, so loading never executes code.

Tensors (safetensors):
    model.<key>                       the model's state (`checkpoint_state_dict()` for a layoutgen BaseModel)
    optimizer.state.<index>.<name>    the optimizer's per-parameter state (exp_avg, exp_avg_sq, step, ...)
    ema.shadow.<name>                 the EMA's float32 shadows
    rng.torch_cpu, rng.cuda.<device>  torch RNG states (uint8); rng.numpy.keys (numpy's MT19937 key, as uint8)
    <part>.<path>                     any other tensor inside a state dict (e.g. a tensor learning rate)
Metadata (JSON strings): the optimizer's param_groups and other non-tensor state, the LR scheduler's and the grad
scaler's state dicts, the EMA's counters, numpy's and Python's `random` state, step, epoch, `extra` (user JSON, e.g.
the sampler position), the metric, and the model class + config for a layoutgen model.

`CheckpointManager` keeps `step-<N>.safetensors` files (the last `keep_last`, and the best), `latest.safetensors` and
`best.safetensors`, and refuses to write a checkpoint whose metric or weights are not finite.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import random
import re
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

import layoutgen
from layoutgen.training.ema import EMA
from layoutgen.utils.atomic import atomic_link
from layoutgen.utils.checkpoint import (
    CHECKSUM_KEY,
    CheckpointError,
    load_checkpoint_file,
    read_safetensors_metadata,
    save_checkpoint_file,
)

__all__ = [
    "CheckpointManager",
    "TRAINING_STATE_KIND",
    "load_training_state",
    "read_training_metadata",
    "save_training_state",
]

logger = logging.getLogger(__name__)

TRAINING_STATE_KIND = "layoutgen.training_state"
TRAINING_STATE_VERSION = "1"
_PARTS = ("model", "optimizer", "lr_scheduler", "scaler", "ema", "rng")


# --------------------------------------------------------------------------- JSON encoding of state dicts
# State dicts hold tensors, tuples, dicts with int keys and Counters, which plain JSON cannot tell apart from lists
# and string-keyed dicts. They are encoded with tags; tensors go to the safetensors part under their path.

def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach()
        return {"__tensor__": path}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, collections.Counter):
        return {"__counter__": [[_encode(k, f"{path}.{k}", tensors), v] for k, v in obj.items()]}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, f"{path}.{k}", tensors), _encode(v, f"{path}.{k}", tensors)]
                             for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    raise TypeError(f"cannot store {path} in a checkpoint: a {type(obj).__name__} is not a tensor or JSON value "
                    f"(only tensors, numbers, strings, None, lists, tuples and dicts can be saved without pickle)")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, value), = obj.items()
        if tag == "__tensor__":
            if value not in tensors:
                raise CheckpointError(f"{where}: tensor {value!r} is referenced in the metadata but not in the file")
            return tensors[value]
        if tag == "__tuple__":
            return tuple(_decode(v, tensors, where) for v in value)
        if tag == "__counter__":
            return collections.Counter({_decode(k, tensors, where): v for k, v in value})
        if tag == "__dict__":
            return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in value}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def _dump_part(name: str, state: Any, tensors: dict[str, torch.Tensor]) -> str:
    return json.dumps(_encode(state, name, tensors))


def _load_json(meta: Mapping[str, str], key: str, path: str) -> Any:
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON ({err})") from None


# --------------------------------------------------------------------------- RNG states

def _rng_state(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    cuda_count = 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states = torch.cuda.get_rng_state_all()
        cuda_count = len(states)
        for i, state in enumerate(states):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy.keys"] = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.uint32).view(np.uint8).copy())
    version, internal, gauss_next = random.getstate()
    return {
        "cuda_devices": cuda_count,
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }


def _restore_rng(info: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], path: str) -> None:
    for key in ("rng.torch_cpu", "rng.numpy.keys"):
        if key not in tensors:
            raise CheckpointError(f"{path}: RNG state tensor {key!r} missing")
    torch.set_rng_state(tensors["rng.torch_cpu"].to(torch.uint8))
    count = int(info.get("cuda_devices", 0))
    if count:
        if torch.cuda.is_available():
            states = [tensors[f"rng.cuda.{i}"] for i in range(count) if f"rng.cuda.{i}" in tensors]
            n = min(len(states), torch.cuda.device_count())
            if n < count or n < torch.cuda.device_count():
                logger.warning("%s: RNG states saved for %d CUDA devices, %d present; restoring %d",
                               path, count, torch.cuda.device_count(), n)
            for i in range(n):
                torch.cuda.set_rng_state(states[i], i)
        else:
            logger.warning("%s: the file holds CUDA RNG states but CUDA is not available; not restored", path)
    np_info = info["numpy"]
    keys = tensors["rng.numpy.keys"].numpy().view(np.uint32).copy()
    np.random.set_state((np_info["kind"], keys, np_info["pos"], np_info["has_gauss"], np_info["cached_gaussian"]))
    py = info["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


# --------------------------------------------------------------------------- model state

def _is_layoutgen_model(model: nn.Module) -> bool:
    from layoutgen.models.components.base_model import BaseModel
    return isinstance(model, BaseModel)


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    if _is_layoutgen_model(model):
        return model.checkpoint_state_dict()
    return model.state_dict()


def _load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    if _is_layoutgen_model(model):
        model.load_state(state, strict=True, source=path)
        return
    expected = model.state_dict()
    problems = [f"missing key {k}" for k in expected if k not in state]
    problems += [f"unexpected key {k}" for k in state if k not in expected]
    problems += [f"shape mismatch {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"{path}: cannot load the model state into {type(model).__name__}:\n  {shown}")
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- save / load

def save_training_state(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                        lr_scheduler: Any = None, scaler: Any = None, ema: EMA | None = None, step: int,
                        epoch: int, extra: Mapping[str, Any] | None = None, metric: float | None = None,
                        metric_mode: str | None = None, save_rng: bool = True) -> None:
    """Writes the whole training state to one safetensors file, atomically (see the module docstring)."""
    path = os.fspath(path)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {
        "kind": TRAINING_STATE_KIND,
        "training_state_version": TRAINING_STATE_VERSION,
        "layoutgen_version": layoutgen.__version__,
        "step": str(int(step)),
        "epoch": str(int(epoch)),
    }
    parts = ["model"]
    for key, tensor in _model_state(model).items():
        tensors[f"model.{key}"] = tensor
    meta["model_type"] = type(model).__name__
    if _is_layoutgen_model(model):
        meta["model_class"] = type(model).__name__
        meta["config"] = json.dumps(model.config)
    for name, part in (("optimizer", optimizer), ("lr_scheduler", lr_scheduler), ("scaler", scaler), ("ema", ema)):
        if part is not None:
            meta[name] = _dump_part(name, part.state_dict(), tensors)
            parts.append(name)
    if save_rng:
        meta["rng"] = json.dumps(_rng_state(tensors))
        parts.append("rng")
    if extra is not None:
        try:
            meta["extra"] = json.dumps(dict(extra) if isinstance(extra, Mapping) else extra)
        except (TypeError, ValueError) as err:
            raise TypeError(f"save_training_state: `extra` must be JSON-serialisable: {err}") from None
    if metric is not None:
        meta["metric"] = json.dumps(float(metric))
        if metric_mode is not None:
            meta["metric_mode"] = metric_mode
    meta["parts"] = json.dumps(parts)
    save_checkpoint_file(path, tensors, meta)


def read_training_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a training-state file, reading only its header (no tensors, no checksum check)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            head += fh.read(min(n, 100 * 1024 * 1024))
    return read_safetensors_metadata(head, path)


def load_training_state(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                        lr_scheduler: Any = None, scaler: Any = None, ema: EMA | None = None,
                        restore_rng: bool = True, map_location: str | torch.device | None = None) -> dict[str, Any]:
    """Restores what `save_training_state` wrote into the given objects; returns {"step", "epoch", "extra",
    "metric"}.

    Every part passed must be in the file (CheckpointError naming the file and the part otherwise); all of them are
    checked before anything is modified. The model's tensors are copied into its existing parameters (keeping their
    device); optimizer state follows its parameters' devices.
    """
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"{path}: training-state checkpoints are .safetensors files")
    tensors, meta = load_checkpoint_file(path)
    if meta.get("kind") != TRAINING_STATE_KIND:
        hint = (" (it looks like a model checkpoint: load it with Model.from_checkpoint)"
                if "model_class" in meta else "")
        raise CheckpointError(f"{path}: not a layoutgen training-state checkpoint{hint}")
    if CHECKSUM_KEY not in meta:
        raise CheckpointError(f"{path}: no {CHECKSUM_KEY} in the metadata: the file cannot be verified")
    parts = set(_load_json(meta, "parts", path)) if "parts" in meta else set()
    wanted = {"optimizer": optimizer, "lr_scheduler": lr_scheduler, "scaler": scaler, "ema": ema}
    for name, obj in wanted.items():
        if obj is not None and (name not in parts or name not in meta):
            raise CheckpointError(f"{path}: the file has no {name} state, but a {name} was passed to "
                                  f"load_training_state (saved parts: {sorted(parts)})")
    if restore_rng and ("rng" not in parts or "rng" not in meta):
        raise CheckpointError(f"{path}: the file has no RNG state; pass restore_rng=False to load it anyway")

    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if map_location is not None:
        model_state = {k: v.to(map_location) for k, v in model_state.items()}
    decoded = {name: _decode(_load_json(meta, name, path), tensors, f"{path} ({name})")
               for name, obj in wanted.items() if obj is not None}

    _load_model_state(model, model_state, path)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(decoded["optimizer"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{path}: cannot load the optimizer state into {type(optimizer).__name__}: "
                                  f"{err}") from None
    if lr_scheduler is not None:
        try:
            lr_scheduler.load_state_dict(decoded["lr_scheduler"])
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: cannot load the lr_scheduler state: {err}") from None
    if scaler is not None:
        try:
            scaler.load_state_dict(decoded["scaler"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{path}: cannot load the scaler state: {err}") from None
    if ema is not None:
        try:
            ema.load_state_dict(decoded["ema"])
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None
    if restore_rng:
        _restore_rng(_load_json(meta, "rng", path), tensors, path)
    return _summary(meta, path)


def _summary(meta: Mapping[str, str], path: str) -> dict[str, Any]:
    extra = _load_json(meta, "extra", path) if "extra" in meta else None
    return {
        "step": int(meta.get("step", 0)),
        "epoch": int(meta.get("epoch", 0)),
        "extra": extra,
        "metric": _load_json(meta, "metric", path) if "metric" in meta else None,
    }


# --------------------------------------------------------------------------- manager

_STEP_FILE = re.compile(r"^step-(\d+)\.safetensors$")
_TEMP_FILE = re.compile(r"^\.(?:step-\d+|latest|best)\.safetensors\.[0-9a-f]{16}\.tmp$")


def _all_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first non-finite floating-point tensor, or None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() or tensor.is_complex():
            if not bool(torch.isfinite(tensor).all()):
                return name
    return None


class CheckpointManager:
    """Rolling training checkpoints in `folder`: step-<N>.safetensors, latest.safetensors and best.safetensors.

    Args:
        keep_last: how many step files to keep (older ones are deleted, never the best one's); None keeps all.
        every: when set, `save` writes only at steps that are multiples of it (or with force=True).
    """

    def __init__(self, folder: str | os.PathLike, keep_last: int | None = 3, every: int | None = None) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        if every is not None and every < 1:
            raise ValueError(f"every must be >= 1 or None, got {every}")
        self.folder = os.fspath(folder)
        self.keep_last = keep_last
        self.every = every
        os.makedirs(self.folder, exist_ok=True)
        self._remove_stale_temp_files()

    # paths
    def step_path(self, step: int) -> str:
        return os.path.join(self.folder, f"step-{int(step)}.safetensors")

    @property
    def latest_path(self) -> str:
        return os.path.join(self.folder, "latest.safetensors")

    @property
    def best_path(self) -> str:
        return os.path.join(self.folder, "best.safetensors")

    def latest(self) -> str | None:
        return self.latest_path if os.path.isfile(self.latest_path) else None

    def best(self) -> str | None:
        return self.best_path if os.path.isfile(self.best_path) else None

    def step_files(self) -> list[tuple[int, str]]:
        """(step, path) of the step files present, oldest first."""
        found = []
        for name in os.listdir(self.folder):
            m = _STEP_FILE.match(name)
            if m:
                found.append((int(m.group(1)), os.path.join(self.folder, name)))
        return sorted(found)

    def best_metric(self) -> tuple[float | None, int | None, str | None]:
        """(metric, step, mode) recorded in best.safetensors, or Nones."""
        if self.best() is None:
            return None, None, None
        try:
            meta = read_training_metadata(self.best_path)
            metric = json.loads(meta["metric"]) if "metric" in meta else None
            return metric, int(meta.get("step", -1)), meta.get("metric_mode")
        except (CheckpointError, ValueError, KeyError):
            return None, None, None

    def should_save(self, step: int) -> bool:
        return self.every is None or int(step) % self.every == 0

    # saving
    def save(self, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             lr_scheduler: Any = None, scaler: Any = None, ema: EMA | None = None, epoch: int = 0,
             extra: Mapping[str, Any] | None = None, metric: float | None = None, mode: str = "min",
             force: bool = False) -> bool:
        """Writes step-<step>, then updates latest (and best when `metric` improves on it); prunes old step files.

        Returns False, writing nothing, when the step is not a multiple of `every` (unless force=True) or when the
        metric or any model/EMA weight is not finite: a NaN never overwrites a good checkpoint.
        """
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not force and not self.should_save(step):
            return False
        if metric is not None and not math.isfinite(float(metric)):
            logger.warning("checkpoint at step %d not written: the metric is %s", step, metric)
            return False
        bad = _all_finite(_model_state(model))
        if bad is None and ema is not None:
            bad = _all_finite(ema.shadow)
            bad = f"EMA {bad}" if bad else None
        if bad is not None:
            logger.warning("checkpoint at step %d not written: %s holds non-finite values", step, bad)
            return False

        best_metric, best_step, best_mode = self.best_metric()
        improved = metric is not None and (
            best_metric is None or best_mode not in (None, mode)
            or (float(metric) < best_metric if mode == "min" else float(metric) > best_metric))
        path = self.step_path(step)
        save_training_state(path, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler,
                            ema=ema, step=step, epoch=epoch, extra=extra, metric=metric, metric_mode=mode)
        atomic_link(path, self.latest_path)
        if improved:
            atomic_link(path, self.best_path)
            best_step = int(step)
        self._prune(keep=best_step)
        return True

    def _prune(self, keep: int | None) -> None:
        if self.keep_last is None:
            return
        files = self.step_files()
        for step, path in files[:-self.keep_last]:
            if step == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _remove_stale_temp_files(self) -> None:
        """Temp files left by a process killed mid-write (SIGKILL skips the cleanup)."""
        for name in os.listdir(self.folder):
            if _TEMP_FILE.match(name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.folder, name))

    # loading
    def resume(self, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, lr_scheduler: Any = None,
               scaler: Any = None, ema: EMA | None = None, restore_rng: bool = True) -> dict[str, Any] | None:
        """Loads latest.safetensors into the given objects; None when there is no checkpoint yet."""
        latest = self.latest()
        if latest is None:
            return None
        return load_training_state(latest, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                   scaler=scaler, ema=ema, restore_rng=restore_rng)
