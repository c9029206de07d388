"""Tests for layoutgen.kernels.attention: every backend against a float64 hand-written softmax(q k^T / sqrt(d)) v,
forward and backward, plus argument errors."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from layoutgen.kernels import (attention, attention_ref, get_attention_backend, set_attention_backend,
                               use_attention_backend)

# `layoutgen.kernels.attention` the attribute is the function; the module holds BACKENDS.
attention_module = importlib.import_module("layoutgen.kernels.attention")
ALL_BACKENDS = ["sdpa", "xformers", "math"]
# The backends that run on CPU tensors (xformers has no CPU kernels: it is tested on CUDA below).
BACKENDS = ["sdpa", "math"]


@pytest.fixture(autouse=True)
def _clean_attention_backend(monkeypatch):
    monkeypatch.delenv(attention_module.ENV_VAR, raising=False)
    monkeypatch.setattr(attention_module.attention_backend, "process_default", None)


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
    assert tuple(attention_module.BACKENDS) == tuple(ALL_BACKENDS)
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


@pytest.mark.parametrize("bad", ["flash", "SDPA", "xformer", ""])
def test_unknown_backend(bad):
    q, k, v = qkv(1, 1, 4, 4, 8, 8, seed=100)
    with pytest.raises(ValueError) as info:
        attention(q, k, v, backend=bad)
    message = str(info.value)
    assert repr(bad) in message
    for name in ALL_BACKENDS:
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


# ---------------------------------------------------------------------------------------------------------------------
# Backend selection: argument > use_attention_backend > set_attention_backend > LAYOUTGEN_ATTENTION_BACKEND > sdpa
# ---------------------------------------------------------------------------------------------------------------------


def test_default_backend_is_sdpa():
    assert get_attention_backend() == "sdpa"


def test_selection_precedence(monkeypatch):
    monkeypatch.setenv(attention_module.ENV_VAR, "math")
    assert get_attention_backend() == "math"
    set_attention_backend("sdpa")
    assert get_attention_backend() == "sdpa"
    with use_attention_backend("math"):
        assert get_attention_backend() == "math"
        with use_attention_backend("xformers"):
            assert get_attention_backend() == "xformers"
        assert get_attention_backend() == "math"
    assert get_attention_backend() == "sdpa"


def test_selection_reaches_attention(monkeypatch):
    calls = []
    real = attention_module.attention_ref
    monkeypatch.setattr(attention_module, "attention_ref", lambda *a: calls.append(1) or real(*a))
    q, k, v = qkv(1, 2, 4, 4, 8, 8, seed=110)
    attention(q, k, v)
    assert not calls
    with use_attention_backend("math"):
        attention(q, k, v)
        attention(q, k, v, backend="sdpa")   # the argument wins
    assert len(calls) == 1
    monkeypatch.setenv(attention_module.ENV_VAR, "math")
    attention(q, k, v)
    assert len(calls) == 2


def test_bad_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        set_attention_backend("flash")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        use_attention_backend("flash").__enter__()
    monkeypatch.setenv(attention_module.ENV_VAR, "flash")
    with pytest.raises(ValueError, match=r"LAYOUTGEN_ATTENTION_BACKEND.*'flash'.*\['sdpa', 'xformers', 'math'\]"):
        get_attention_backend()


@pytest.mark.parametrize("installed", [False, True])
def test_xformers_asked_for_where_it_cannot_run_is_a_clear_error(monkeypatch, installed):
    monkeypatch.setattr(attention_module, "XFORMERS_INSTALLED", installed)
    q, k, v = qkv(1, 2, 4, 4, 8, 8, seed=120)
    expected = "not installed" if not installed else "needs CUDA tensors"
    with pytest.raises(RuntimeError, match=f"'xformers'.*{expected}"):
        attention(q, k, v, backend="xformers")
    with use_attention_backend("xformers"), pytest.raises(RuntimeError, match="'xformers'"):
        attention(q, k, v)


def test_xformers_absence_is_never_an_error_unless_asked(monkeypatch):
    monkeypatch.setattr(attention_module, "XFORMERS_INSTALLED", False)
    q, k, v = qkv(1, 2, 4, 4, 8, 8, seed=130)
    for backend in [None, "sdpa", "math"]:
        attention(q, k, v, backend=backend)


# ---------------------------------------------------------------------------------------------------------------------
# Layouts: [B, C, H, W] <-> [B, heads, tokens, head_dim] <-> xformers' [B, tokens, heads, head_dim], as views
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
def test_heads_view_and_merge_are_views(channels_last):
    x = randn(2, 12, 5, 7, seed=140)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    heads = attention_module.heads_view(x, 3)
    assert heads.shape == (2, 3, 35, 4)
    assert heads._base is x
    torch.testing.assert_close(heads[1, 2, 8], x[1, 8:12].flatten(1)[:, 8])
    bmhk = attention_module.to_bmhk(heads)
    assert bmhk.shape == (2, 35, 3, 4)
    # channels_last maps are token-major already: no copy for xformers.
    assert (bmhk.data_ptr() == x.data_ptr()) == channels_last
    merged = attention_module.merge_heads(heads, 5, 7)
    torch.testing.assert_close(merged, x, rtol=0, atol=0)
    assert merged.data_ptr() == x.data_ptr()


def test_block_layout_matches_heads_view():
    """The AttentionBlock's own reshapes give what heads_view gives (one convention everywhere)."""
    qkv_map = randn(2, 3 * 8, 3, 4, seed=150)
    n, heads, hd = 2, 2, 4
    q, k, v = qkv_map.reshape(n, 3, heads, hd, 12).permute(1, 0, 2, 4, 3).unbind(0)
    for got, chunk in zip((q, k, v), qkv_map.chunk(3, dim=1)):
        torch.testing.assert_close(got, attention_module.heads_view(chunk, heads), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# CUDA: every available backend (xformers where installed) against math, forward and backward, half precision
# ---------------------------------------------------------------------------------------------------------------------


def _cuda_backends():
    return ["sdpa", "math"] + (["xformers"] if attention_module.xformers_available() else [])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 4, 256, 256, 64, 64), (1, 8, 1024, 1024, 32, 32), (2, 1, 64, 16, 40, 40)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_backends_match_float64(shape, dtype):
    q0, k0, v0 = (t.cuda() for t in qkv(*shape, seed=160, scale=1.5))
    dy = randn(shape[0], shape[1], shape[2], shape[5], seed=161).cuda()
    want_grads = None
    qd, kd, vd = (t.double().requires_grad_(True) for t in (q0, k0, v0))
    want = manual_attention(qd, kd, vd)
    want_grads = torch.autograd.grad(want, (qd, kd, vd), dy.double())
    for backend in _cuda_backends():
        if backend == "xformers" and shape[4] != shape[5]:
            continue
        q, k, v = (t.to(dtype).requires_grad_(True) for t in (q0, k0, v0))
        out = attention(q, k, v, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), dy.to(dtype))
        # Relative to each tensor's magnitude: about 4 bf16 / 16 fp16 units of rounding (fp32: TF32-free kernels).
        tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
        for got, ref, name in zip((out,) + grads, (want,) + want_grads, ["out", "dq", "dk", "dv"]):
            err = (got.double() - ref).abs().max().item()
            assert err <= tol * ref.abs().max().item(), f"{backend} {name}: error {err:.3g}"
