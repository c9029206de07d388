"""Tests for layoutgen.kernels.group_norm_silu: the reference path and the Triton kernels (on the CPU in Triton's
interpreter, on CUDA compiled), values and every gradient against a float64 hand-written GroupNorm + SiLU by the
tolerance policy of DESIGN.md, memory formats, nn.GroupNorm state-dict compatibility, dispatch, torch.library
(opcheck, torch.compile with fullgraph=True) and argument errors."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from layoutgen.kernels import GroupNormSiLU, backend, group_norm_silu, group_norm_silu_ref, use_backend
from triton_support import triton_skip_reason


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


# ---------------------------------------------------------------------------------------------------------------------
# The Triton kernels: on the CPU under TRITON_INTERPRET=1 (set by conftest.py), on CUDA compiled. Every CUDA test has
# a CPU counterpart (the `device` fixture); shapes stay small for the interpreter.
# ---------------------------------------------------------------------------------------------------------------------

gns_module = importlib.import_module("layoutgen.kernels.group_norm_silu")

# Tolerance policy (DESIGN.md): error against float64 <= 2 x eager PyTorch's error in the same dtype + a small atol
# (relative to the reference's magnitude, so that dweight / dbias, sums over many elements, get the same rule).
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Runs the test with the 'triton' backend on this device (skipped where the kernels cannot run)."""
    reason = triton_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


def check_policy(got: torch.Tensor, eager: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    assert got.shape == want.shape, name
    err = (got.detach().double().cpu() - want).abs().max().item()
    base = (eager.detach().double().cpu() - want).abs().max().item()
    atol = ATOL[dtype] * max(1.0, want.abs().max().item())
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 x eager's {base:.3g} + atol {atol:.3g}"


def compare_with_float64(shape, groups, dtype=torch.float32, device="cpu", channels_last=False, affine=True,
                         activation="silu", seed=0, param_dtype=None, eps=1e-6):
    """Runs the triton backend, eager PyTorch in `dtype` and float64; checks y and every gradient by the policy."""
    c = shape[1]
    param_dtype = dtype if param_dtype is None else param_dtype
    x0 = (randn(*shape, seed=seed) * 3 + 1.5).to(dtype)  # rounded to dtype: the float64 reference sees the same x
    w0 = (randn(c, seed=seed + 1) * 0.5 + 1).to(param_dtype) if affine else None
    b0 = randn(c, seed=seed + 2).to(param_dtype) if affine else None
    dy0 = randn(*shape, seed=seed + 3).to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    results = {}
    for name, run_dtype in [("ours", None), ("eager", None), ("float64", torch.float64)]:
        x = x0.to(device=device, dtype=run_dtype or dtype).contiguous(memory_format=fmt).requires_grad_(True)
        params = [p.to(device=device, dtype=run_dtype or p.dtype).requires_grad_(True) for p in (w0, b0)
                  if p is not None]
        w, b = (params + [None, None])[:2]
        dy = dy0.to(device=device, dtype=run_dtype or dtype)
        if name == "float64":
            y = manual_group_norm_silu(x, groups, w, b, eps, activation)
        else:
            with use_backend("triton" if name == "ours" else "reference"):
                y = group_norm_silu(x, groups, w, b, eps, activation)
        grads = torch.autograd.grad(y, [x] + params, dy)
        results[name] = (y, x, grads)
    y, x, grads = results["ours"]
    assert y.dtype == dtype and y.device.type == device
    assert y.is_contiguous(memory_format=fmt)
    assert grads[0].is_contiguous(memory_format=fmt)
    for i, what in enumerate(["y", "dx", "dweight", "dbias"][:1 + len(grads)]):
        got = y if i == 0 else grads[i - 1]
        eager = results["eager"][0] if i == 0 else results["eager"][2][i - 1]
        want = results["float64"][0] if i == 0 else results["float64"][2][i - 1]
        if i >= 2:
            assert got.dtype == param_dtype, what
        check_policy(got, eager, want.detach().cpu(), dtype, what)


TRITON_CASES = [
    # (shape, groups)
    ((2, 16, 8, 8), 4),
    ((1, 40, 7, 9), 8),     # C=40 with 8 groups (5 channels a group), 7x9 spatial, batch 1
    ((3, 8, 5, 1), 8),      # one channel per group
    ((1, 16, 48, 48), 4),   # a group too large for registers: the chunked path, S=2304 > any BLOCK_S
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,groups", TRITON_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else str(v))
def test_triton_forward_and_gradients(device, shape, groups, dtype, channels_last):
    compare_with_float64(shape, groups, dtype, device, channels_last, seed=sum(shape) + groups)


@pytest.mark.parametrize("shape,groups", [((2, 16, 11), 4), ((1, 24, 3, 4, 5), 6)], ids=["1d", "3d"])
def test_triton_other_spatial_ranks(device, shape, groups):
    compare_with_float64(shape, groups, torch.float32, device, seed=5)


# The one-pass kernels' module imports triton: None where triton is not installed (its tests then skip).
one_pass = importlib.import_module("layoutgen.kernels.group_norm_silu_one_pass") if backend.TRITON_INSTALLED else None
needs_triton = pytest.mark.skipif(one_pass is None, reason="triton is not installed")


@pytest.fixture(params=["single", "chunked", "one-pass"])
def path(request, monkeypatch):
    """Forces the launchers' single-pass, chunked (two-pass forward) or one-pass chunked forward path, with several
    chunks, the last one partial (the backward of "one-pass" is the chunked one)."""
    if request.param != "single":
        triton_impl = importlib.import_module("layoutgen.kernels.group_norm_silu_triton")
        monkeypatch.setattr(triton_impl, "SINGLE_MAX_ELEMS", 0)
        monkeypatch.setattr(triton_impl, "MIN_CHUNK_ELEMS", 1)
        monkeypatch.setattr(triton_impl, "CPU_TARGET_PROGRAMS", 24)
        monkeypatch.setattr(triton_impl, "TARGET_PROGRAMS_PER_SM", 64)
    if request.param == "one-pass":
        # 7x9 and 24x24 groups of 4 or 5 channels: chunks of 8 or 16 positions, 8 to 36 of them.
        monkeypatch.setattr(one_pass, "MAX_TILE", 64)
        monkeypatch.setattr(one_pass, "MIN_CHUNK_S", 4)
        monkeypatch.setattr(one_pass, "CPU_MAX_CHUNKS", 128)
        chunks = {"forward": [], "backward": []}
        for direction in chunks:
            real = getattr(one_pass, f"launch_{direction}")
            monkeypatch.setattr(one_pass, f"launch_{direction}",
                                lambda *a, real=real, seen=chunks[direction]: seen.append(a[-2][1]) or real(*a))
        with backend.group_norm_chunked_path.use("one-pass", "test"):
            yield request.param
        for direction, seen in chunks.items():
            assert seen and min(seen) > 1, f"the one-pass {direction} did not run, or ran with one chunk a group"
        return
    yield request.param


@pytest.mark.parametrize("affine,activation,channels_last", [(True, "silu", False), (False, "silu", True),
                                                              (True, None, True), (False, None, False)],
                         ids=["affine-silu-nchw", "silu-nhwc", "affine-nhwc", "plain-nchw"])
def test_triton_affine_activation_paths(device, path, affine, activation, channels_last):
    compare_with_float64((1, 40, 7, 9), 8, torch.float32, device, channels_last, affine, activation, seed=11)


def test_triton_plan(triton_cpu):
    triton_impl = importlib.import_module("layoutgen.kernels.group_norm_silu_triton")
    cpu = torch.device("cpu")
    assert triton_impl._plan(2, 4, 4, 64, cpu)[0] == "single"
    kind, chunk_s, k = triton_impl._plan(1, 2, 4, 2304, cpu)
    assert kind == "chunked" and k > 1 and chunk_s * (k - 1) < 2304 <= chunk_s * k
    assert triton_impl._flags(None, None, True, 32, 2 ** 26)["INDEX_64"] is True
    assert triton_impl._flags(None, None, True, 32, 2 ** 26 - 1)["INDEX_64"] is False


def triton_next_pow2(v: int) -> int:
    return 1 << (v - 1).bit_length()


@needs_triton
@pytest.mark.parametrize("cpg,s,max_chunks,expected", [
    (4, 512 * 512, 132, (2048, 128)),   # the autoencoder at 512x512 on an H100: 128 chunks of 4 x 2048
    (8, 256 * 256, 132, (1024, 64)),
    (32, 64 * 64, 132, (256, 16)),
    (5, 7 * 9, 132, (64, 1)),
    (4, 512 * 512, 100, None),          # more chunks than SMs: not every chunk of a group could be resident
    (512, 64, 132, None),               # a chunk of MAX_TILE elements would hold fewer than 32 positions
])
def test_one_pass_plan(cpg, s, max_chunks, expected):
    got = one_pass.plan(cpg, s, max_chunks)
    assert got == expected
    if got is not None:
        chunk_s, chunks = got
        assert chunk_s & (chunk_s - 1) == 0 and triton_next_pow2(cpg) * chunk_s <= one_pass.MAX_TILE
        assert (chunks - 1) * chunk_s < s <= chunks * chunk_s


@needs_triton
def test_one_pass_tuning_candidates():
    """The heuristic config first; smaller chunks only where the group still fits in max_chunks chunks; warps capped
    for small tiles; no duplicates."""
    assert one_pass.configs("forward", 4, 512 * 512, 132) == [(2048, 128, 8), (2048, 128, 16)]
    assert one_pass.configs("backward", 4, 512 * 512, 132) == [(2048, 128, 16), (2048, 128, 8)]
    assert one_pass.configs("forward", 32, 64 * 64, 132) == [(256, 16, 8), (256, 16, 16), (128, 32, 4), (128, 32, 8),
                                                             (64, 64, 4)]
    assert one_pass.configs("forward", 5, 7 * 9, 132) == [(64, 1, 2)]
    assert one_pass.configs("forward", 512, 64, 132) == []


def test_one_pass_tuning_times_each_candidate_once_per_key(triton_cpu, monkeypatch):
    """With a timer (CUDA: triton's do_bench) every candidate config runs and is timed, the fastest is kept for the
    key and used from then on; the results stay right whichever config runs (here the last, the timer says)."""
    triton_impl = importlib.import_module("layoutgen.kernels.group_norm_silu_triton")
    monkeypatch.setattr(triton_impl, "SINGLE_MAX_ELEMS", 0)   # the chunked path, where the one-pass kernels apply
    monkeypatch.setattr(one_pass, "MAX_TILE", 256)
    monkeypatch.setattr(one_pass, "MIN_CHUNK_S", 4)
    monkeypatch.setattr(one_pass, "_CHOSEN", {})
    timed = []

    def stand_in_timer(fn):
        fn()
        timed.append(fn)
        return -float(len(timed))   # each later candidate "faster"

    monkeypatch.setattr(triton_impl, "_one_pass_timer", lambda device: stand_in_timer)
    candidates = {d: one_pass.configs(d, 4, 16 * 16, one_pass.CPU_MAX_CHUNKS) for d in ("forward", "backward")}
    assert [c[:2] for c in candidates["forward"]] == [(64, 4), (32, 8), (16, 16)]   # 2 groups of 4 x 16 x 16
    assert len(candidates["backward"]) == 3
    with backend.group_norm_chunked_path.use("one-pass", "test"):
        compare_with_float64((1, 8, 16, 16), 2, torch.float32, "cpu", seed=37)
        assert len(timed) == 6
        chosen = {key[0]: config for key, config in one_pass._CHOSEN.items()}
        assert chosen == {d: candidates[d][-1] for d in candidates}
        compare_with_float64((1, 8, 16, 16), 2, torch.float32, "cpu", seed=38)   # the same key: no more timing
        assert len(timed) == 6


def test_one_pass_is_chosen_in_one_place(monkeypatch, triton_cpu):
    """Two-pass by default; LAYOUTGEN_GN_CHUNKED or group_norm_chunked_path.use selects one-pass; a bad name names its source."""
    triton_impl = importlib.import_module("layoutgen.kernels.group_norm_silu_triton")
    cpu = torch.device("cpu")
    monkeypatch.delenv("LAYOUTGEN_GN_CHUNKED", raising=False)
    assert backend.group_norm_chunked_path.get() == "two-pass"
    assert triton_impl._one_pass_max_chunks(4, 4096, cpu) is None
    monkeypatch.setenv("LAYOUTGEN_GN_CHUNKED", "one-pass")
    assert triton_impl._one_pass_max_chunks(4, 4096, cpu) == one_pass.CPU_MAX_CHUNKS
    assert triton_impl._one_pass_max_chunks(512, 4096, cpu) is None   # too wide a group: two-pass
    with backend.group_norm_chunked_path.use("two-pass", "test"):
        assert triton_impl._one_pass_max_chunks(4, 4096, cpu) is None
    monkeypatch.setenv("LAYOUTGEN_GN_CHUNKED", "single-pass")
    with pytest.raises(ValueError, match="LAYOUTGEN_GN_CHUNKED.*single-pass"):
        backend.group_norm_chunked_path.get()


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_one_pass_wait_is_bounded_and_a_timeout_is_loud(triton_cpu, monkeypatch, direction):
    """The GPU launch (PHASE 0) run in the interpreter, where programs run one after another so no program but the
    last of its group can see the group complete: each other one must give up after MAX_SPINS polls, count a timeout
    and write NaN, rather than hang; the last one of each group merges and writes the right values."""
    monkeypatch.setattr(one_pass, "MAX_SPINS", 3)
    n, c, s, groups = 2, 8, 40, 2
    chunk_s, chunks = 16, 3
    tail = slice((chunks - 1) * chunk_s, None)   # the last chunk of every group
    x3 = randn(n, c, s, seed=35).requires_grad_(True)
    flags = dict(HAS_W=False, HAS_B=False, SILU=True, INDEX_64=False)
    y_ref = group_norm_silu_ref(x3, groups)
    x3d = x3.detach()
    mean = x3d.view(n, groups, -1).mean(-1)
    rstd = (x3d.view(n, groups, -1).var(-1, unbiased=False) + 1e-5).rsqrt()
    if direction == "forward":
        out, mean_out, rstd_out = torch.empty_like(x3d), torch.empty(n, groups), torch.empty(n, groups)
        sync = one_pass.launch_forward(x3d, out, x3d, x3d, mean_out, rstd_out, groups, 1e-5, flags,
                                       (chunk_s, chunks, 4), interpreted=False)
        want = y_ref.detach()
        torch.testing.assert_close(mean_out, mean)
        torch.testing.assert_close(rstd_out, rstd, rtol=1e-5, atol=1e-5)
    else:
        dy = randn(n, c, s, seed=36)
        out = torch.empty_like(x3d)
        partials = torch.empty(2, n, chunks, c)
        sync = one_pass.launch_backward(dy, x3d, out, x3d, x3d, mean, rstd, partials, groups, flags,
                                        (chunk_s, chunks, 4), interpreted=False)
        (want,) = torch.autograd.grad(y_ref, x3, dy)
    assert one_pass.timeouts(sync) == n * groups * (chunks - 1)
    assert torch.isnan(out[:, :, :tail.start]).all()
    torch.testing.assert_close(out[:, :, tail], want[:, :, tail], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["single", "chunked"], indirect=True)   # the one-pass tuning has its own test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_autotuned_launch_path_on_cpu(triton_cpu, path, dtype, monkeypatch):
    """The CUDA path's autotuning, run in the interpreter: triton.autotune over the interpreted kernels with a stand-in
    timer that runs each pruned config once (so every config must launch, and the launchers must not pass a tuned
    meta-parameter themselves: triton refuses that) and calls the last one fastest; y and every gradient are then
    checked against float64."""
    triton_impl = importlib.import_module("layoutgen.kernels.group_norm_silu_triton")
    timed = []

    def stand_in_timer(kernel_call, quantiles):
        kernel_call()
        timed.append(kernel_call)
        return [-float(len(timed))] * len(quantiles)   # each later config "faster": the last one is chosen

    tuned = triton_impl.build_autotuned(do_bench=stand_in_timer)
    monkeypatch.setattr(triton_impl, "_TUNED", tuned)
    monkeypatch.setattr(triton_impl, "_autotune_enabled", lambda device: True)
    compare_with_float64((2, 16, 24, 24), 4, dtype, "cpu", channels_last=dtype == torch.bfloat16, seed=33)
    used = sorted(name for name, tuner in tuned.items() if tuner.cache)
    expected = {"single": ["bwd_single", "fwd_single"], "chunked": ["bwd_dx", "bwd_partials", "fwd_apply",
                                                                     "fwd_stats"]}[path]
    assert used == expected
    assert timed, "no config was benchmarked: the pruning left one config per kernel, so nothing was tuned"
    for name in used:
        for config in tuned[name].cache.values():
            if path != "single":
                assert 512 <= 4 * config.kwargs["BLOCK_S"] <= 8192, (name, config)


def test_triton_float16(device):
    compare_with_float64((2, 16, 6, 5), 4, torch.float16, device, seed=21)


def test_triton_float32_params_with_bfloat16_input(device):
    """AMP-style: a bf16 activation with the module's fp32 weight and bias; grads come back in each one's dtype."""
    compare_with_float64((2, 16, 6, 5), 4, torch.bfloat16, device, param_dtype=torch.float32, seed=22)


def test_triton_64bit_indexing_path(device, monkeypatch):
    """INDEX_64 (taken when C * S >= 2**31) computes the same values as the 32-bit offsets, on every path."""
    triton_impl = importlib.import_module("layoutgen.kernels.group_norm_silu_triton")
    x = randn(2, 16, 6, 5, seed=23).to(device)
    w, b = randn(16, seed=24).to(device), randn(16, seed=25).to(device)
    with use_backend("triton"):
        expected = group_norm_silu(x, 4, w, b)
        flags = triton_impl._flags
        monkeypatch.setattr(triton_impl, "_flags", lambda *a: dict(flags(*a), INDEX_64=True))
        torch.testing.assert_close(group_norm_silu(x, 4, w, b), expected, rtol=0, atol=0)
        monkeypatch.setattr(triton_impl, "SINGLE_MAX_ELEMS", 0)
        torch.testing.assert_close(group_norm_silu(x, 4, w, b), expected, rtol=1e-6, atol=1e-6)
        with backend.group_norm_chunked_path.use("one-pass", "test"):
            torch.testing.assert_close(group_norm_silu(x, 4, w, b), expected, rtol=1e-6, atol=1e-6)


def test_triton_non_dense_input_and_expanded_grad(device):
    """A sliced (non-dense) input is copied once; the all-stride-0 gradient of .sum() works as is."""
    base = randn(2, 32, 6, 5, seed=26).to(device)
    x = base[:, ::2].clone().requires_grad_(True)
    x_view = base[:, ::2].requires_grad_(False)
    assert not x_view.is_contiguous()
    w = randn(16, seed=27).to(device).requires_grad_(True)
    with use_backend("triton"):
        torch.testing.assert_close(group_norm_silu(x_view, 4, w.detach()), group_norm_silu_ref(x_view, 4, w.detach()),
                                   rtol=1e-5, atol=1e-5)
        group_norm_silu(x, 4, w).sum().backward()
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    group_norm_silu_ref(xr, 4, wr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-4, atol=1e-4)


def test_triton_empty_batch(device):
    x = torch.zeros(0, 16, 5, 5, device=device, requires_grad=True)
    w = torch.ones(16, device=device, requires_grad=True)
    b = torch.zeros(16, device=device, requires_grad=True)
    with use_backend("triton"):
        y = group_norm_silu(x, 4, w, b)
        assert y.shape == x.shape
        y.sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(w.grad, torch.zeros_like(w))
    torch.testing.assert_close(b.grad, torch.zeros_like(b))


def test_triton_outputs_and_gradients_are_deterministic(device, path):
    x = randn(2, 40, 7, 9, seed=28).to(device).requires_grad_(True)
    w = randn(40, seed=29).to(device).requires_grad_(True)
    b = randn(40, seed=30).to(device).requires_grad_(True)
    dy = randn(2, 40, 7, 9, seed=31).to(device)
    runs = []
    with use_backend("triton"):
        for _ in range(2):
            y = group_norm_silu(x, 8, w, b)
            runs.append((y.detach(), *torch.autograd.grad(y, (x, w, b), dy)))
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


def test_triton_module_and_state_dict(device):
    gn = nn.GroupNorm(8, 40, eps=1e-6).to(device)
    with torch.no_grad():
        gn.weight.copy_(randn(40, seed=32))
        gn.bias.copy_(randn(40, seed=33))
    module = GroupNormSiLU(8, 40, eps=1e-6).to(device)
    module.load_state_dict(gn.state_dict())
    x = randn(2, 40, 7, 9, seed=34).to(device)
    with use_backend("triton"):
        torch.testing.assert_close(module(x), nn.SiLU()(gn(x)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch: one place (layoutgen.kernels.backend.use_triton)
# ---------------------------------------------------------------------------------------------------------------------


def test_auto_backend_uses_reference_on_cpu(monkeypatch):
    def refuse():
        raise AssertionError("the Triton kernels ran")
    monkeypatch.setattr(gns_module, "_triton_impl", refuse)
    x = randn(2, 16, 4, 4, seed=35)
    for name in ("auto", "reference"):
        with use_backend(name):
            torch.testing.assert_close(group_norm_silu(x, 4), group_norm_silu_ref(x, 4), rtol=0, atol=0)


def test_triton_backend_runs_the_kernels(triton_cpu, monkeypatch):
    calls = []
    real = gns_module._triton_impl
    monkeypatch.setattr(gns_module, "_triton_impl", lambda: calls.append(1) or real())
    with use_backend("triton"):
        group_norm_silu(randn(2, 16, 4, 4, seed=36), 4)
        # float64 keeps the reference (float32 statistics would lose its precision).
        group_norm_silu(randn(2, 16, 4, 4, seed=36, dtype=torch.float64), 4)
    assert len(calls) == 1


def test_triton_float64_takes_the_reference_and_passes_gradcheck():
    x = randn(1, 8, 3, 3, seed=37, dtype=torch.float64).requires_grad_(True)
    w = randn(8, seed=38, dtype=torch.float64).requires_grad_(True)
    with use_backend("triton"):
        assert torch.autograd.gradcheck(lambda x, w: group_norm_silu(x, 4, w), (x, w))


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    if not backend.TRITON_INSTALLED:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch\nfrom layoutgen.kernels import group_norm_silu, use_backend\n"
            "with use_backend('triton'):\n    group_norm_silu(torch.randn(1, 8, 4, 4), 4)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "RuntimeError" in proc.stderr and "TRITON_INTERPRET=1" in proc.stderr, proc.stderr[-2000:]


def test_kernels_compile_for_sm90_without_a_gpu():
    """Triton's interpreter (which runs the CPU tests) accepts code its compiler refuses: compile every kernel for an
    H100 (sm_90) in representative specialisations, in a process without TRITON_INTERPRET."""
    if not backend.TRITON_INSTALLED:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "layoutgen.kernels.group_norm_silu_triton"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled 36 GroupNorm+SiLU kernels for sm_90" in proc.stdout


@pytest.mark.parametrize("bad_name,shape", [("weight", (8,)), ("bias", (16, 1))])
def test_bad_parameter_shapes(bad_name, shape):
    x = randn(1, 16, 3, 3, seed=39)
    kwargs = {bad_name: torch.ones(shape)}
    with pytest.raises(ValueError, match=rf"{bad_name} must be a float tensor \[C\] with C=16"):
        group_norm_silu(x, 4, **kwargs)


def test_integer_input_is_refused():
    with pytest.raises(ValueError, match="floating-point"):
        group_norm_silu(torch.ones(1, 8, 3, 3, dtype=torch.int64), 4)


# ---------------------------------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile(fullgraph=True)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["affine_silu", "plain_nhwc"])
def test_opcheck(device, variant):
    x = randn(2, 16, 5, 6, seed=40).to(device)
    if variant == "plain_nhwc":
        x = x.to(memory_format=torch.channels_last)
        w = b = None
        silu = False
    else:
        w, b, silu = randn(16, seed=41).to(device), randn(16, seed=42).to(device), True
    fwd_args = (x.requires_grad_(True), None if w is None else w.requires_grad_(True),
                None if b is None else b.requires_grad_(True), 4, 1e-5, silu)
    torch.library.opcheck(torch.ops.layoutgen.group_norm_silu_fwd.default, fwd_args)
    _, mean, rstd = torch.ops.layoutgen.group_norm_silu_fwd(x.detach(), w, b, 4, 1e-5, silu)
    dy = randn(2, 16, 5, 6, seed=43).to(device)
    torch.library.opcheck(torch.ops.layoutgen.group_norm_silu_bwd.default,
                          (dy, x.detach(), None if w is None else w.detach(), None if b is None else b.detach(),
                           mean, rstd, 4, silu))


def _project_blocks():
    from layoutgen.models.components.blocks import AttentionBlock, ResNetBlock
    from layoutgen.models.encoder import Encoder
    torch.manual_seed(0)
    return {
        "resnet": (ResNetBlock(16, 32, time_dim=8, norm_groups=4), (randn(2, 16, 6, 6, seed=44), randn(2, 8, seed=45))),
        "attention": (AttentionBlock(16, num_heads=2, norm_groups=4), (randn(2, 16, 5, 5, seed=46),)),
        "encoder": (Encoder(in_channels=3, latent_channels=4, base_channels=8, downsampling_steps=1, norm_groups=4),
                    (randn(1, 3, 8, 8, seed=47),)),
    }


@pytest.mark.parametrize("name", ["resnet", "attention", "encoder"])
@pytest.mark.parametrize("kernel_backend", ["reference", "triton"])
def test_blocks_trace_without_graph_breaks(name, kernel_backend):
    if kernel_backend == "triton" and triton_skip_reason("cpu"):
        pytest.skip(triton_skip_reason("cpu"))
    torch._dynamo.reset()
    model, inputs = _project_blocks()[name]
    with use_backend(kernel_backend):
        explanation = torch._dynamo.explain(model)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", ["resnet", "attention"])
def test_blocks_compile_fullgraph_with_triton(triton_cpu, name):
    """fullgraph=True through dynamo and AOT autograd (fake tensors, register_autograd): forward and backward agree
    with eager. (aot_eager: inductor's C++ compile of whole blocks is too slow for a 2-core CI machine; the test
    below runs inductor on the op itself.)"""
    torch._dynamo.reset()
    model, inputs = _project_blocks()[name]
    with use_backend("triton"):
        eager_out = model(*inputs)
        eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(*inputs)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel_backend", ["reference", "triton"])
def test_module_compiles_with_inductor(kernel_backend):
    if kernel_backend == "triton" and triton_skip_reason("cpu"):
        pytest.skip(triton_skip_reason("cpu"))
    torch._dynamo.reset()
    module = GroupNormSiLU(4, 16)
    x = randn(2, 16, 5, 6, seed=48).requires_grad_(True)
    with use_backend(kernel_backend):
        compiled = torch.compile(module, fullgraph=True)
        y = compiled(x)
        (dx,) = torch.autograd.grad(y.square().sum(), (x,))
    xr = x.detach().clone().requires_grad_(True)
    yr = group_norm_silu_ref(xr, 4, module.weight, module.bias)
    (dxr,) = torch.autograd.grad(yr.square().sum(), (xr,))
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dxr, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_cuda_auto_backend_runs_the_kernels(monkeypatch):
    """The CUDA counterpart of test_auto_backend_uses_reference_on_cpu: auto means Triton on CUDA tensors."""
    if triton_skip_reason("cuda"):
        pytest.skip(triton_skip_reason("cuda"))
    calls = []
    real = gns_module._triton_impl
    monkeypatch.setattr(gns_module, "_triton_impl", lambda: calls.append(1) or real())
    with use_backend("auto"):
        GroupNormSiLU(4, 16).cuda()(randn(2, 16, 4, 4, seed=51).cuda())
    assert calls


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["resnet", "attention", "encoder"])
def test_cuda_blocks_compile_fullgraph(name):
    """Inductor with fullgraph=True over the project's blocks on CUDA (auto: the Triton op), against eager."""
    if triton_skip_reason("cuda"):
        pytest.skip(triton_skip_reason("cuda"))
    torch._dynamo.reset()
    model, inputs = _project_blocks()[name]
    model = model.cuda()
    inputs = tuple(t.cuda() for t in inputs)
    with use_backend("auto"):
        explanation = torch._dynamo.explain(model)(*inputs)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        out = model(*inputs)
        out = out["latent"] if isinstance(out, dict) else out
        eager_grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
        compiled = torch.compile(model, fullgraph=True)
        got = compiled(*inputs)
        got = got["latent"] if isinstance(got, dict) else got
        grads = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    # cuDNN may pick other (TF32) convolution algorithms inside the compiled graph: loose, this checks compilation.
    torch.testing.assert_close(got, out, rtol=2e-3, atol=2e-3)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-2, atol=1e-2 * max(1.0, e.abs().max().item()))


# ---------------------------------------------------------------------------------------------------------------------
# CUDA only: seed-like shapes, autotuning, 64-bit offsets (their CPU counterparts are the small-shape tests above)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(4, 32, 128, 128), (16, 256, 32, 32), (64, 512, 4, 4), (2, 64, 97, 61)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_seed_shapes(shape, dtype, channels_last):
    if triton_skip_reason("cuda"):
        pytest.skip(triton_skip_reason("cuda"))
    compare_with_float64(shape, 8, dtype, "cuda", channels_last, seed=49)


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(4, 32, 128, 128), (2, 64, 97, 61), (16, 256, 32, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_one_pass_path(shape, channels_last):
    """The one-pass chunked kernels (forward and backward) at their real chunk sizes, against float64."""
    if triton_skip_reason("cuda"):
        pytest.skip(triton_skip_reason("cuda"))
    with backend.group_norm_chunked_path.use("one-pass", "test"):
        assert importlib.import_module("layoutgen.kernels.group_norm_silu_triton")._one_pass_max_chunks(
            shape[1] // 8, shape[2] * shape[3], torch.device("cuda")) is not None
        compare_with_float64(shape, 8, torch.bfloat16, "cuda", channels_last, seed=52)


@pytest.mark.cuda
def test_cuda_one_pass_autoencoder_shape_is_deterministic_without_timeouts(monkeypatch):
    """The autoencoder's largest GroupNorm (16 x 32 x 512 x 512 bf16, 128 chunks a group), run concurrently for real:
    no program times out, y and every gradient match the two-pass kernels and are bitwise the same over repeated
    runs (the partials are merged in a fixed order whatever order the programs arrive in)."""
    if triton_skip_reason("cuda"):
        pytest.skip(triton_skip_reason("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(53)
    x, dy = (torch.randn(16, 32, 512, 512, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    w, b = (torch.randn(32, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True) for _ in range(2))
    x.requires_grad_(True)
    syncs = []   # every launch's, the tuning runs' included
    for name in ("launch_forward", "launch_backward"):
        real = getattr(one_pass, name)
        monkeypatch.setattr(one_pass, name, lambda *a, real=real: syncs.append(real(*a)) or syncs[-1])

    def run():
        y = group_norm_silu(x, 8, w, b)
        return (y.detach(), *torch.autograd.grad(y, (x, w, b), dy))

    with use_backend("triton"):
        two_pass = run()
        with backend.group_norm_chunked_path.use("one-pass", "test"):
            runs = [run() for _ in range(3)]
    assert len(syncs) >= 6 and [one_pass.timeouts(s) for s in syncs] == [0] * len(syncs)
    for other in runs[1:]:
        assert all(torch.equal(a, b_) for a, b_ in zip(runs[0], other))
    for got, want, name in zip(runs[0], two_pass, ["y", "dx", "dweight", "dbias"]):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * scale, msg=name)


@pytest.mark.cuda
def test_cuda_autotuned_path(monkeypatch):
    if triton_skip_reason("cuda"):
        pytest.skip(triton_skip_reason("cuda"))
    monkeypatch.setenv("LAYOUTGEN_TRITON_AUTOTUNE", "1")
    for shape in [(2, 32, 64, 64), (8, 64, 8, 8)]:
        compare_with_float64(shape, 8, torch.bfloat16, "cuda", seed=50)


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_more_than_2_31_elements():
    """A bf16 input of 2**31 + 2**24 elements (4.3 GB): offsets past int32 in the last sample."""
    if triton_skip_reason("cuda"):
        pytest.skip(triton_skip_reason("cuda"))
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        pytest.skip("needs 40 GB of GPU memory")
    x = torch.randn(129, 64, 512, 512, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2 ** 31
    with use_backend("triton"):
        y = group_norm_silu(x, 8)
    tail = x[-2:].float()
    torch.testing.assert_close(y[-2:].float(), group_norm_silu_ref(tail, 8), rtol=2e-2, atol=2e-2)


