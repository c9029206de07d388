"""GroupNorm followed by SiLU, as one op.

GroupNorm (Wu & He, 2018) normalises each group of C/G channels of each sample by its mean and variance, then
applies a per-channel affine; SiLU (Elfwing et al., 2018; "swish") is x * sigmoid(x). Every block of the autoencoder
and the UNet runs the pair before a convolution, so it is one op here and one module, `GroupNormSiLU`, whose
state_dict matches nn.GroupNorm's (`weight`, `bias`) so existing checkpoints load unchanged.

This file holds the public function, the module and the pure-PyTorch reference `group_norm_silu_ref` that tests
and benchmarks compare against. The fused Triton kernels plug in behind `group_norm_silu` without any change to the
models that call it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("silu", None)


def _check_args(x: torch.Tensor, num_groups: int, activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm_silu: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if x.dim() < 2:
        raise ValueError(f"group_norm_silu: expected input [N, C, *spatial], got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if num_groups <= 0 or channels % num_groups != 0:
        raise ValueError(f"group_norm_silu: channels C={channels} (input shape {tuple(x.shape)}) "
                         f"must be divisible by num_groups={num_groups}")


def group_norm_silu_ref(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, eps: float = 1e-5,
                        activation: str | None = "silu") -> torch.Tensor:
    """Reference: F.group_norm then F.silu, eager PyTorch. x: [N, C, *spatial] -> same shape and dtype."""
    _check_args(x, num_groups, activation)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if activation == "silu" else y


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5,
                    activation: str | None = "silu") -> torch.Tensor:
    """GroupNorm (+ SiLU unless activation is None) over x: [N, C, *spatial] with C divisible by num_groups.

    weight, bias: [C] or None. Returns a tensor of x's shape, dtype and memory format.
    """
    return group_norm_silu_ref(x, num_groups, weight, bias, eps, activation)


class GroupNormSiLU(nn.Module):
    """nn.GroupNorm followed by SiLU, as one module; parameters named like nn.GroupNorm's."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: str | None = "silu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"GroupNormSiLU: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        if num_groups <= 0 or num_channels % num_groups != 0:
            raise ValueError(f"GroupNormSiLU: num_channels={num_channels} must be divisible by num_groups={num_groups}")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.activation = activation
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, self.activation)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"activation={self.activation}")
