"""The denoising UNet of the latent diffusion model (Ronneberger et al., 2015; Ho et al., 2020; Rombach et al., 2022).

    x_t [N, in_channels, H, W], t [N] (+ cond [N, cond_channels, H, W], labels [N]) -> [N, out_channels, H, W]

Sinusoidal timestep embedding -> MLP to time_dim, plus an optional class embedding (with a null class for
classifier-free guidance, Ho & Salimans 2022). The down path has `depth` resolution levels of `num_res_blocks`
ResNet blocks (with self-attention at `attention_levels`) and a stride-2 downsample between levels; a middle block
(ResNet, attention, ResNet); the up path mirrors it with num_res_blocks + 1 blocks per level, each reading one skip
connection; the output conv starts at zero so the untrained model predicts zero.

The forward pass is split into `embed`, `encode`, `middle` and `decode` so that a ControlNet can fuse its features
into the skips and the middle block between them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from layoutgen.config import Config, option
from layoutgen.kernels import GroupNormSiLU
from layoutgen.models.components.base_model import BaseModel
from layoutgen.models.components.blocks import (
    DEFAULT_NORM_EPS, TIME_EMBEDDING_NORMS, AttentionBlock, DownsampleBlock, ResNetBlock, UpsampleBlock)
from layoutgen.models.components.codec import describe_tensor


@dataclass
class UNetConfig(Config):
    section = "unet"

    in_channels: int = option(16, min=1, doc="latent channels")
    out_channels: int | None = option(None, min=1, doc="default: in_channels")
    base_channels: int = option(64, min=1, doc="channels of the first level (the seed used 32, 48, 64, 128, 256)")
    depth: int = option(4, min=1, max=6, doc="resolution levels (the seed used 3, 4, 5)")
    num_res_blocks: int = option(2, min=1)
    time_dim: int = option(256, min=2, doc="timestep embedding width")
    cond_channels: int = option(0, min=0, doc="channels of a conditioning map concatenated to the input; 0 = none")
    channel_multipliers: list[int] | None = option(None, min=1, doc="one per level; default 1, 2, 4, 4, 4, 4")
    attention_levels: list[int] | None = option(None, min=0, doc="levels with self-attention; default the two lowest")
    mid_attention: bool = option(True)
    num_heads: int = option(4, min=1)
    dropout: float = option(0.0, min=0.0, max=0.99)
    norm_groups: int = option(8, min=1)
    norm_eps: float = option(DEFAULT_NORM_EPS, min=1e-12)
    time_embedding_norm: str = option("default", choices=TIME_EMBEDDING_NORMS)
    num_classes: int = option(0, min=0, doc="class-conditional with this many classes (+1 null class); 0 = none")
    gradient_checkpointing: bool = option(False, doc="recompute activations in backward to save memory")

    def level_channels(self) -> list[int]:
        multipliers = self.channel_multipliers or [1, 2, 4, 4, 4, 4][: self.depth]
        return [self.base_channels * m for m in multipliers]

    def resolved_attention_levels(self) -> list[int]:
        if self.attention_levels is not None:
            return list(self.attention_levels)
        return [level for level in range(self.depth) if level >= self.depth - 2]

    def validate(self, where: str) -> None:
        prefix = f"{where}." if where else ""
        if self.channel_multipliers is not None and len(self.channel_multipliers) != self.depth:
            raise ValueError(f"{prefix}channel_multipliers: {self.channel_multipliers} has "
                             f"{len(self.channel_multipliers)} entries; depth={self.depth} needs {self.depth}")
        channels = self.level_channels()
        for level, ch in enumerate(channels):
            if ch % self.norm_groups:
                raise ValueError(f"{prefix}norm_groups: {self.norm_groups} does not divide the {ch} channels of "
                                 f"level {level}")
        for level in self.resolved_attention_levels():
            if level >= self.depth:
                raise ValueError(f"{prefix}attention_levels: level {level} does not exist; depth={self.depth} "
                                 f"gives levels 0..{self.depth - 1}")
            if channels[level] % self.num_heads:
                raise ValueError(f"{prefix}num_heads: {self.num_heads} does not divide the {channels[level]} "
                                 f"channels of attention level {level}")
        if self.mid_attention and channels[-1] % self.num_heads:
            raise ValueError(f"{prefix}num_heads: {self.num_heads} does not divide the {channels[-1]} channels of "
                             f"the middle block")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al., 2017): [N] -> [N, dim] float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class UNetLayer(nn.Module):
    """A ResNet block with time injection, optionally followed by self-attention."""

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig, attention: bool) -> None:
        super().__init__()
        self.res = ResNetBlock(in_channels, out_channels, time_dim=cfg.time_dim, dropout=cfg.dropout,
                               norm_groups=cfg.norm_groups, norm_eps=cfg.norm_eps,
                               time_embedding_norm=cfg.time_embedding_norm)
        self.attn = AttentionBlock(out_channels, cfg.num_heads, cfg.norm_groups, cfg.norm_eps, zero_init=True) \
            if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class UNetEncoderPath:
    """The embedding, down path and middle block, shared by the UNet and the ControlNet's trainable copy.

    The class using it has `time_embed`, `class_embed`, `conv_in`, `down` and `mid` built as in UNet.__init__, and
    `unet_config`, the UNetConfig they were built from.
    """

    unet_config: UNetConfig

    @property
    def null_label(self) -> int:
        """The class index meaning "no class" (classifier-free guidance's unconditional branch)."""
        return self.unet_config.num_classes

    # ------------------------------------------------------------------ parts
    def embed(self, t: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Timestep (+ class) embedding [N, time_dim]. `t`: [N] or a scalar; labels [N] or None (= null class)."""
        t = torch.as_tensor(t, device=self.conv_in.weight.device)
        if t.dim() == 0:
            t = t.expand(batch_size or 1)
        elif t.dim() != 1 or (batch_size is not None and t.shape[0] != batch_size):
            raise ValueError(f"{type(self).__name__}: timesteps must be a scalar or [N] with N={batch_size}, "
                             f"got {describe_tensor(t)}")
        emb = self.time_embed(timestep_embedding(t, self.unet_config.base_channels).to(self.conv_in.weight.dtype))
        if self.class_embed is not None:
            if labels is None:
                labels = torch.full((t.shape[0],), self.null_label, device=t.device, dtype=torch.long)
            self._check_labels(labels, t)
            emb = emb + self.class_embed(labels)
        elif labels is not None:
            raise ValueError(f"{type(self).__name__}: labels were given but the UNet has num_classes=0")
        return emb

    def _run(self, layer: nn.Module, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, UNetLayer):
            if self.unet_config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                return checkpoint(layer, x, emb, use_reentrant=False)
            return layer(x, emb)
        return layer(x)

    def encode(self, x: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor | None = None,
               hint: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The down path: (lowest-resolution features, skip features from full resolution down).

        `hint` (a ControlNet's encoded control image) is added to the input conv's output.
        """
        self._check_inputs(x, cond)
        if self.unet_config.cond_channels:
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        h = self.conv_in(x)
        if hint is not None:
            h = h + hint
        skips = [h]
        for layer in self.down:
            h = self._run(layer, h, emb)
            skips.append(h)
        return h, skips

    def middle(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self.mid:
            h = self._run(layer, h, emb)
        return h

    def _check_labels(self, labels: torch.Tensor, t: torch.Tensor) -> None:
        message = (f"{type(self).__name__}: labels must be [N] integer class indices in [0, {self.null_label}] "
                   f"({self.null_label} = null class) for N={t.shape[0]} timesteps")
        if labels.shape != t.shape or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"{message}, got {describe_tensor(labels)} of {labels.dtype}")
        # The value check reads the labels on the host: done on CPU tensors only, so CUDA steps never wait for it
        # and torch.compile sees no data-dependent branch.
        if labels.numel() and labels.device.type == "cpu" and not torch.compiler.is_compiling():
            if labels.min() < 0 or labels.max() > self.null_label:
                raise ValueError(f"{message}, got values {labels.tolist()}")

    def _check_inputs(self, x: torch.Tensor, cond: torch.Tensor | None) -> None:
        cfg = self.unet_config
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"{type(self).__name__}: expected x [N, {cfg.in_channels}, H, W], "
                             f"got {describe_tensor(x)}")
        if cfg.cond_channels:
            expected = (x.shape[0], cfg.cond_channels, *x.shape[2:])
            if cond is None or tuple(cond.shape) != expected:
                raise ValueError(f"{type(self).__name__}: cond_channels={cfg.cond_channels} needs cond of shape "
                                 f"{list(expected)}, "
                                 f"got {describe_tensor(cond) if cond is not None else None}")
        elif cond is not None:
            raise ValueError(f"{type(self).__name__}: cond was given but the UNet has cond_channels=0")


class UNet(UNetEncoderPath, BaseModel):
    config_class = UNetConfig

    def __init__(self, config: dict | UNetConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg: UNetConfig = self.cfg
        channels = cfg.level_channels()
        attention = set(cfg.resolved_attention_levels())
        self.time_embed = nn.Sequential(
            nn.Linear(cfg.base_channels, cfg.time_dim), nn.SiLU(), nn.Linear(cfg.time_dim, cfg.time_dim))
        # The last row is the null class, used for unconditional samples in classifier-free guidance.
        self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.time_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.cond_channels, channels[0], 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels = [channels[0]]
        previous = channels[0]
        for level, ch in enumerate(channels):
            for _ in range(cfg.num_res_blocks):
                self.down.append(UNetLayer(previous, ch, cfg, level in attention))
                previous = ch
                skip_channels.append(ch)
            if level < cfg.depth - 1:
                self.down.append(DownsampleBlock(ch))
                skip_channels.append(ch)
        self.skip_channels = list(skip_channels)

        self.mid = nn.ModuleList([UNetLayer(previous, previous, cfg, cfg.mid_attention),
                                  UNetLayer(previous, previous, cfg, False)])
        self.mid_channels = previous

        self.up = nn.ModuleList()
        for level in reversed(range(cfg.depth)):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(UNetLayer(previous + skip_channels.pop(), channels[level], cfg, level in attention))
                previous = channels[level]
            if level > 0:
                self.up.append(UpsampleBlock(previous))
        self.norm_out = GroupNormSiLU(cfg.norm_groups, previous, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(previous, cfg.out_channels or cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def unet_config(self) -> UNetConfig:
        return self.cfg

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        """The up path, consuming `skips` from the lowest resolution up, then the output conv."""
        skips = list(skips)
        for layer in self.up:
            if isinstance(layer, UpsampleBlock):
                # Match the next skip's size, which is odd where the input size was not a power of two.
                h = layer(h, output_size=tuple(skips[-1].shape[-2:]))
            else:
                h = self._run(layer, torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(self.norm_out(h))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x, cond)
        emb = self.embed(t, labels, batch_size=x.shape[0])
        h, skips = self.encode(x, emb, cond)
        return self.decode(self.middle(h, emb), skips, emb)
