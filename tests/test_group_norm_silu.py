"""Tests for layoutgen.kernels.group_norm_silu (the PyTorch reference path): values and gradients against a float64
hand-written GroupNorm + SiLU, memory formats, nn.GroupNorm state-dict compatibility and argument errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layoutgen.kernels import GroupNormSiLU, group_norm_silu, group_norm_silu_ref


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one intra-op thread is faster, and avoids OpenMP spin-waits on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def manual_group_norm_silu(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                           eps: float, activation: str | None = "silu") -> torch.Tensor:
    """GroupNorm + SiLU written out: per (sample, group) mean and biased variance, normalise, affine, x*sigmoid(x)."""
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, -1)
    mean = xg.sum(-1, keepdim=True) / xg.shape[-1]
    var = ((xg - mean) ** 2).sum(-1, keepdim=True) / xg.shape[-1]
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    if activation == "silu":
        y = y * (1.0 / (1.0 + torch.exp(-y)))
    return y


CASES = [
    # (shape, groups)
    ((2, 16, 8, 8), 4),
    ((1, 40, 7, 9), 8),
    ((3, 8, 5, 1), 8),   # one channel per group
    ((2, 12, 6, 6), 1),  # one group (LayerNorm over C, H, W)
    ((2, 16, 11), 4),    # 1-D spatial
    ((1, 24, 3, 4, 5), 6),  # 3-D spatial
]


@pytest.mark.parametrize("fn", [group_norm_silu, group_norm_silu_ref], ids=["group_norm_silu", "ref"])
@pytest.mark.parametrize("shape,groups", CASES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("activation", ["silu", None])
def test_matches_manual_float64(fn, shape, groups, affine, activation):
    c = shape[1]
    seed = sum(shape) * 7 + groups
    x = randn(*shape, seed=seed) * 3 + 1.5  # off-centre, not unit scale: the normalisation matters
    weight = randn(c, seed=seed + 1) if affine else None
    bias = randn(c, seed=seed + 2) if affine else None
    eps = 1e-6
    out = fn(x, groups, weight, bias, eps, activation)
    expected = manual_group_norm_silu(x.double(), groups, None if weight is None else weight.double(),
                                      None if bias is None else bias.double(), eps, activation)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_default_eps_and_activation():
    x = randn(2, 8, 4, 4, seed=3)
    out = group_norm_silu(x, 4)
    expected = manual_group_norm_silu(x.double(), 4, None, None, 1e-5, "silu")
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # eps is used: a large eps visibly shrinks the output.
    big = group_norm_silu(x, 4, eps=10.0)
    torch.testing.assert_close(big.double(), manual_group_norm_silu(x.double(), 4, None, None, 10.0), rtol=1e-5,
                               atol=1e-5)
    assert not torch.allclose(big, out, atol=1e-2)


def test_float64_input_is_exact():
    x = randn(2, 40, 7, 9, seed=4, dtype=torch.float64)
    w, b = randn(40, seed=5, dtype=torch.float64), randn(40, seed=6, dtype=torch.float64)
    out = group_norm_silu(x, 8, w, b, 1e-5)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, manual_group_norm_silu(x, 8, w, b, 1e-5), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("activation", ["silu", None])
def test_channels_last(activation):
    x = randn(2, 40, 7, 9, seed=7)
    w, b = randn(40, seed=8), randn(40, seed=9)
    x_cl = x.to(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()
    out = group_norm_silu(x_cl, 8, w, b, 1e-6, activation)
    # Documented: same memory format as the input.
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, group_norm_silu(x, 8, w, b, 1e-6, activation), rtol=1e-5, atol=1e-5)
    expected = manual_group_norm_silu(x.double(), 8, w.double(), b.double(), 1e-6, activation)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,groups", [((2, 16, 5, 6), 4), ((1, 40, 7, 9), 8)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", ["silu", None])
def test_gradients_match_manual_float64(shape, groups, channels_last, activation):
    c = shape[1]
    x0 = randn(*shape, seed=10) * 2 + 0.5
    w0, b0, g0 = randn(c, seed=11), randn(c, seed=12), randn(*shape, seed=13)
    if channels_last:
        x0 = x0.to(memory_format=torch.channels_last)
    x, w, b = (t.clone().requires_grad_(True) for t in (x0, w0, b0))
    group_norm_silu(x, groups, w, b, 1e-6, activation).backward(g0)

    xd, wd, bd = (t.detach().double().requires_grad_(True) for t in (x0, w0, b0))
    manual_group_norm_silu(xd, groups, wd, bd, 1e-6, activation).backward(g0.double())
    for got, want, name in [(x.grad, xd.grad, "x"), (w.grad, wd.grad, "weight"), (b.grad, bd.grad, "bias")]:
        assert got is not None, name
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=name)


def test_gradcheck_float64():
    x = randn(1, 8, 3, 3, seed=14, dtype=torch.float64).requires_grad_(True)
    w = randn(8, seed=15, dtype=torch.float64).requires_grad_(True)
    b = randn(8, seed=16, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w, b: group_norm_silu(x, 4, w, b, 1e-5), (x, w, b))


# ---------------------------------------------------------------------------------------------------------------------
# GroupNormSiLU module
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("activation", ["silu", None])
def test_module_matches_manual(affine, activation):
    module = GroupNormSiLU(8, 40, eps=1e-6, affine=affine, activation=activation)
    if affine:
        with torch.no_grad():
            module.weight.copy_(randn(40, seed=20))
            module.bias.copy_(randn(40, seed=21))
    else:
        assert module.weight is None and module.bias is None
        assert len(list(module.parameters())) == 0
    x = randn(1, 40, 7, 9, seed=22)
    expected = manual_group_norm_silu(x.double(), 8, module.weight.double() if affine else None,
                                      module.bias.double() if affine else None, 1e-6, activation)
    torch.testing.assert_close(module(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_module_defaults_like_group_norm():
    module, ref = GroupNormSiLU(4, 16), nn.GroupNorm(4, 16)
    assert module.eps == ref.eps
    torch.testing.assert_close(module.weight, ref.weight)
    torch.testing.assert_close(module.bias, ref.bias)
    assert module.activation == "silu"
    assert "activation=silu" in repr(module)


@pytest.mark.parametrize("affine", [True, False])
def test_state_dict_interchangeable_with_group_norm(affine):
    gn = nn.GroupNorm(8, 40, eps=1e-6, affine=affine)
    module = GroupNormSiLU(8, 40, eps=1e-6, affine=affine)
    assert list(module.state_dict()) == list(gn.state_dict())
    assert {k: v.shape for k, v in module.state_dict().items()} == {k: v.shape for k, v in gn.state_dict().items()}
    if affine:
        with torch.no_grad():
            gn.weight.copy_(randn(40, seed=23))
            gn.bias.copy_(randn(40, seed=24))
    x = randn(2, 40, 7, 9, seed=25)
    # nn.GroupNorm -> GroupNormSiLU
    module.load_state_dict(gn.state_dict())
    torch.testing.assert_close(module(x), nn.SiLU()(gn(x)), rtol=1e-5, atol=1e-5)
    # GroupNormSiLU -> nn.GroupNorm
    if affine:
        with torch.no_grad():
            module.weight.copy_(randn(40, seed=26))
            module.bias.copy_(randn(40, seed=27))
    gn2 = nn.GroupNorm(8, 40, eps=1e-6, affine=affine)
    gn2.load_state_dict(module.state_dict())
    torch.testing.assert_close(nn.SiLU()(gn2(x)), module(x), rtol=1e-5, atol=1e-5)
    no_act = GroupNormSiLU(8, 40, eps=1e-6, affine=affine, activation=None)
    no_act.load_state_dict(module.state_dict())
    torch.testing.assert_close(no_act(x), gn2(x), rtol=1e-5, atol=1e-5)


def test_module_gradients_reach_parameters():
    module = GroupNormSiLU(4, 16)
    x = randn(2, 16, 5, 5, seed=28, dtype=torch.float32).requires_grad_(True)
    module(x).square().sum().backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert module.bias.grad is not None and module.bias.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [group_norm_silu, group_norm_silu_ref], ids=["group_norm_silu", "ref"])
def test_channels_not_divisible_by_groups(fn):
    with pytest.raises(ValueError) as info:
        fn(randn(1, 40, 3, 3, seed=29), 7)
    message = str(info.value)
    assert "40" in message and "num_groups=7" in message
    with pytest.raises(ValueError, match="num_groups=0"):
        fn(randn(1, 40, 3, 3, seed=29), 0)


def test_module_channels_not_divisible_by_groups():
    with pytest.raises(ValueError) as info:
        GroupNormSiLU(7, 40)
    message = str(info.value)
    assert "num_channels=40" in message and "num_groups=7" in message


@pytest.mark.parametrize("bad", ["relu", "SiLU", "gelu", ""])
def test_bad_activation(bad):
    with pytest.raises(ValueError, match="activation"):
        group_norm_silu(randn(1, 8, 3, 3, seed=30), 4, activation=bad)
    with pytest.raises(ValueError, match="activation"):
        GroupNormSiLU(4, 8, activation=bad)


def test_bad_rank():
    with pytest.raises(ValueError, match=r"\(8,\)"):
        group_norm_silu(randn(8, seed=31), 4)
