"""What the encoder and the decoder share: config fields, the channels of each resolution level, the middle block."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layoutgen.config import Config, option
from layoutgen.models.components.blocks import DEFAULT_NORM_EPS, AttentionBlock, ResNetBlock


@dataclass
class CodecConfig(Config):
    """Hyper-parameters common to Encoder and Decoder (which mirror each other)."""

    latent_channels: int = option(16, min=1, doc="channels of the latent")
    base_channels: int = option(32, min=1, doc="channels of the full-resolution level")
    norm_groups: int = option(8, min=1, doc="GroupNorm groups; every level's channels must be divisible by it")
    channel_multipliers: list[int] | None = option(
        None, min=1, doc="one per resolution level (steps + 1 entries); default 1, 2, 4, 4, ...")
    num_res_blocks: int = option(1, min=1, doc="ResNet blocks per level")
    dropout: float = option(0.0, min=0.0, max=0.99)
    mid_attention: bool = option(False, doc="self-attention in the middle block (lowest resolution)")
    attention_heads: int = option(1, min=1)
    norm_eps: float = option(DEFAULT_NORM_EPS, min=1e-12)

    def level_channels(self, steps: int) -> list[int]:
        """Channels at each of the steps + 1 resolution levels, from full resolution down."""
        multipliers = self.channel_multipliers or [min(2 ** i, 4) for i in range(steps + 1)]
        return [self.base_channels * m for m in multipliers]

    def validate_levels(self, where: str, steps: int, steps_key: str) -> None:
        if self.channel_multipliers is not None and len(self.channel_multipliers) != steps + 1:
            raise ValueError(f"{where}.channel_multipliers: {self.channel_multipliers} has "
                             f"{len(self.channel_multipliers)} entries; {steps_key}={steps} needs {steps + 1} "
                             f"(one per resolution level)")
        for level, channels in enumerate(self.level_channels(steps)):
            if channels % self.norm_groups:
                raise ValueError(f"{where}.norm_groups: {self.norm_groups} does not divide the {channels} channels "
                                 f"of level {level} (base_channels * channel_multipliers[{level}])")
        top = self.level_channels(steps)[-1]
        if self.mid_attention and top % self.attention_heads:
            raise ValueError(f"{where}.attention_heads: {self.attention_heads} does not divide the {top} channels "
                             f"of the middle block")


def describe_tensor(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"


class MiddleBlock(nn.Module):
    """ResNet block, optional self-attention, ResNet block, at the lowest resolution."""

    def __init__(self, channels: int, cfg: CodecConfig) -> None:
        super().__init__()
        block = dict(dropout=cfg.dropout, norm_groups=cfg.norm_groups, norm_eps=cfg.norm_eps)
        self.res1 = ResNetBlock(channels, channels, **block)
        self.attn = AttentionBlock(channels, cfg.attention_heads, cfg.norm_groups, cfg.norm_eps) \
            if cfg.mid_attention else nn.Identity()
        self.res2 = ResNetBlock(channels, channels, **block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))
