"""Decoder: reconstructs images (and more) from a latent, through several output heads.

The trunk mirrors the encoder: conv_in -> middle block -> per level, from the lowest resolution up: ResNet blocks,
then a 2x nearest upsample + conv (except at full resolution) -> GroupNorm+SiLU. Each head then reads the trunk's
final features, its bottleneck features, or the latent (see components/heads.py).

z: [N, latent_channels, h, w] -> {head name: head output}, e.g. {"rgb": [N, 3, h*2^s, w*2^s]}.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layoutgen.config import option
from layoutgen.kernels import GroupNormSiLU
from layoutgen.models.components.base_model import BaseModel
from layoutgen.models.components.blocks import ResNetBlock, UpsampleBlock
from layoutgen.models.components.codec import CodecConfig, MiddleBlock, describe_tensor
from layoutgen.models.components.heads import build_head, normalize_head_config

# Stored with every default filled in, as validation stores a head config: a default DecoderConfig then equals its
# own to_dict -> YAML -> from_dict round trip.
DEFAULT_HEADS = [normalize_head_config({"type": "RGBHead", "name": "rgb", "out_channels": 3}, "decoder.heads[0]")]


@dataclass
class DecoderConfig(CodecConfig):
    section = "decoder"

    upsampling_steps: int = option(4, min=0, max=8, doc="each doubles H and W")
    heads: list[dict[str, Any]] = option(DEFAULT_HEADS, doc="output head configs: {type, name, ...}")

    def validate(self, where: str) -> None:
        self.validate_levels(where, self.upsampling_steps, "upsampling_steps")
        if not self.heads:
            raise ValueError(f"{where}.heads: at least one head is needed")
        self.heads = [normalize_head_config(h, f"{where}.heads[{i}]") for i, h in enumerate(self.heads)]
        names = [h["name"] for h in self.heads]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"{where}.heads[{i}].name: duplicate head name {name!r}; every head needs its own")


class Decoder(BaseModel):
    config_class = DecoderConfig

    def __init__(self, config: dict | DecoderConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg: DecoderConfig = self.cfg
        channels = cfg.level_channels(cfg.upsampling_steps)
        block = dict(dropout=cfg.dropout, norm_groups=cfg.norm_groups, norm_eps=cfg.norm_eps)
        top = channels[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, top, 3, padding=1)
        self.mid = MiddleBlock(top, cfg)
        self.levels = nn.ModuleList()
        previous = top
        for level in reversed(range(len(channels))):
            layers = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                layers.append(ResNetBlock(previous, channels[level], **block))
                previous = channels[level]
            if level > 0:
                layers.append(UpsampleBlock(previous))
            self.levels.append(layers)
        self.norm_out = GroupNormSiLU(cfg.norm_groups, previous, eps=cfg.norm_eps)
        source_channels = {"decoder": previous, "decoder_mid": top, "latent": cfg.latent_channels}
        self.heads = nn.ModuleDict(
            {h["name"]: build_head(h, source_channels[h["source"]]) for h in cfg.heads})

    @property
    def head_names(self) -> list[str]:
        return list(self.heads.keys())

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"Decoder: expected a latent [N, {self.cfg.latent_channels}, h, w], "
                             f"got {describe_tensor(z)}")
        features = {"latent": z}
        h = self.mid(self.conv_in(z))
        features["decoder_mid"] = h
        for layers in self.levels:
            for layer in layers:
                h = layer(h)
        features["decoder"] = self.norm_out(h)
        return {name: head(features[head.source]) for name, head in self.heads.items()}
