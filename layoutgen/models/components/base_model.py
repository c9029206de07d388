"""BaseModel: config handling, checkpoints and freezing shared by every layoutgen model.

A model is built from a typed `Config` (see layoutgen.config); `model.config` is that config as a plain dict, which
round-trips through YAML. A checkpoint is one safetensors file holding the weights and that config, so
`Model.from_checkpoint(path)` rebuilds the model from the file alone, without executing any code from it.
"""
from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

import layoutgen
from layoutgen.config import Config
from layoutgen.utils.checkpoint import CheckpointError, load_checkpoint_file, save_checkpoint_file

# Where each model class lives, so `BaseModel.from_checkpoint` can rebuild any of them from the class name stored in
# the file (only these names are accepted: a checkpoint never chooses what code is imported).
_MODEL_MODULES = {
    "Encoder": "layoutgen.models.encoder",
    "Decoder": "layoutgen.models.decoder",
    "Autoencoder": "layoutgen.models.autoencoder",
    "UNet": "layoutgen.models.components.unet",
    "DiffusionModel": "layoutgen.models.diffusion",
    "ControlNet": "layoutgen.models.components.controlnet",
    "ControlNetDiffusion": "layoutgen.models.controlnet_diffusion",
}
_MODEL_CLASSES: dict[str, type[BaseModel]] = {}


@dataclass
class LoadReport:
    """What `load_state(strict=False)` left out."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


class BaseModel(nn.Module):
    """Base class of layoutgen models.

    Subclasses set `config_class` and build their layers in `__init__(config=None, **overrides)` after calling
    `super().__init__(config, **overrides)`, which validates the config and stores it as `self.cfg`.
    """

    config_class: ClassVar[type[Config]]
    # State-dict prefixes left out of checkpoints (e.g. a frozen sub-model saved in its own file).
    checkpoint_exclude: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _MODEL_CLASSES[cls.__name__] = cls

    def __init__(self, config: Mapping[str, Any] | Config | None = None, **overrides: Any) -> None:
        super().__init__()
        if isinstance(config, Config):
            config = config.to_dict()
        merged = dict(config or {})
        merged.update(overrides)
        self.cfg = self.config_class.from_dict(merged)
        self._frozen = False

    # ----------------------------------------------------------------- config
    @property
    def config(self) -> dict[str, Any]:
        """The model's full config (defaults filled in) as a plain dict."""
        return self.cfg.to_dict()

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Config) -> BaseModel:
        """Builds the model from a config dict (e.g. a section of an experiment YAML)."""
        return cls(config)

    # ------------------------------------------------------------- checkpoints
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores: the state dict minus `checkpoint_exclude` prefixes."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.checkpoint_exclude)}

    def save_checkpoint(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
        """Writes weights and config to one safetensors file, atomically (temp file, fsync, rename)."""
        meta = {
            "model_class": type(self).__name__,
            "config": json.dumps(self.config),
            "layoutgen_version": layoutgen.__version__,
        }
        meta.update(metadata or {})
        save_checkpoint_file(path, self.checkpoint_state_dict(), meta)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu",
                        strict: bool = True, config_overrides: Mapping[str, Any] | None = None) -> BaseModel:
        """Rebuilds a model from a file written by `save_checkpoint`.

        Called on BaseModel it builds whichever layoutgen model the file holds; on a subclass, the file must hold
        that class. `config_overrides` replaces top-level config keys that do not change the weights' shapes
        (e.g. the path of a frozen sub-model's checkpoint after moving files).
        """
        tensors, meta = load_checkpoint_file(path)
        name = meta.get("model_class")
        if name is None or "config" not in meta:
            raise CheckpointError(f"{path}: not a layoutgen model checkpoint (no model_class/config metadata); "
                                  f"load plain weights with model.load_state_file()")
        model_cls = _resolve_model_class(name, str(path))
        if cls is not BaseModel and not issubclass(model_cls, cls):
            raise CheckpointError(f"{path}: holds a {name}, not a {cls.__name__}")
        try:
            config = json.loads(meta["config"])
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: the stored config is not valid JSON ({err})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: the stored config must be a JSON object, got {type(config).__name__}")
        config.update(config_overrides or {})
        try:
            model = model_cls.from_config(config)
        except ValueError as err:
            raise CheckpointError(f"{path}: the stored config is invalid: {err}") from None
        model.load_state(tensors, strict=strict, source=str(path))
        return model.to(map_location)

    def load_state_file(self, path: str | os.PathLike, strict: bool = True) -> LoadReport:
        """Loads weights from a checkpoint or a plain state-dict file (.safetensors, or .pt with weights_only)."""
        tensors, _ = load_checkpoint_file(path)
        return self.load_state(tensors, strict=strict, source=str(path))

    def load_state(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                   source: str = "state dict") -> LoadReport:
        """Loads weights, naming every missing, unexpected or mis-shaped key in the error.

        A shape mismatch is always an error. With strict=False, missing and unexpected keys are skipped and
        reported in the returned LoadReport. Tensors under `checkpoint_exclude` (a frozen sub-model) are never
        required, but are loaded when given: the model's own full `state_dict()` loads strictly.
        """
        expected = self.checkpoint_state_dict()
        known = dict(expected)
        if self.checkpoint_exclude:
            known.update((k, v) for k, v in self.state_dict().items() if k.startswith(self.checkpoint_exclude))
        missing = sorted(k for k in expected if k not in state_dict)
        unexpected = sorted(k for k in state_dict if k not in known)
        mismatched = sorted(
            f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(known[k].shape)}"
            for k in state_dict if k in known and state_dict[k].shape != known[k].shape
        )
        problems = [f"shape mismatch {m}" for m in mismatched]
        if strict:
            problems += [f"missing key {k}" for k in missing] + [f"unexpected key {k}" for k in unexpected]
        if problems:
            shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
            raise CheckpointError(f"{source}: cannot load into {type(self).__name__}:\n  {shown}")
        usable = {k: v for k, v in state_dict.items() if k in known}
        self.load_state_dict(usable, strict=False)
        return LoadReport(missing=missing, unexpected=unexpected)

    # -------------------------------------------------------------- freezing
    def freeze(self) -> BaseModel:
        """No gradients, eval mode, and stays in eval mode when a parent module calls .train()."""
        for p in self.parameters():
            p.requires_grad_(False)
        self._set_frozen(True)
        return super().train(False)

    def unfreeze(self) -> BaseModel:
        for p in self.parameters():
            p.requires_grad_(True)
        self._set_frozen(False)
        return self

    def _set_frozen(self, frozen: bool) -> None:
        # Sub-models too: else a sub-model frozen on its own would keep forcing eval mode after unfreeze().
        for module in self.modules():
            if isinstance(module, BaseModel):
                module._frozen = frozen

    @property
    def is_frozen(self) -> bool:
        return self._frozen

    def train(self, mode: bool = True) -> BaseModel:
        # A frozen model keeps dropout off and its norms in inference behaviour whatever its parent does.
        return super().train(False if self._frozen else mode)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What an optimizer should get: the parameters that require gradients (frozen sub-models left out)."""
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def _resolve_model_class(name: str, path: str) -> type[BaseModel]:
    if name not in _MODEL_MODULES and name not in _MODEL_CLASSES:
        raise CheckpointError(f"{path}: unknown model class {name!r}; known: {sorted(_MODEL_MODULES)}")
    if name not in _MODEL_CLASSES:
        importlib.import_module(_MODEL_MODULES[name])
    return _MODEL_CLASSES[name]


def register_model_module(name: str, module: str) -> None:
    """Lets `BaseModel.from_checkpoint` rebuild a model class defined outside this package."""
    _MODEL_MODULES[name] = module
