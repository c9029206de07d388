"""The experiment configs: the autoencoder experiment, the data sections and the trainer's settings.

    autoencoder: {encoder: {...}, decoder: {...}}      # layoutgen.models.autoencoder.AutoencoderConfig
    loss: [{type: MSELoss, key: rgb, target: rgb}]       # layoutgen.models.losses.base_loss.build_loss
    data: {num_samples: 512, image_size: 64}            # the built-in synthetic layouts, or
    data: {manifest: data/synth/manifest.csv, loader: dali}   # a manifest (ManifestDataConfig keys + loader)
    training: {epochs: 10, batch_size: 16, lr: 2e-3}   # TrainerConfig

TrainerConfig (layoutgen.training.trainer) extends TrainingConfig (layoutgen.training.autoencoder); neither module
imports this one, so every experiment class can use TrainerConfig.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from layoutgen.config import Config, load_yaml, option
from layoutgen.models.autoencoder import AutoencoderConfig
from layoutgen.models.datasets.datasets import ManifestDataConfig
from layoutgen.models.losses.base_loss import build_loss
from layoutgen.training.autoencoder import TrainingConfig  # noqa: F401  (re-exported: its home used to be here)
from layoutgen.training.trainer import TrainerConfig

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
class ManifestExperimentData(ManifestDataConfig):
    """An experiment's manifest data section: ManifestDataConfig plus which loader reads the training batches."""
    section = "data"

    loader: str = option("torch", choices=("torch", "dali"),
                         doc="training batches from a torch DataLoader or NVIDIA DALI (validation: always torch)")
    dali_threads: int = option(2, min=1, doc="DALI CPU threads (loader: dali)")


def check_data(data: Any) -> SyntheticDataConfig | ManifestExperimentData:
    """The data section: a ManifestExperimentData when it names a manifest, else a SyntheticDataConfig."""
    if isinstance(data, (SyntheticDataConfig, ManifestExperimentData)):
        return data
    if isinstance(data, Mapping) and "manifest" in data:
        # "all" is the field's default, which a saved config.yaml carries; any other split is the loaders' to set
        if data.get("split", "all") != "all":
            raise ValueError("data.split: set per loader (train/val); leave this key out")
        return ManifestExperimentData.from_dict(data, where="data")
    return SyntheticDataConfig.from_dict(data, where="data")


@dataclass
class AutoencoderExperiment(Config):
    autoencoder: AutoencoderConfig = option(AutoencoderConfig)
    loss: list[dict[str, Any]] = option(DEFAULT_LOSS)
    data: SyntheticDataConfig | ManifestExperimentData = option(SyntheticDataConfig)
    training: TrainerConfig = option(TrainerConfig)

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> AutoencoderExperiment:
        # The data section is one of two configs; choosing it here (by the manifest key) keeps the error messages
        # of the chosen one ("data.image_sise: unknown key") instead of a union's vague "invalid value".
        if isinstance(data, Mapping) and not isinstance(data, Config) and "data" in data:
            data = {**data, "data": check_data(data["data"])}
        return super().from_dict(data, where)

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
