"""Tests for the compiled noise-op extension (csrc/, torch.ops.layoutgen.*): the ops called directly against float64
references for every dtype and layout (N=1, sizes that are not a multiple of the vector width, sizes across the CPU
blocks and threads, non-contiguous inputs, both ends of the schedule); the fused-noise op (statistics,
reproducibility, agreement with its PyTorch reference); the errors of the C++ checks; opcheck; autograd;
torch.compile(fullgraph=True) over a training step; how the extension is found (prebuilt, JIT build, fallback with
one warning) and reported. CUDA variants are marked `cuda` and skipped without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from layoutgen.kernels import noise_ops, use_backend
from layoutgen.kernels.noise_ops import (add_noise, add_noise_philox, add_noise_philox_ref, add_noise_ref,
                                         ddim_step_ref, ddpm_step_ref, noise_ops_status, philox_normal_ref,
                                         velocity_ref)

REPO = Path(__file__).resolve().parent.parent
T = 100
BETAS = torch.linspace(1e-3, 0.2, T, dtype=torch.float64)
ACP = torch.cumprod(1 - BETAS, 0)
SQRT_ACP, SQRT_1M_ACP = ACP.sqrt(), (1 - ACP).sqrt()

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# name -> shape; "noncontiguous" is a strided slice, "channels_last" a 4-D tensor in NHWC memory order.
LAYOUTS = {
    "odd": (3, 5, 7, 9),                  # inner 315: not a multiple of any vector width
    "batch1": (1, 3, 5, 7),
    "tiny": (2, 3),                       # shorter than one vector
    "channels_last": (3, 6, 5, 7),
    "noncontiguous": (3, 4, 5, 6),
    "blocks": (3, 40001),                 # several CPU blocks per sample; two threads split a sample
    "latent": (4, 16, 32, 32),            # the seed's latents (fewer samples)
}
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-12}
ops = torch.ops.layoutgen


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    status = noise_ops_status()
    assert status.compiled, f"the compiled noise ops are not available: {status.reason}"


def make(layout: str, seed: int, dtype: torch.dtype, device: str = "cpu", scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = LAYOUTS[layout]
    if layout == "noncontiguous":
        x = (torch.randn(*shape[:-1], shape[-1] * 2, generator=g) * scale).to(dtype)[..., ::2]
    else:
        x = (torch.randn(*shape, generator=g) * scale).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x.to(device)


def timesteps(n: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """Random timesteps with both ends of the schedule (T-1 first, 0 last)."""
    t = torch.randint(0, T, (n,), generator=torch.Generator().manual_seed(seed))
    t[0] = T - 1
    if n > 1:
        t[-1] = 0
    return t.to(device)


def tables(dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The noising tables as the schedulers pass them: float64 for float64 data, float32 otherwise."""
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return SQRT_ACP.to(device, table_dtype), SQRT_1M_ACP.to(device, table_dtype)


def check_close(out: torch.Tensor, truth: torch.Tensor, eager: torch.Tensor) -> None:
    """out's error against the float64 truth is at most twice the reference path's plus a small atol."""
    assert out.dtype == eager.dtype and out.shape == truth.shape and out.device == truth.device
    err = (out.double() - truth).abs().max().item() if out.numel() else 0.0
    eager_err = (eager.double() - truth).abs().max().item() if out.numel() else 0.0
    scale = max(1.0, truth.abs().max().item()) if out.numel() else 1.0
    assert err <= 2 * eager_err + ATOL[out.dtype] * scale, f"error {err:.3g} vs reference {eager_err:.3g}"


def as64(*xs):
    return tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in xs)


# ----------------------------------------------------------------------------------------------------------------------
# The ops called directly.
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", ["add_noise", "velocity"])
def test_noise_mix_ops(name, layout, dtype, device):
    op, ref = (ops.add_noise, add_noise_ref) if name == "add_noise" else (ops.velocity, velocity_ref)
    x0, noise = make(layout, 1, dtype, device, 1.5), make(layout, 2, dtype, device)
    t = timesteps(x0.shape[0], 3, device)
    a, b = tables(dtype, device)
    out = op(x0, noise, t, a, b)
    check_close(out, ref(*as64(x0, noise), t, SQRT_ACP, SQRT_1M_ACP), ref(x0, noise, t, a, b))
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_noise_mix_mixed_layouts_and_float64_tables(device):
    """noise in another layout than x0 is copied to x0's; float64 tables with float32 data are read in float64."""
    x0 = make("channels_last", 4, torch.float32, device)
    noise = make("channels_last", 5, torch.float32, device).contiguous()
    t = timesteps(3, 6, device)
    out = ops.add_noise(x0, noise, t, SQRT_ACP.to(device), SQRT_1M_ACP.to(device))
    assert out.is_contiguous(memory_format=torch.channels_last)
    check_close(out, add_noise_ref(*as64(x0, noise), t, SQRT_ACP, SQRT_1M_ACP),
                add_noise_ref(x0, noise, t, SQRT_ACP, SQRT_1M_ACP))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x = torch.empty(0, 3, 4, device=device)
    t = torch.empty(0, dtype=torch.long, device=device)
    assert ops.add_noise(x, x, t, *tables(x.dtype, device)).shape == (0, 3, 4)
    x_prev, x0 = ops.ddim_step(x, x, t, t, ACP.to(device), 0.0, "epsilon", False, 1.0, None, 1.0)
    assert x_prev.shape == x0.shape == (0, 3, 4)


def step_inputs(layout: str, dtype: torch.dtype, device: str, seed: int):
    m, x, z = (make(layout, seed + k, dtype, device, s) for k, s in enumerate((1.0, 2.0, 1.0)))
    n = x.shape[0]
    t = timesteps(n, seed, device)
    prev_t = (t.cpu() - torch.randint(1, 11, (n,), generator=torch.Generator().manual_seed(seed))).clamp(min=-1)
    return m, x, z, t, prev_t.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["odd", "batch1", "tiny", "channels_last", "noncontiguous", "blocks"])
def test_ddpm_step_op(layout, dtype, device):
    m, x, z, t, prev_t = step_inputs(layout, dtype, device, 10)
    acp = ACP.to(device)
    for prediction_type in ("epsilon", "v", "sample"):
        for variance_type, clip, noise in (("fixed_small", False, z), ("fixed_large", True, z), ("fixed_small", True,
                                                                                                   None)):
            args = (prediction_type, variance_type, clip, 1.0, noise)
            out = ops.ddpm_step(m, x, t, prev_t, acp, *args)
            truth = ddpm_step_ref(*as64(m, x), t, prev_t, ACP, *as64(*args))
            eager = ddpm_step_ref(m, x, t, prev_t, acp, *args)
            check_close(out[0], truth[0], eager[0])
            check_close(out[1], truth[1], eager[1])
            if layout == "channels_last":
                assert out[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["odd", "batch1", "tiny", "channels_last", "noncontiguous", "blocks"])
def test_ddim_step_op(layout, dtype, device):
    m, x, z, t, prev_t = step_inputs(layout, dtype, device, 20)
    prev_t = prev_t - 3  # some below -1: still "the data"
    acp = ACP.to(device)
    for prediction_type in ("epsilon", "v", "sample"):
        for eta, clip, noise, final in ((0.0, False, z, 1.0), (0.5, True, z, ACP[0].item()), (1.0, False, None, 1.0)):
            args = (eta, prediction_type, clip, 1.0, noise, final)
            out = ops.ddim_step(m, x, t, prev_t, acp, *args)
            truth = ddim_step_ref(*as64(m, x), t, prev_t, ACP, *as64(*args))
            eager = ddim_step_ref(m, x, t, prev_t, acp, *args)
            check_close(out[0], truth[0], eager[0])
            check_close(out[1], truth[1], eager[1])


# ----------------------------------------------------------------------------------------------------------------------
# The fused-noise op (Philox).
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_philox_statistics_and_reproducibility(dtype, device):
    x0 = torch.zeros(8, 4, 64, 64, dtype=dtype, device=device)
    t = torch.full((8,), T - 1, device=device)
    a, b = tables(dtype, device)
    x_t, noise = add_noise_philox(x0, t, a, b, seed=1234, offset=0)
    z = noise.double()
    assert noise.dtype == dtype and abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert abs((z ** 3).mean().item()) < 0.03 and abs((z ** 4).mean().item() - 3) < 0.06  # skew 0, kurtosis 3
    again = add_noise_philox(x0, t, a, b, seed=1234, offset=0)
    assert torch.equal(again[0], x_t) and torch.equal(again[1], noise)
    other_seed = add_noise_philox(x0, t, a, b, seed=1235, offset=0)[1].double()
    other_offset = add_noise_philox(x0, t, a, b, seed=1234, offset=1)[1].double()
    for other in (other_seed, other_offset):  # independent streams: uncorrelated
        assert abs(torch.corrcoef(torch.stack([z.flatten(), other.flatten()]))[0, 1].item()) < 0.01


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["odd", "batch1", "tiny", "channels_last", "noncontiguous", "blocks"])
def test_philox_matches_reference_and_add_noise(layout, dtype, device):
    x0 = make(layout, 30, dtype, device)
    t = timesteps(x0.shape[0], 31, device)
    a, b = tables(dtype, device)
    x_t, noise = ops.add_noise_philox(x0, t, a, b, 7, 3)
    # x_t is add_noise with the returned noise (exactly on the CPU; on CUDA up to a contracted multiply-add).
    exact = ops.add_noise(x0, noise, t, a, b)
    if device == "cpu":
        assert torch.equal(x_t, exact)
    else:
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(x_t, exact, rtol=2 * eps, atol=2 * eps)
    # The noise is the reference's Philox stream up to the last bits of log / sin / cos.
    ref_x_t, ref_noise = add_noise_philox_ref(x0, t, a, b, 7, 3)
    tol = {torch.float64: 1e-5, torch.float32: 1e-5}.get(dtype, 2 * torch.finfo(dtype).eps)
    torch.testing.assert_close(noise, ref_noise, rtol=tol, atol=tol)
    torch.testing.assert_close(x_t, ref_x_t, rtol=tol, atol=tol)
    # The stream depends on the memory position only: the same numbers for a contiguous tensor of the same size.
    flat = philox_normal_ref(x0.numel(), 7, 3, device)
    order = noise if noise.is_contiguous() else noise.permute(0, 2, 3, 1)
    torch.testing.assert_close(order.contiguous().flatten().float(), flat.to(dtype).float(), rtol=tol, atol=tol)


def test_philox_independent_of_thread_count():
    x0 = make("blocks", 40, torch.float32)
    t = timesteps(3, 41)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.add_noise_philox(x0, t, *tables(torch.float32, "cpu"), 5, 0)
        torch.set_num_threads(max(2, previous))
        many = ops.add_noise_philox(x0, t, *tables(torch.float32, "cpu"), 5, 0)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("words,expected", [
    ((0, 0, 0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 6, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
], ids=["zeros", "ones", "pi"])
def test_philox_reference_is_philox4x32_10(words, expected):
    """Random123's known-answer vectors (tests/kat_vectors, "philox4x32 10": counter[4] key[2] -> result[4])."""
    from layoutgen.kernels.noise_ops import philox4x32_10_ref

    block = words[0] | words[1] << 32
    block = block - 2 ** 64 if block >= 2 ** 63 else block  # as int64
    out = philox4x32_10_ref(torch.tensor([block]), words[2] | words[3] << 32, words[4] | words[5] << 32)
    assert tuple(out[0].tolist()) == expected


# ----------------------------------------------------------------------------------------------------------------------
# Errors of the C++ checks (ValueError, naming the op and the argument).
# ----------------------------------------------------------------------------------------------------------------------

X = torch.zeros(2, 3, 4, 4)
TT = torch.tensor([0, 5])
A, B = SQRT_ACP.float(), SQRT_1M_ACP.float()


@pytest.mark.parametrize("call,match", [
    (lambda: ops.add_noise(X, X, torch.tensor([0, T]), A, B), r"add_noise: t must be in \[0, 100\), got 100"),
    (lambda: ops.add_noise(X, X, torch.tensor([-1, 0]), A, B), r"t must be in \[0, 100\), got -1 for sample 0"),
    (lambda: ops.add_noise(X, X, TT.int(), A, B), r"t must be an int64 tensor"),
    (lambda: ops.add_noise(X, X, torch.tensor([1, 2, 3]), A, B), r"t must have shape \[N\] = \[2\]"),
    (lambda: ops.add_noise(X, X[:, :2], TT, A, B), r"noise shape \[2, 2, 4, 4\] does not match x0 shape"),
    (lambda: ops.add_noise(X, X.half(), TT, A, B), r"noise dtype Half does not match x0 dtype Float"),
    (lambda: ops.add_noise(X.long(), X.long(), TT, A, B), r"x0 must be float16, bfloat16, float32 or float64"),
    (lambda: ops.add_noise(X, X, TT, A[None], B), r"sqrt_alphas_cumprod must be a non-empty 1-D"),
    (lambda: ops.add_noise(X, X, TT, A, B[:50]), r"sqrt_one_minus_alphas_cumprod has 50 entries"),
    (lambda: ops.add_noise(X, X, TT, A.half(), B), r"sqrt_alphas_cumprod must be float32 or float64"),
    (lambda: ops.velocity(X, X, torch.tensor([0, 100]), A, B), r"velocity: t must be in \[0, 100\)"),
    (lambda: ops.add_noise_philox(X, TT, A, B, 0, -1), r"add_noise_philox: offset must be >= 0"),
    (lambda: ops.ddpm_step(X, X, TT, torch.tensor([-1, 5]), ACP, "epsilon", "fixed_small", False, 1.0, None),
     r"ddpm_step: prev_t must be < t .* got prev_t=5 for t=5"),
    (lambda: ops.ddpm_step(X, X, TT, TT - 1, ACP, "v_prediction", "fixed_small", False, 1.0, None),
     r"prediction_type must be one of \['epsilon', 'v', 'sample'\], got 'v_prediction'"),
    (lambda: ops.ddpm_step(X, X, TT, TT - 1, ACP, "epsilon", "learned", False, 1.0, None),
     r"variance_type must be one of"),
    (lambda: ops.ddpm_step(X, X, TT, TT - 1, ACP, "epsilon", "fixed_small", True, -1.0, None),
     r"clip_range must be >= 0"),
    (lambda: ops.ddpm_step(X[:1], X, TT, TT - 1, ACP, "epsilon", "fixed_small", False, 1.0, None),
     r"model_output shape \[1, 3, 4, 4\] does not match x_t"),
    (lambda: ops.ddpm_step(X, X, TT, TT - 1, ACP, "epsilon", "fixed_small", False, 1.0, X[..., :2]),
     r"variance_noise shape"),
    (lambda: ops.ddim_step(X, X, TT, TT - 1, ACP, 1.5, "epsilon", False, 1.0, None, 1.0), r"eta must be in \[0.0, 1.0\]"),
    (lambda: ops.ddim_step(X, X, TT, TT - 1, ACP, 0.0, "epsilon", False, 1.0, None, 2.0), r"final_alpha_cumprod"),
    (lambda: ops.ddim_step(X, X, torch.tensor([5, 100]), TT, ACP, 0.0, "epsilon", False, 1.0, None, 1.0),
     r"ddim_step: t must be in \[0, 100\), got 100 for sample 1"),
])
def test_op_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_public_functions_keep_their_checks_on_the_compiled_path():
    with pytest.raises(ValueError, match=r"add_noise: t must be in \[0, 100\), got \[100\]"):
        add_noise(X, X, torch.tensor([0, T]), A, B)
    with pytest.raises(ValueError, match=r"add_noise_philox: seed must be in \[0, "):
        add_noise_philox(X, TT, A, B, seed=-1)
    with pytest.raises(ValueError, match=r"add_noise_philox: offset must be an int"):
        add_noise_philox(X, TT, A, B, seed=0, offset=1.5)


# ----------------------------------------------------------------------------------------------------------------------
# opcheck, autograd, torch.compile.
# ----------------------------------------------------------------------------------------------------------------------

def opcheck_cases(device: str):
    x = make("odd", 50, torch.float32, device)
    cl = make("channels_last", 51, torch.float16, device)
    t, tc = timesteps(3, 52, device), timesteps(3, 53, device)
    a, b = tables(torch.float32, device)
    acp = ACP.to(device)
    xg = x.clone().requires_grad_()
    ng = make("odd", 54, torch.float32, device).requires_grad_()
    return [
        (ops.add_noise.default, (xg, ng, t, a, b)),
        (ops.add_noise.default, (cl, cl, tc, a, b)),
        (ops.velocity.default, (xg, ng, t, a, b)),
        (ops.add_noise_philox.default, (xg, t, a, b, 3, 1)),
        (ops.add_noise_philox.default, (cl, tc, a, b, 3, 1)),
        (ops.ddpm_step.default, (x, x, t, (t - 1), acp, "v", "fixed_small", True, 1.0, x)),
        (ops.ddpm_step.default, (cl, cl, tc, (tc - 2), acp, "epsilon", "fixed_large", False, 1.0, None)),
        (ops.ddim_step.default, (x, x, t, (t - 5), acp, 0.5, "sample", False, 1.0, x, 1.0)),
        (ops.ddim_step.default, (cl, cl, tc, (tc - 5), acp, 0.0, "epsilon", True, 2.0, None, 0.9)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in opcheck_cases(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_through_the_compiled_ops(device):
    x0 = make("odd", 60, torch.float64, device)[:2, :2, :3, :3].clone().requires_grad_()
    noise = make("odd", 61, torch.float64, device)[:2, :2, :3, :3].clone().requires_grad_()
    t = torch.tensor([T - 1, 0], device=device)
    a, b = SQRT_ACP.to(device), SQRT_1M_ACP.to(device)
    assert torch.autograd.gradcheck(lambda u, v: ops.add_noise(u, v, t, a, b), (x0, noise))
    assert torch.autograd.gradcheck(lambda u, v: ops.velocity(u, v, t, a, b), (x0, noise))
    assert torch.autograd.gradcheck(lambda u: ops.add_noise_philox(u, t, a, b, 1, 2)[0], (x0,))
    # fp16 gradients are the coefficients times the gradient, rounded once.
    x16 = make("odd", 62, torch.float16, device).requires_grad_()
    t3 = timesteps(3, 63, device)
    a32, b32 = tables(torch.float32, device)
    ops.add_noise(x16, x16.detach(), t3, a32, b32).sum().backward()
    expected = a32.double()[t3].float().to(torch.float16).reshape(3, 1, 1, 1).expand_as(x16)
    assert x16.grad.dtype == torch.float16 and torch.equal(x16.grad, expected)


def small_training_step(device: str, with_philox: bool):
    """A diffusion training step: noise latents with the scheduler, predict the target with a small conv net."""
    from layoutgen.models.components.scheduler import CosineScheduler

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(),
                              torch.nn.Conv2d(8, 4, 3, padding=1)).to(device)
    scheduler = CosineScheduler(num_steps=500, prediction_type="v")
    tabs = scheduler._device_tables(torch.device(device), torch.float32)

    def step(x0, noise, t):
        if with_philox:
            x_t, noise = add_noise_philox(x0, t, tabs["sqrt_alphas_cumprod"], tabs["sqrt_one_minus_alphas_cumprod"],
                                          seed=11, offset=3)
        else:
            x_t, _ = scheduler.add_noise(x0, t, noise=noise)
        target = scheduler.training_target(x0, noise, t)
        return torch.nn.functional.mse_loss(net(x_t), target)

    return net, step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_philox", [False, True], ids=["add_noise", "philox"])
def test_compile_fullgraph_training_step(device, with_philox):
    net, step = small_training_step(device, with_philox)
    x0 = torch.randn(4, 4, 8, 8, device=device, requires_grad=True)
    noise = torch.randn(4, 4, 8, 8, device=device)
    t = torch.tensor([0, 17, 250, 499], device=device)

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    eager_loss = step(x0, noise, t)
    eager_grads = torch.autograd.grad(eager_loss, [x0, *net.parameters()])
    # fullgraph=True raises on any graph break; the recorded graph must hold the compiled op itself.
    loss = torch.compile(step, fullgraph=True, backend=recording_backend)(x0, noise, t)
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes}
    assert ("layoutgen.add_noise_philox" if with_philox else "layoutgen.add_noise") in targets
    assert "layoutgen.velocity" in targets
    # AOT autograd (fake tensors + the registered autograd formula) and inductor give the eager loss and gradients.
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        loss = torch.compile(step, fullgraph=True, backend=backend)(x0, noise, t)
        grads = torch.autograd.grad(loss, [x0, *net.parameters()])
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


def test_compile_philox_new_offsets_do_not_recompile_each_step():
    """seed and offset are SymInt in the schema: after one recompile (automatic dynamic) a new offset per training
    step reuses the graph."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    noised = torch.compile(lambda x, t, offset: add_noise_philox(x, t, A, B, seed=5, offset=offset), fullgraph=True,
                           backend=counting_backend)
    for offset in range(6):
        x_t, noise = noised(X, TT, offset)
        assert torch.equal(noise, ops.add_noise_philox(X, TT, A, B, 5, offset)[1])
    assert len(graphs) <= 2
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------------------
# Backend switch: compiled vs reference in one process.
# ----------------------------------------------------------------------------------------------------------------------

def test_backend_switch_picks_the_path(monkeypatch):
    calls = []
    real = torch.ops.layoutgen.add_noise

    class Spy:
        def __call__(self, *args):
            calls.append(args)
            return real(*args)

    monkeypatch.setattr(noise_ops.torch.ops.layoutgen, "add_noise", Spy(), raising=False)
    x = make("odd", 70, torch.float32)
    t = timesteps(3, 71)
    with use_backend("reference"):
        ref = add_noise(x, x, t, A, B)
    assert not calls
    with use_backend("auto"):
        out = add_noise(x, x, t, A, B)
    assert len(calls) == 1
    torch.testing.assert_close(out, ref)
    # Mixed dtypes keep the reference's semantics (noise used in its own precision).
    add_noise(x, x.double(), t, A, B)
    assert len(calls) == 1


def test_steps_with_autograd_use_the_reference():
    m = make("odd", 72, torch.float64).requires_grad_()
    x = make("odd", 73, torch.float64)
    t = timesteps(3, 74)
    x_prev, _ = noise_ops.ddim_step(m, x, t, t - 1, ACP, 0.0, "epsilon")
    assert x_prev.requires_grad
    with torch.no_grad():
        assert not noise_ops.ddim_step(m, x, t, t - 1, ACP, 0.0, "epsilon")[0].requires_grad


# ----------------------------------------------------------------------------------------------------------------------
# How the extension is found and reported.
# ----------------------------------------------------------------------------------------------------------------------

def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "LAYOUTGEN_KERNEL_BACKEND"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=900)


FALLBACK_PROBE = """
import warnings, torch
warnings.simplefilter("always")
from layoutgen.kernels import noise_ops as no
x = torch.randn(2, 3, 4); t = torch.tensor([0, 9]); acp = torch.linspace(0.99, 0.1, 10, dtype=torch.float64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        out = no.add_noise(x, x, t, acp.sqrt(), (1 - acp).sqrt())
        no.ddim_step(x, x, t, t - 1, acp)
assert torch.equal(out, no.add_noise_ref(x, x, t, acp.sqrt(), (1 - acp).sqrt()))
print("STATUS", no.noise_ops_status().path)
print("WARNINGS", len([w for w in caught if "noise ops run on the PyTorch references" in str(w.message)]))
print("REASON", no.noise_ops_status().reason)
"""


def test_fallback_warns_once_and_says_why(tmp_path):
    proc = run_python(FALLBACK_PROBE, LAYOUTGEN_NOISE_OPS="jit", LAYOUTGEN_CSRC_DIR=str(tmp_path / "missing"))
    assert proc.returncode == 0, proc.stderr
    assert "STATUS reference" in proc.stdout and "WARNINGS 1" in proc.stdout
    assert "C++ sources are not at" in proc.stdout


def test_switched_off_uses_the_references_without_warning():
    proc = run_python(FALLBACK_PROBE, LAYOUTGEN_NOISE_OPS="off")
    assert proc.returncode == 0, proc.stderr
    assert "STATUS reference" in proc.stdout and "WARNINGS 0" in proc.stdout


@pytest.mark.slow
def test_jit_build_on_first_use(tmp_path):
    """Without layoutgen._C the first call builds csrc/ with torch.utils.cpp_extension.load into the cache folder,
    and a second process reuses the cached build."""
    code = """
import torch
from layoutgen.kernels import noise_ops as no
assert no.noise_ops_status(build=False).path == "pending"
x = torch.randn(2, 3, 40); t = torch.tensor([0, 9]); acp = torch.linspace(0.99, 0.1, 10, dtype=torch.float64)
out = no.add_noise(x, x, t, acp.sqrt(), (1 - acp).sqrt())
s = no.noise_ops_status()
assert torch.allclose(out, no.add_noise_ref(x, x, t, acp.sqrt(), (1 - acp).sqrt()))
print("STATUS", s.path, s.devices, s.location)
"""
    # The CPU sources only: the CUDA build is checked by setup.py on a GPU machine and by test_cuda_compile.py.
    env = {"LAYOUTGEN_NOISE_OPS": "jit", "LAYOUTGEN_CACHE_DIR": str(tmp_path / "cache"), "LAYOUTGEN_BUILD_CUDA": "0"}
    for _ in range(2):
        proc = run_python(code, **env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "STATUS jit ('cpu',)" in proc.stdout
    assert list((tmp_path / "cache").rglob("layoutgen_noise_ops*.so"))


def test_status_report_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "layoutgen.kernels.noise_ops"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "noise ops: compiled (layoutgen._C" in proc.stdout and "why:" in proc.stdout
    assert "self-check: add_noise max |compiled - reference| = 0.00e+00" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr


def test_layoutgen_info_names_the_noise_op_path(capsys):
    from layoutgen.cli import main

    assert main(["info"]) == 0
    assert "noise_ops: compiled (layoutgen._C" in capsys.readouterr().out
    with use_backend("reference"):
        main(["info"])
    assert "noise_ops: reference (kernel backend 'reference'" in capsys.readouterr().out


def test_no_warning_when_compiled():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add_noise(X, X, TT, A, B)
