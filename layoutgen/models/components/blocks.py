"""Building blocks shared by the autoencoder, the UNet and the ControlNet.

GroupNorm+SiLU and attention go through `layoutgen.kernels`, so switching them to the fused GPU kernels changes no
model code. The block layouts follow CompVis latent-diffusion / diffusers (pre-activation residual blocks, He et al.
2016; spatial self-attention with a residual connection).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layoutgen.kernels import GroupNormSiLU, attention

# latent-diffusion's GroupNorm epsilon.
DEFAULT_NORM_EPS = 1e-6
TIME_EMBEDDING_NORMS = ("default", "scale_shift")


def check_divisible(channels: int, norm_groups: int, where: str) -> None:
    if norm_groups <= 0 or channels % norm_groups != 0:
        raise ValueError(f"{where}: {channels} channels are not divisible by norm_groups={norm_groups}")


class ResNetBlock(nn.Module):
    """GroupNorm+SiLU -> conv3x3 -> (+ time embedding) -> GroupNorm+SiLU -> dropout -> conv3x3, plus a skip.

    The skip is a 1x1 conv when the channel count changes. With `time_dim`, a time (or class) embedding of shape
    [N, time_dim] is injected after the first conv: added per channel ("default") or as a scale and shift of the
    second norm's output ("scale_shift", Nichol & Dhariwal 2021).
    x: [N, in_channels, H, W] -> [N, out_channels, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, time_dim: int | None = None,
                 dropout: float = 0.0, norm_groups: int = 8, norm_eps: float = DEFAULT_NORM_EPS,
                 time_embedding_norm: str = "default") -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        check_divisible(in_channels, norm_groups, "ResNetBlock in_channels")
        check_divisible(out_channels, norm_groups, "ResNetBlock out_channels")
        if time_embedding_norm not in TIME_EMBEDDING_NORMS:
            raise ValueError(f"ResNetBlock: time_embedding_norm must be one of {list(TIME_EMBEDDING_NORMS)}, "
                             f"got {time_embedding_norm!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.time_embedding_norm = time_embedding_norm
        self.norm1 = GroupNormSiLU(norm_groups, in_channels, eps=norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if time_dim:
            scale = 2 if time_embedding_norm == "scale_shift" else 1
            self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, out_channels * scale))
        else:
            self.time_proj = None
        # With scale_shift the SiLU must come after the modulation, so norm2 runs without its activation.
        self.norm2 = GroupNormSiLU(norm_groups, out_channels, eps=norm_eps,
                                   activation=None if time_embedding_norm == "scale_shift" and time_dim else "silu")
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        if self.time_proj is not None:
            if emb is None:
                raise ValueError("ResNetBlock was built with time_dim and needs an embedding [N, time_dim]")
            e = self.time_proj(emb)[:, :, None, None].to(h.dtype)
            if self.time_embedding_norm == "scale_shift":
                scale, shift = e.chunk(2, dim=1)
                h = F.silu(self.norm2(h) * (1 + scale) + shift)
            else:
                h = self.norm2(h + e)
        else:
            h = self.norm2(h)
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head spatial self-attention with a residual: x + proj(attn(norm(x))).

    Every pixel attends to every other pixel of the same sample. `zero_init` starts the output projection at zero
    so the block begins as the identity (as latent-diffusion's UNet does).
    x: [N, channels, H, W] -> same shape.
    """

    def __init__(self, channels: int, num_heads: int = 1, norm_groups: int = 8,
                 norm_eps: float = DEFAULT_NORM_EPS, zero_init: bool = False) -> None:
        super().__init__()
        check_divisible(channels, norm_groups, "AttentionBlock channels")
        if num_heads <= 0 or channels % num_heads != 0:
            raise ValueError(f"AttentionBlock: {channels} channels are not divisible by num_heads={num_heads}")
        self.channels, self.num_heads = channels, num_heads
        self.norm = GroupNormSiLU(norm_groups, channels, eps=norm_eps, activation=None)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        if zero_init:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        head_dim = c // self.num_heads
        qkv = self.qkv(self.norm(x))
        # [N, 3C, H, W] -> 3 x [N, heads, H*W, head_dim]
        q, k, v = qkv.reshape(n, 3, self.num_heads, head_dim, h * w).permute(1, 0, 2, 4, 3).unbind(0)
        out = attention(q, k, v)
        out = out.permute(0, 1, 3, 2).reshape(n, c, h, w)
        return x + self.proj(out)


class DownsampleBlock(nn.Module):
    """Halves H and W: a stride-2 3x3 conv (or 2x2 average pooling with use_conv=False).

    x: [N, channels, H, W] -> [N, out_channels, ceil(H/2), ceil(W/2)].
    """

    def __init__(self, channels: int, out_channels: int | None = None, use_conv: bool = True) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        if not use_conv and out_channels != channels:
            raise ValueError("DownsampleBlock: use_conv=False cannot change the channel count")
        self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1) if use_conv else \
            nn.AvgPool2d(2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class UpsampleBlock(nn.Module):
    """Doubles H and W: nearest-neighbour upsampling then a 3x3 conv (skipped with use_conv=False).

    Nearest + conv avoids the checkerboard artefacts of transposed convolutions (Odena et al., 2016).
    x: [N, channels, H, W] -> [N, out_channels, 2H, 2W].
    """

    def __init__(self, channels: int, out_channels: int | None = None, use_conv: bool = True) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        if not use_conv and out_channels != channels:
            raise ValueError("UpsampleBlock: use_conv=False cannot change the channel count")
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        # output_size lets a UNet match a skip connection whose size was odd before downsampling.
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x) if self.conv is not None else x
