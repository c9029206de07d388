"""Tests for layoutgen.kernels.attention: every backend against a float64 hand-written softmax(q k^T / sqrt(d)) v,
forward and backward, plus argument errors."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from layoutgen.kernels import attention, attention_ref

# `layoutgen.kernels.attention` the attribute is the function; the module holds BACKENDS.
attention_module = importlib.import_module("layoutgen.kernels.attention")
BACKENDS = ["sdpa", "math"]


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


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with an explicit max-subtracted softmax; q [B,H,Lq,D], k [B,H,Lk,D], v [B,H,Lk,Dv]."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores - scores.amax(dim=-1, keepdim=True)
    weights = torch.exp(scores)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.einsum("bhqk,bhkd->bhqd", weights, v)


SHAPES = [
    # (B, H, Lq, Lk, D, Dv)
    (2, 1, 16, 16, 8, 8),
    (1, 3, 7, 11, 24, 24),   # Lq != Lk, head_dim not a power of two
    (2, 2, 13, 5, 40, 40),   # Lq > Lk
    (1, 2, 1, 9, 12, 12),    # a single query
    (2, 2, 6, 10, 20, 12),   # value dim differs from the key dim
]


def qkv(b, h, lq, lk, d, dv, seed, dtype=torch.float32, scale=1.0):
    return (randn(b, h, lq, d, seed=seed, dtype=dtype) * scale,
            randn(b, h, lk, d, seed=seed + 1, dtype=dtype) * scale,
            randn(b, h, lk, dv, seed=seed + 2, dtype=dtype))


def test_backends_constant():
    assert tuple(attention_module.BACKENDS) == tuple(BACKENDS)
    assert attention_module.DEFAULT_BACKEND in BACKENDS


@pytest.mark.parametrize("backend", BACKENDS + [None])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_manual_float64(backend, shape):
    q, k, v = qkv(*shape, seed=sum(shape), scale=2.0)  # scale 2: peaked softmax, far from uniform
    out = attention(q, k, v, backend=backend)
    b, h, lq, lk, d, dv = shape
    assert out.shape == (b, h, lq, dv) and out.dtype == torch.float32
    expected = manual_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs_keep_float64_precision(backend):
    q, k, v = qkv(2, 2, 9, 7, 24, 24, seed=50, dtype=torch.float64, scale=2.0)
    out = attention(q, k, v, backend=backend)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, manual_attention(q, k, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_matches_manual_float64(backend, shape):
    q0, k0, v0 = qkv(*shape, seed=sum(shape) + 100, scale=1.5)
    upstream = randn(shape[0], shape[1], shape[2], shape[5], seed=sum(shape) + 200)
    q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
    attention(q, k, v, backend=backend).backward(upstream)
    qd, kd, vd = (t.double().requires_grad_(True) for t in (q0, k0, v0))
    manual_attention(qd, kd, vd).backward(upstream.double())
    for got, want, name in [(q.grad, qd.grad, "q"), (k.grad, kd.grad, "k"), (v.grad, vd.grad, "v")]:
        assert got is not None and got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=name)
    assert q.grad.abs().max() > 1e-3  # the softmax gradient is really exercised


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    q, k, v = (t.requires_grad_(True) for t in qkv(1, 2, 4, 5, 6, 6, seed=60, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, backend=backend), (q, k, v))


def test_backends_agree_and_default_is_sdpa():
    q, k, v = qkv(2, 4, 10, 10, 16, 16, seed=70)
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"), attention(q, k, v, backend="math"),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, backend=attention_module.DEFAULT_BACKEND),
                               rtol=0, atol=0)
    torch.testing.assert_close(attention_ref(q, k, v), attention(q, k, v, backend="math"), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Views such as the attention block's permuted qkv (tokens and head_dim transposed) give the same result."""
    q, k, v = (t.transpose(-2, -1).contiguous().transpose(-2, -1) for t in qkv(2, 2, 9, 9, 12, 12, seed=80))
    assert not q.is_contiguous()
    expected = manual_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(attention(q, k, v, backend=backend).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_inputs(backend):
    q, k, v = (t.to(torch.bfloat16) for t in qkv(1, 2, 8, 8, 16, 16, seed=90))
    out = attention(q, k, v, backend=backend)
    assert out.dtype == torch.bfloat16
    expected = manual_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), expected, rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["flash", "SDPA", "xformers", ""])
def test_unknown_backend(bad):
    q, k, v = qkv(1, 1, 4, 4, 8, 8, seed=100)
    with pytest.raises(ValueError) as info:
        attention(q, k, v, backend=bad)
    message = str(info.value)
    assert repr(bad) in message
    for name in BACKENDS:
        assert name in message


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shapes", [
    ((4, 8), (4, 8), (4, 8)),                      # 2-D
    ((2, 4, 8), (2, 4, 8), (2, 4, 8)),             # 3-D (no heads axis)
    ((1, 2, 4, 8), (1, 2, 4, 8), (2, 4, 8)),       # v of the wrong rank
    ((1, 1, 2, 4, 8),) * 3,                         # 5-D
])
def test_wrong_rank(backend, shapes):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=r"\[batch, heads, tokens, head_dim\]"):
        attention(q, k, v, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shapes", [
    ((1, 2, 4, 8), (1, 2, 4, 6), (1, 2, 4, 8)),    # q and k head_dim differ
    ((1, 2, 4, 8), (1, 2, 5, 8), (1, 2, 4, 8)),    # k and v token counts differ
    ((1, 2, 4, 8), (2, 2, 4, 8), (2, 2, 4, 8)),    # batch differs
    ((1, 2, 4, 8), (1, 3, 4, 8), (1, 3, 4, 8)),    # heads differ
])
def test_incompatible_shapes(backend, shapes):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match="incompatible shapes"):
        attention(q, k, v, backend=backend)
