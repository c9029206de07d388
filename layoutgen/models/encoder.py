"""Encoder: compresses an image to a latent (deterministic) or to a diagonal Gaussian over latents (VAE).

conv_in -> per level: ResNet blocks, then a stride-2 downsample (except at the last level) -> middle block
(ResNet, optional self-attention, ResNet) -> GroupNorm+SiLU -> conv_out. With `variational`, conv_out gives twice
the latent channels, split into mu and logvar (Kingma & Welling, 2014); logvar is clamped to [-30, 20] as in
CompVis latent-diffusion, so exp(logvar) can neither underflow to 0 nor overflow in half precision.

x: [N, in_channels, H, W] -> {"latent": [N, latent_channels, H/2^s, W/2^s]} or {"mu": ..., "logvar": ...}
(s = downsampling_steps).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layoutgen.config import option
from layoutgen.kernels import GroupNormSiLU
from layoutgen.models.components.base_model import BaseModel
from layoutgen.models.components.blocks import DownsampleBlock, ResNetBlock
from layoutgen.models.components.codec import CodecConfig, MiddleBlock, describe_tensor

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass
class EncoderConfig(CodecConfig):
    section = "encoder"

    in_channels: int = option(3, min=1, doc="image channels (3 for RGB)")
    downsampling_steps: int = option(4, min=0, max=8, doc="each halves H and W")
    variational: bool = option(False, doc="output mu and logvar (a VAE) instead of a latent")

    def validate(self, where: str) -> None:
        self.validate_levels(where, self.downsampling_steps, "downsampling_steps")


class Encoder(BaseModel):
    config_class = EncoderConfig

    def __init__(self, config: dict | EncoderConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg: EncoderConfig = self.cfg
        channels = cfg.level_channels(cfg.downsampling_steps)
        block = dict(dropout=cfg.dropout, norm_groups=cfg.norm_groups, norm_eps=cfg.norm_eps)
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.levels = nn.ModuleList()
        previous = channels[0]
        for level, ch in enumerate(channels):
            layers = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                layers.append(ResNetBlock(previous, ch, **block))
                previous = ch
            if level < cfg.downsampling_steps:
                layers.append(DownsampleBlock(ch))
            self.levels.append(layers)
        self.mid = MiddleBlock(previous, cfg)
        self.norm_out = GroupNormSiLU(cfg.norm_groups, previous, eps=cfg.norm_eps)
        out = cfg.latent_channels * (2 if cfg.variational else 1)
        self.conv_out = nn.Conv2d(previous, out, 3, padding=1)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** self.cfg.downsampling_steps

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"Encoder: expected input [N, {self.cfg.in_channels}, H, W], got {describe_tensor(x)}")
        h = self.conv_in(x)
        for layers in self.levels:
            for layer in layers:
                h = layer(h)
        h = self.conv_out(self.norm_out(self.mid(h)))
        if not self.cfg.variational:
            return {"latent": h}
        mu, logvar = h.chunk(2, dim=1)
        return {"mu": mu, "logvar": logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)}
