"""The autoencoder experiment config: model, losses, data and training settings in one validated YAML document.

    autoencoder: {encoder: {...}, decoder: {...}}      # layoutgen.models.autoencoder.AutoencoderConfig
    loss: [{type: MSELoss, key: rgb, target: rgb}]       # layoutgen.models.losses.base_loss.build_loss
    data: {num_samples: 512, image_size: 64}            # the built-in synthetic layouts
    training: {epochs: 10, batch_size: 16, lr: 2e-3}
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import yaml

from layoutgen.config import Config, load_yaml, option
from layoutgen.models.autoencoder import AutoencoderConfig
from layoutgen.models.losses.base_loss import build_loss

DEFAULT_LOSS = [{"type": "MSELoss", "key": "rgb", "target": "rgb", "weight": 1.0}]


@dataclass
class SyntheticDataConfig(Config):
    section = "data"

    num_samples: int = option(512, min=2, doc="generated layouts (train + validation)")
    image_size: int = option(64, min=8)
    seed: int = option(0, min=0)
    empty_prob: float = option(0.05, min=0.0, max=1.0, doc="share of empty canvases")
    val_fraction: float = option(0.1, min=0.0, max=0.9)


@dataclass
class TrainingConfig(Config):
    section = "training"

    epochs: int = option(10, min=1)
    max_steps: int | None = option(None, min=1, doc="stop after this many optimizer steps")
    batch_size: int = option(16, min=1)
    lr: float = option(2e-3, min=0.0)
    weight_decay: float = option(0.0, min=0.0)
    warmup_steps: int = option(20, min=0)
    grad_clip: float | None = option(1.0, min=0.0, doc="max gradient norm; null disables clipping")
    amp: str = option("none", choices=("none", "bf16", "fp16"), doc="fp16 needs CUDA (it uses a GradScaler)")
    channels_last: bool = option(False)
    seed: int = option(0, min=0)
    num_workers: int = option(0, min=0)
    device: str = option("auto", doc="auto (CUDA when present), cpu, cuda, cuda:N")
    log_every: int = option(10, min=1)


@dataclass
class AutoencoderExperiment(Config):
    autoencoder: AutoencoderConfig = option(AutoencoderConfig)
    loss: list[dict[str, Any]] = option(DEFAULT_LOSS)
    data: SyntheticDataConfig = option(SyntheticDataConfig)
    training: TrainingConfig = option(TrainingConfig)

    def validate(self, where: str) -> None:
        if not self.loss:
            raise ValueError("loss: at least one loss is needed")
        build_loss(self.loss)  # raises a ValueError naming the bad loss key


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["training.lr=1e-3", "data.image_size=32"]` -> nested dict; values are parsed as YAML scalars."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected key=value, e.g. training.lr=1e-3")
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):  # a later, deeper key replaces an earlier scalar
                node[part] = {}
            node = node[part]
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            problem = " ".join(str(getattr(err, "problem", None) or err).split())
            raise ValueError(f"--set {key}: value {raw!r} is not valid YAML ({problem})") from None
    return result


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merges `overrides` into a copy of `base`."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_experiment(path: str, overrides: list[str] | None = None) -> AutoencoderExperiment:
    """Reads and validates an experiment YAML; `overrides` are `key.path=value` strings."""
    data = merge(load_yaml(path), parse_overrides(overrides or []))
    try:
        return AutoencoderExperiment.from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


EXPERIMENT_SECTIONS = {"autoencoder": "autoencoder", "diffusion": "diffusion", "controlnet_diffusion": "controlnet"}


def experiment_kind(data: dict[str, Any], path: str = "") -> str:
    """"autoencoder", "diffusion" or "controlnet", from the experiment's one model section."""
    where = f"{path}: " if path else ""
    if not isinstance(data, dict):
        raise ValueError(f"{where}expected a mapping of sections, got {type(data).__name__}")
    found = [key for key in EXPERIMENT_SECTIONS if key in data]
    if len(found) != 1:
        what = "no model section" if not found else f"several model sections {found}"
        raise ValueError(f"{where}{what}; an experiment has exactly one of {list(EXPERIMENT_SECTIONS)}")
    return EXPERIMENT_SECTIONS[found[0]]


def load_any_experiment(path: str, overrides: list[str] | None = None) -> tuple[str, Config]:
    """Reads and validates an experiment YAML of any kind: ("autoencoder", AutoencoderExperiment),
    ("diffusion", DiffusionExperiment) or ("controlnet", ControlNetExperiment)."""
    data = merge(load_yaml(path), parse_overrides(overrides or []))
    kind = experiment_kind(data, path)
    if kind == "autoencoder":
        cls = AutoencoderExperiment
    else:
        from layoutgen.training.run import ControlNetExperiment, DiffusionExperiment
        cls = DiffusionExperiment if kind == "diffusion" else ControlNetExperiment
    try:
        return kind, cls.from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
