"""Output heads of the multi-head decoder.

Each head reads one set of features and returns one tensor; the decoder returns a dict keyed by each head's `name`.
Heads are configured as in the seed's YAML: `{type: RGBHead, name: rgb, out_channels: 3}`. The decoder supplies
`in_channels` from the features the head reads (its `source`):
- "decoder": the decoder's final full-resolution features (pixel-wise heads),
- "decoder_mid": the decoder's bottleneck features after its middle block (lowest resolution, most channels),
- "latent": the latent itself.
"""
from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from layoutgen.config import check_typed_config, coerce_value
from layoutgen.kernels import GroupNormSiLU
from layoutgen.models.components.blocks import check_divisible

HEAD_SOURCES = ("decoder", "decoder_mid", "latent")


class Head(nn.Module):
    """Base of the heads: a name and the features it reads."""

    def __init__(self, name: str, source: str) -> None:
        super().__init__()
        if not isinstance(name, str) or not name:
            raise ValueError(f"{type(self).__name__}: name must be a non-empty string, got {name!r}")
        if source not in HEAD_SOURCES:
            raise ValueError(f"{type(self).__name__} '{name}': source must be one of {list(HEAD_SOURCES)}, "
                             f"got {source!r}")
        self.name = name
        self.source = source


class RGBHead(Head):
    """Image reconstruction: a 3x3 conv to `out_channels`, optionally squashed by tanh into [-1, 1].

    [N, in_channels, H, W] -> [N, out_channels, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int = 3, name: str = "rgb", activation: str | None = None,
                 source: str = "decoder") -> None:
        super().__init__(name, source)
        _check_positive(self, "out_channels", out_channels)
        if activation not in (None, "tanh"):
            raise ValueError(f"RGBHead '{name}': activation must be null or 'tanh', got {activation!r}")
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.activation = activation

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.conv(features)
        return torch.tanh(out) if self.activation == "tanh" else out


class SegmentationHead(Head):
    """Per-pixel class logits: 3x3 conv, SiLU, 1x1 conv to `num_classes`.

    [N, in_channels, H, W] -> [N, num_classes, H, W]; train with CrossEntropyLoss against an index map [N, H, W].
    """

    def __init__(self, in_channels: int, num_classes: int, name: str = "segmentation", hidden_channels: int = 0,
                 source: str = "decoder") -> None:
        super().__init__(name, source)
        _check_positive(self, "num_classes", num_classes)
        hidden = hidden_channels or in_channels
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, num_classes, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class ClassificationHead(Head):
    """Per-image class logits: 3x3 conv + GroupNorm+SiLU, global average pooling, dropout, linear.

    [N, in_channels, H, W] -> [N, num_classes]. Reads the decoder's bottleneck features by default.
    """

    def __init__(self, in_channels: int, num_classes: int, name: str = "classification", hidden_channels: int = 128,
                 dropout: float = 0.0, norm_groups: int = 8, source: str = "decoder_mid") -> None:
        super().__init__(name, source)
        _check_positive(self, "num_classes", num_classes)
        _check_positive(self, "hidden_channels", hidden_channels)
        check_divisible(hidden_channels, norm_groups, f"ClassificationHead '{name}' hidden_channels")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ClassificationHead '{name}': dropout must be in [0, 1), got {dropout}")
        self.conv = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.norm = GroupNormSiLU(norm_groups, hidden_channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = self.norm(self.conv(features)).mean(dim=(2, 3))
        return self.fc(self.dropout(pooled))


HEAD_REGISTRY: dict[str, type[Head]] = {
    "RGBHead": RGBHead,
    "SegmentationHead": SegmentationHead,
    "ClassificationHead": ClassificationHead,
}


def _check_positive(head: Head, key: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{type(head).__name__} '{head.name}': {key} must be >= 1, got {value}")


def normalize_head_config(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Checks one head config and fills in its defaults: {type, name, ...every constructor argument}.

    `in_channels` is not part of a head config: the decoder supplies it from the head's source.
    """
    head_cls, given = check_typed_config(config, HEAD_REGISTRY, where, "head", supplied=("in_channels",))
    hints = typing.get_type_hints(head_cls.__init__)
    normalized: dict[str, Any] = {"type": config["type"]}
    for key, param in inspect.signature(head_cls).parameters.items():
        if key == "in_channels":
            continue
        normalized[key] = coerce_value(given[key], hints[key], f"{where}.{key}") if key in given else param.default
    return normalized


def build_head(config: Mapping[str, Any], in_channels: int) -> Head:
    """Builds a head from a normalized config (see normalize_head_config)."""
    kwargs = {k: v for k, v in config.items() if k != "type"}
    return HEAD_REGISTRY[config["type"]](in_channels=in_channels, **kwargs)
