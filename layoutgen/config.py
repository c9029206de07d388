"""Typed, validated configs.

Every model's hyper-parameters live in a dataclass deriving from `Config`: typed, defaulted, documented, and
round-tripping through plain dicts (and so YAML and checkpoints). Reading a dict checks it key by key, so a typo or a
bad value fails at construction with a ValueError that names the key, the value and what is allowed, instead of
surfacing later as a shape error deep inside a forward pass.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import yaml

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, choices: typing.Sequence[Any] | None = None,
           min: float | None = None, max: float | None = None, doc: str = "") -> Any:
    """A config field with its constraints (checked by `Config.from_dict`).

    Mutable defaults (lists, dicts) are copied per instance; a Config class as default builds its defaults. Leaving
    out `default` makes the key required.
    """
    metadata = {"choices": tuple(choices) if choices is not None else None, "min": min, "max": max, "doc": doc}
    if isinstance(default, type) and issubclass(default, Config):
        return dataclasses.field(default_factory=default, metadata=metadata)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: _copy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


class Config:
    """Base of the dataclass configs. Subclasses are `@dataclasses.dataclass` and may override `validate`."""

    # The name used in error messages when no path is given (e.g. "encoder").
    section: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | Config | None, where: str | None = None) -> Config:
        """Builds a config from a mapping, checking every key; `where` prefixes key names in errors."""
        where = cls.section if where is None else where
        if isinstance(data, cls):
            return data
        if data is None:
            data = {}
        if isinstance(data, Config):
            data = data.to_dict()
        if not isinstance(data, Mapping):
            raise ValueError(f"{where or cls.__name__}: expected a mapping of keys to values, "
                             f"got {type(data).__name__} ({data!r})")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in fields:
                raise ValueError(f"{_join(where, str(key))}: unknown key; valid keys are {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, f in fields.items():
            path = _join(where, name)
            if name not in data:
                if f.default is _MISSING and f.default_factory is _MISSING:
                    raise ValueError(f"{path}: missing required key")
                continue
            value = coerce_value(data[name], hints[name], path)
            _check_constraints(value, f.metadata, path)
            kwargs[name] = value
        config = cls(**kwargs)
        config.validate(where)
        return config

    def validate(self, where: str) -> None:
        """Cross-field checks; raise ValueError naming the key(s) at fault."""

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (lists, dicts, scalars only) that `from_dict` turns back into an equal config."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> Config:
        """A validated copy with some keys changed."""
        data = self.to_dict()
        data.update(changes)
        return type(self).from_dict(data)


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def coerce_value(value: Any, hint: Any, path: str) -> Any:
    """Checks `value` against a type hint and converts where it is lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(value, arg, path)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"{path}: invalid value {_describe(value)}")
    if isinstance(hint, type) and issubclass(hint, Config):
        return hint.from_dict(value, where=path)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{path}: expected true or false, got {_describe(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{path}: expected an integer, got {_describe(value)}")
    if hint is float:
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept it since that is what people write.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{path}: expected a number, got {_describe(value)}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int too large for a float
                number = math.inf
            if not math.isfinite(number):
                raise ValueError(f"{path}: expected a finite number, got {value!r}")
            return number
        raise ValueError(f"{path}: expected a number, got {_describe(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{path}: expected a string, got {_describe(value)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}: expected a list, got {_describe(value)}")
        item_hint = args[0] if args else Any
        items = [coerce_value(v, item_hint, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{path}: expected a mapping, got {_describe(value)}")
        return dict(value)
    raise TypeError(f"{path}: unsupported config type {hint!r}")


def _check_constraints(value: Any, metadata: Mapping[str, Any], path: str) -> None:
    choices = metadata.get("choices")
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if item is None:
            continue
        if choices is not None and item not in choices:
            raise ValueError(f"{path}: invalid value {item!r}; choose one of {list(choices)}")
        low, high = metadata.get("min"), metadata.get("max")
        if low is not None and item < low:
            raise ValueError(f"{path}: invalid value {item!r}; must be >= {low}")
        if high is not None and item > high:
            raise ValueError(f"{path}: invalid value {item!r}; must be <= {high}")


def load_yaml(path: str) -> dict[str, Any]:
    """Reads a YAML config file; errors name the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def check_typed_config(config: Any, registry: Mapping[str, type], where: str, kind: str,
                       supplied: tuple[str, ...] = ()) -> tuple[type, dict[str, Any]]:
    """Checks a `{type: Name, **constructor arguments}` config against a registry of classes.

    Returns (the class, its keyword arguments). A missing or unknown type, an unknown key or a missing required
    argument raises a ValueError naming it and listing what is valid. `supplied` names constructor arguments the
    caller provides itself (they are neither required nor allowed in the config).
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{where}: a {kind} config must be a mapping with a 'type', got {config!r}")
    valid_types = list(registry)
    name = config.get("type")
    if name not in registry:
        problem = "has no 'type'" if "type" not in config else f"unknown {kind} type {name!r}"
        raise ValueError(f"{where}.type: {problem}; valid types: {valid_types}")
    cls = registry[name]
    params = {n: p for n, p in inspect.signature(cls).parameters.items()
              if n not in supplied and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    valid_keys = ["type", *params]
    kwargs = {k: v for k, v in config.items() if k != "type"}
    for key in kwargs:
        if key not in params:
            raise ValueError(f"{where}.{key}: unknown key for {name}; valid keys: {valid_keys}")
    for key, param in params.items():
        if param.default is param.empty and key not in kwargs:
            raise ValueError(f"{where}.{key}: missing required key for {name}; valid keys: {valid_keys}")
    return cls, kwargs
