"""How a ControlNet's feature map enters the frozen UNet: one fusion module per skip connection and one for the middle.

Every mode maps (skip, control, scale) -> fused skip with skip and control of the same shape [N, C, H, W], and is
zero-initialised so that before training the fused output equals `skip` bit for bit, whatever the control: the
ControlNet then starts as the untouched UNet and training can only move it away gradually (Zhang et al. 2023,
"Adding Conditional Control to Text-to-Image Diffusion Models", the "zero convolution"). `scale` is the
conditioning scale: 0 switches the control off, 1 is the trained strength.

Modes (`FUSION_MODES`, built by name with `build_fusion`):
- "add":   skip + scale * zero_conv(control)                              (ControlNet, Zhang et al. 2023)
- "concat": skip + scale * zero_proj(cat[skip, control])                  (the projection sees both inputs)
- "film":  skip * (1 + scale * gamma) + scale * beta, (gamma, beta) = zero_conv(control)   (FiLM, Perez et al. 2018)
- "cross_attention": skip + scale * tanh(gate) * proj(attn(q(norm skip), k, v(norm control))), gate = 0 at init
  (the gated cross-attention of Flamingo, Alayrac et al. 2022; attention as in Vaswani et al. 2017)

A zero-initialised layer still learns: its weight gradient is its input times the output gradient, which is not zero;
the rest of the ControlNet receives gradients once these weights have moved (for "cross_attention", once the gate has).
"""
from __future__ import annotations

import torch
from torch import nn

from layoutgen.kernels import GroupNormSiLU, attention
from layoutgen.models.components.blocks import DEFAULT_NORM_EPS, check_divisible


def zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 1x1 convolution with weight and bias set to zero (ControlNet's "zero convolution")."""
    conv = nn.Conv2d(in_channels, out_channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class Fusion(nn.Module):
    """Base of the fusion modes: forward(skip, control, scale) -> fused skip.

    skip, control: [N, channels, H, W] (same shape); scale: float. Returns [N, channels, H, W]. Subclasses implement
    `fuse`; `forward` checks the shapes first.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels <= 0:
            raise ValueError(f"{type(self).__name__}: channels must be positive, got {channels}")
        self.channels = channels

    def forward(self, skip: torch.Tensor, control: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        if skip.dim() != 4 or skip.shape[1] != self.channels or control.shape != skip.shape:
            raise ValueError(f"{type(self).__name__}: expected skip and control of the same shape "
                             f"[N, {self.channels}, H, W], got skip {tuple(skip.shape)} and control "
                             f"{tuple(control.shape)}")
        return self.fuse(skip, control, scale)

    def fuse(self, skip: torch.Tensor, control: torch.Tensor, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class AddFusion(Fusion):
    """skip + scale * zero_conv(control), as ControlNet does. [N, C, H, W] x 2 -> [N, C, H, W]."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.conv = zero_conv(channels, channels)

    def fuse(self, skip: torch.Tensor, control: torch.Tensor, scale: float) -> torch.Tensor:
        return skip + scale * self.conv(control)


class ConcatFusion(Fusion):
    """skip + scale * proj(cat([skip, control], 1)), proj a zero-initialised 1x1 conv 2C -> C.

    Unlike "add", the correction can depend on the skip as well as the control. [N, C, H, W] x 2 -> [N, C, H, W].
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.proj = zero_conv(2 * channels, channels)

    def fuse(self, skip: torch.Tensor, control: torch.Tensor, scale: float) -> torch.Tensor:
        return skip + scale * self.proj(torch.cat([skip, control], dim=1))


class FiLMFusion(Fusion):
    """Feature-wise linear modulation (Perez et al. 2018): skip * (1 + scale * gamma) + scale * beta.

    gamma, beta: the two halves of a zero-initialised 1x1 conv C -> 2C of the control, so both start at 0 and the
    modulation starts as the identity. [N, C, H, W] x 2 -> [N, C, H, W].
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.conv = zero_conv(channels, 2 * channels)

    def fuse(self, skip: torch.Tensor, control: torch.Tensor, scale: float) -> torch.Tensor:
        gamma, beta = self.conv(control).chunk(2, dim=1)
        return skip * (1 + scale * gamma) + scale * beta


class CrossAttentionFusion(Fusion):
    """Gated cross-attention (Flamingo, Alayrac et al. 2022): every skip pixel attends to every control pixel.

        out = proj(attention(q(GroupNorm(skip)), k(GroupNorm(control)), v(GroupNorm(control))))
        fused = skip + scale * tanh(gate) * out

    q, k, v and proj are 1x1 convs, attention is multi-head (`num_heads` heads of C / num_heads channels) through
    `layoutgen.kernels.attention`. The scalar `gate` starts at 0, so the module starts as the identity while the gate
    still gets a gradient (d fused / d gate = scale * out at 0); proj is NOT zero-initialised, else that gradient would
    vanish too. skip, control: [N, C, H, W] -> [N, C, H, W], attention over H*W tokens (memory O((H*W)^2) per head).
    """

    def __init__(self, channels: int, num_heads: int = 4, norm_groups: int = 8,
                 norm_eps: float = DEFAULT_NORM_EPS) -> None:
        super().__init__(channels)
        check_divisible(channels, norm_groups, "CrossAttentionFusion channels")
        if num_heads <= 0 or channels % num_heads:
            raise ValueError(f"CrossAttentionFusion: {channels} channels are not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm_skip = GroupNormSiLU(norm_groups, channels, eps=norm_eps, activation=None)
        self.norm_control = GroupNormSiLU(norm_groups, channels, eps=norm_eps, activation=None)
        self.to_q = nn.Conv2d(channels, channels, 1)
        self.to_k = nn.Conv2d(channels, channels, 1)
        self.to_v = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.gate = nn.Parameter(torch.zeros(()))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # [N, C, H, W] -> [N, heads, H*W, C / heads]
        n, c, h, w = x.shape
        return x.reshape(n, self.num_heads, c // self.num_heads, h * w).transpose(-1, -2)

    def attend(self, skip: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        """The ungated correction `out`: [N, C, H, W]."""
        n, c, h, w = skip.shape
        context = self.norm_control(control)
        q = self._heads(self.to_q(self.norm_skip(skip)))
        k = self._heads(self.to_k(context))
        v = self._heads(self.to_v(context))
        out = attention(q, k, v).transpose(-1, -2).reshape(n, c, h, w)
        return self.proj(out)

    def fuse(self, skip: torch.Tensor, control: torch.Tensor, scale: float) -> torch.Tensor:
        return skip + (scale * torch.tanh(self.gate)).to(skip.dtype) * self.attend(skip, control)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_heads={self.num_heads}"


FUSION_MODES: dict[str, type[Fusion]] = {
    "add": AddFusion,
    "concat": ConcatFusion,
    "film": FiLMFusion,
    "cross_attention": CrossAttentionFusion,
}


def build_fusion(mode: str, channels: int, **kwargs) -> Fusion:
    """The fusion module of `mode` (a key of FUSION_MODES) for `channels` channels; kwargs go to its constructor."""
    if mode not in FUSION_MODES:
        raise ValueError(f"fusion: unknown mode {mode!r}; valid modes are {sorted(FUSION_MODES)}")
    return FUSION_MODES[mode](channels, **kwargs)
