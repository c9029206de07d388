"""GroupNorm followed by SiLU, as one op.

GroupNorm (Wu & He, 2018) normalises each group of C/G channels of each sample by its mean and variance, then
applies a per-channel affine; SiLU (Elfwing et al., 2018; "swish") is x * sigmoid(x). Every block of the autoencoder
and the UNet runs the pair before a convolution, so it is one op here and one module, `GroupNormSiLU`, whose
state_dict matches nn.GroupNorm's (`weight`, `bias`) so existing checkpoints load unchanged.

This file holds, in order: the torch.library registration of the fused Triton kernels (group_norm_silu_triton.py:
the kernels and their launchers), i.e. the custom ops `layoutgen::group_norm_silu_fwd` / `_bwd` with their fake
(meta) implementations and autograd; the public function and its dispatch; the module; and the pure-PyTorch
reference `group_norm_silu_ref` that tests and benchmarks compare against.

Dispatch (layoutgen.kernels.backend): "auto" runs the Triton kernels on CUDA tensors and the reference elsewhere,
"triton" runs them on every tensor (CPU ones under TRITON_INTERPRET=1), "reference" never. float64 inputs always take
the reference (the kernels keep float32 statistics). The custom ops are opaque to torch.compile (fake tensors give
their shapes, register_autograd their backward), so `torch.compile(model, fullgraph=True)` has no graph break with any
backend; with the reference, torch.compile sees (and fuses) plain F.group_norm and F.silu. Outside torch.compile
the same kernels run through a plain autograd.Function, which has a fraction of a custom op's Python overhead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layoutgen.kernels.backend import use_triton

ACTIVATIONS = ("silu", None)


def _check_args(x: torch.Tensor, num_groups: int, activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm_silu: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        desc = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"group_norm_silu: expected a floating-point tensor [N, C, *spatial], got {desc}")
    if x.dim() < 2:
        raise ValueError(f"group_norm_silu: expected input [N, C, *spatial], got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if num_groups <= 0 or channels % num_groups != 0:
        raise ValueError(f"group_norm_silu: channels C={channels} (input shape {tuple(x.shape)}) "
                         f"must be divisible by num_groups={num_groups}")


# ---------------------------------------------------------------------------------------------------------------------
# torch.library registration of the Triton kernels (imported lazily: triton is optional, and TRITON_INTERPRET is read
# when the kernels are first loaded)
# ---------------------------------------------------------------------------------------------------------------------

def _triton_impl():
    from layoutgen.kernels import group_norm_silu_triton
    return group_norm_silu_triton


@torch.library.custom_op("layoutgen::group_norm_silu_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int, eps: float,
            silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd): y like x (same strides), mean and rstd [N, G] float32."""
    return _triton_impl().forward(x, weight, bias, num_groups, eps, silu)


@_fwd_op.register_fake
def _fwd_fake(x, weight, bias, num_groups, eps, silu):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("layoutgen::group_norm_silu_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, silu: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx like x, dweight [C] or [0] without weight, dbias [C] or [0] without bias)."""
    return _triton_impl().backward(dy, x, weight, bias, mean, rstd, num_groups, silu)


@_bwd_op.register_fake
def _bwd_fake(dy, x, weight, bias, mean, rstd, num_groups, silu):
    dw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    db = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return torch.empty_like(x), dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, _eps, silu = inputs
    _y, mean, rstd = output
    # The backward recomputes the normalised value from x, mean and rstd: y is not kept.
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.silu = num_groups, silu
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.layoutgen.group_norm_silu_bwd(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu)
    return dx, dw if weight is not None else None, db if bias is not None else None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerGroupNormSiLU(torch.autograd.Function):
    """The same launchers outside torch.compile: a custom op's Python dispatch costs about 5x an autograd.Function's
    (measured ~55 us against ~10 us a call on the CI CPU), which matters at the UNet's small shapes where a kernel
    takes a few microseconds. Under torch.compile the custom op above is used (dynamo cannot trace this class into an
    opaque kernel call), so both paths run the same kernels; opcheck checks the op, the tests check both."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, silu):
        y, mean, rstd = _triton_impl().forward(x, weight, bias, num_groups, eps, silu)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.silu = num_groups, silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = _triton_impl().backward(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu)
        return dx, dw if weight is not None else None, db if bias is not None else None, None, None, None


# ---------------------------------------------------------------------------------------------------------------------
# Public function, module and reference
# ---------------------------------------------------------------------------------------------------------------------

def _check_param(x: torch.Tensor, p: torch.Tensor | None, name: str) -> None:
    if p is None:
        return
    if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.shape[0] != x.shape[1] or not p.is_floating_point():
        desc = f"shape {tuple(p.shape)}, dtype {p.dtype}" if isinstance(p, torch.Tensor) else type(p).__name__
        raise ValueError(f"group_norm_silu: {name} must be a float tensor [C] with C={x.shape[1]} (the input's "
                         f"channels), got {desc}")
    if p.device != x.device:
        raise ValueError(f"group_norm_silu: {name} is on {p.device} but the input is on {x.device}")


def group_norm_silu_ref(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, eps: float = 1e-5,
                        activation: str | None = "silu") -> torch.Tensor:
    """Reference: F.group_norm then F.silu, eager PyTorch. x: [N, C, *spatial] -> same shape and dtype.

    Parameters of another dtype than x (a bf16 x with the module's fp32 weight) are computed with in their common
    dtype, the result cast back to x's (F.group_norm on CUDA takes no mixed dtypes).
    """
    _check_args(x, num_groups, activation)
    dtypes = {p.dtype for p in (weight, bias) if p is not None}
    if dtypes - {x.dtype}:
        common = x.dtype
        for dtype in dtypes:
            common = torch.promote_types(common, dtype)
        y = F.group_norm(x.to(common), num_groups, None if weight is None else weight.to(common),
                         None if bias is None else bias.to(common), eps)
        return (F.silu(y) if activation == "silu" else y).to(x.dtype)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if activation == "silu" else y


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5,
                    activation: str | None = "silu") -> torch.Tensor:
    """GroupNorm (+ SiLU unless activation is None) over x: [N, C, *spatial] with C divisible by num_groups.

    weight, bias: [C] or None (any float dtype: an fp32 weight with a bf16 x is fine). Returns a tensor of x's shape,
    dtype and memory format (NCHW or channels_last). Statistics are float32 for fp16 / bf16 / fp32 inputs. Runs the
    fused Triton kernels or the reference as layoutgen.kernels.get_backend() says (see the module docstring).
    """
    _check_args(x, num_groups, activation)
    _check_param(x, weight, "weight")
    _check_param(x, bias, "bias")
    if not use_triton(x):
        return group_norm_silu_ref(x, num_groups, weight, bias, eps, activation)
    if torch.compiler.is_compiling():
        return torch.ops.layoutgen.group_norm_silu_fwd(x, weight, bias, num_groups, float(eps),
                                                       activation == "silu")[0]
    return _EagerGroupNormSiLU.apply(x, weight, bias, num_groups, float(eps), activation == "silu")


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
