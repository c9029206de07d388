"""Tests for layoutgen.kernels.noise_ops, run on both paths of the kernel backend switch: the compiled extension
(backend "auto": torch.ops.layoutgen.*) and the PyTorch references (backend "reference"). add_noise, velocity,
ddpm_step and ddim_step against the same formulas written out per sample in float64, in fp32 / bf16 / fp16 (the error
must be at most twice that of the same arithmetic done eagerly in the low dtype, plus a small atol), over odd,
batch-1, non-contiguous and channels_last inputs and both ends of the schedule; agreement of the two paths; argument
errors; gradients. The extension's own tests (ops called directly, the fused-noise op, opcheck, torch.compile, the
build fallbacks, CUDA) are in test_noise_ops_extension.py."""

from __future__ import annotations

import math

import pytest
import torch

from layoutgen.kernels import (add_noise, add_noise_ref, ddim_step, ddim_step_ref, ddpm_step, ddpm_step_ref,
                               get_backend, noise_ops_status, use_backend, velocity, velocity_ref)


@pytest.fixture(autouse=True, params=["auto", "reference"], ids=["compiled", "reference"])
def backend(request):
    """Every test runs on the compiled ops ("auto") and on the references; "auto" must really be compiled here."""
    if request.param == "auto":
        status = noise_ops_status()
        assert status.compiled and "cpu" in status.devices, f"the compiled noise ops are not available: {status.reason}"
    with use_backend(request.param):
        yield request.param


def assert_matches_reference(out, expected) -> None:
    """The reference path is the reference (bitwise); the compiled ops run the same operations in the same order,
    so they may differ only where a compiler fuses a multiply-add (last bits)."""
    outs, exps = (out, expected) if isinstance(out, tuple) else ((out,), (expected,))
    for o, e in zip(outs, exps):
        if get_backend() == "reference":
            torch.testing.assert_close(o, e, rtol=0, atol=0)
        else:
            eps = torch.finfo(o.dtype).eps
            scale = max(1.0, e.abs().max().item())
            torch.testing.assert_close(o, e, rtol=2 * eps, atol=2 * eps * scale)


T = 100
# A DDPM-like linear schedule over 100 steps: acp runs from 0.999 down to ~5e-5, so x0 predicted from epsilon at
# t = T-1 is ~150x the input (a real test of the low-precision paths).
BETAS = torch.linspace(1e-3, 0.2, T, dtype=torch.float64)
ACP = torch.cumprod(1 - BETAS, 0)
SQRT_ACP = ACP.sqrt()
SQRT_1M_ACP = (1 - ACP).sqrt()

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Input layouts by name -> shape; make() builds a fresh random tensor in that layout.
LAYOUTS = {
    "odd": (3, 5, 7, 9),
    "batch1": (1, 3, 5, 7),
    "flat": (4, 11),
    "channels_last": (3, 4, 6, 5),
    "noncontiguous": (3, 4, 5, 6),
}
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-12}


def make(layout: str, seed: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = LAYOUTS[layout]
    if layout == "noncontiguous":
        x = (torch.randn(*shape[:-1], shape[-1] * 2, generator=g) * scale).to(dtype)[..., ::2]
        assert not x.is_contiguous()
        return x
    x = (torch.randn(*shape, generator=g) * scale).to(dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def timesteps(n: int, seed: int) -> torch.Tensor:
    """Random timesteps with both ends of the schedule present (T-1 first, 0 last; a single sample gets T-1)."""
    t = torch.randint(0, T, (n,), generator=torch.Generator().manual_seed(seed))
    t[0] = T - 1
    if n > 1:
        t[-1] = 0
    return t


def check_close(out: torch.Tensor, truth: torch.Tensor, eager: torch.Tensor, dtype: torch.dtype) -> None:
    """out's error against the float64 truth is at most twice eager's (same arithmetic in `dtype`) plus a small atol."""
    assert out.dtype == dtype and out.shape == truth.shape
    assert torch.isfinite(truth).all()
    err = (out.double() - truth).abs().max().item()
    eager_err = (eager.double() - truth).abs().max().item()
    scale = max(1.0, truth.abs().max().item())
    assert err <= 2 * eager_err + ATOL[dtype] * scale, f"error {err:.3g} vs eager {eager_err:.3g} in {dtype}"


# ----------------------------------------------------------------------------------------------------------------------
# The formulas, written out per sample with Python-float coefficients; `dt` is the dtype the arithmetic runs in
# (float64 for the truth, the test dtype for the eager baseline).
# ----------------------------------------------------------------------------------------------------------------------

def manual_add_noise(x0, noise, t, dt):
    out = []
    for i, ti in enumerate(t.tolist()):
        a, b = math.sqrt(ACP[ti].item()), math.sqrt(1 - ACP[ti].item())
        out.append(a * x0[i].to(dt) + b * noise[i].to(dt))
    return torch.stack(out)


def manual_velocity(x0, noise, t, dt):
    out = []
    for i, ti in enumerate(t.tolist()):
        a, b = math.sqrt(ACP[ti].item()), math.sqrt(1 - ACP[ti].item())
        out.append(a * noise[i].to(dt) - b * x0[i].to(dt))
    return torch.stack(out)


def manual_x0_eps(m, x, acp_t, prediction_type):
    a, b = math.sqrt(acp_t), math.sqrt(1 - acp_t)
    if prediction_type == "epsilon":
        return (x - b * m) / a, m
    if prediction_type == "v":
        return a * x - b * m, a * m + b * x
    return m, (x - a * m) / b


def manual_ddpm(m, x, t, prev_t, prediction_type, variance_type, clip, noise, dt):
    x_prev, x0s = [], []
    for i, (ti, pi) in enumerate(zip(t.tolist(), prev_t.tolist())):
        acp_t = ACP[ti].item()
        acp_prev = ACP[pi].item() if pi >= 0 else 1.0
        beta_j = 1 - acp_t / acp_prev                        # the beta of the jump t -> prev_t
        xi = x[i].to(dt)
        x0, _ = manual_x0_eps(m[i].to(dt), xi, acp_t, prediction_type)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        mean = (math.sqrt(acp_prev) * beta_j / (1 - acp_t)) * x0 + (math.sqrt(1 - beta_j) * (1 - acp_prev)
                                                                     / (1 - acp_t)) * xi
        if noise is not None and ti > 0:
            var = max((1 - acp_prev) / (1 - acp_t) * beta_j, 1e-20) if variance_type == "fixed_small" else beta_j
            mean = mean + math.sqrt(var) * noise[i].to(dt)
        x_prev.append(mean)
        x0s.append(x0)
    return torch.stack(x_prev), torch.stack(x0s)


def manual_ddim(m, x, t, prev_t, eta, prediction_type, clip, noise, final, dt):
    x_prev, x0s = [], []
    for i, (ti, pi) in enumerate(zip(t.tolist(), prev_t.tolist())):
        acp_t = ACP[ti].item()
        acp_prev = ACP[pi].item() if pi >= 0 else final
        xi = x[i].to(dt)
        x0, eps = manual_x0_eps(m[i].to(dt), xi, acp_t, prediction_type)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
            eps = (xi - math.sqrt(acp_t) * x0) / math.sqrt(1 - acp_t)
        sigma = eta * math.sqrt((1 - acp_prev) / (1 - acp_t)) * math.sqrt(1 - acp_t / acp_prev)
        out = math.sqrt(acp_prev) * x0 + math.sqrt(max(1 - acp_prev - sigma ** 2, 0.0)) * eps
        if noise is not None and eta > 0:
            out = out + sigma * noise[i].to(dt)
        x_prev.append(out)
        x0s.append(x0)
    return torch.stack(x_prev), torch.stack(x0s)


# ----------------------------------------------------------------------------------------------------------------------
# Values.
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("op,ref,manual", [(add_noise, add_noise_ref, manual_add_noise),
                                           (velocity, velocity_ref, manual_velocity)], ids=["add_noise", "velocity"])
def test_noising_ops_match_manual(op, ref, manual, layout, dtype):
    seed = len(layout) * 31 + DTYPES.index(dtype)
    x0, noise = make(layout, seed, dtype, 1.5), make(layout, seed + 1, dtype)
    t = timesteps(x0.shape[0], seed)
    tables = (SQRT_ACP.float(), SQRT_1M_ACP.float())  # what the schedulers pass for non-float64 data
    out = op(x0, noise, t, *tables)
    truth = manual(x0, noise, t, torch.float64)
    check_close(out, truth, manual(x0, noise, t, dtype), dtype)
    assert_matches_reference(out, ref(x0, noise, t, *tables))
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("op,manual", [(add_noise, manual_add_noise), (velocity, manual_velocity)],
                         ids=["add_noise", "velocity"])
def test_noising_ops_float64_stays_float64(op, manual):
    x0, noise = make("odd", 1, torch.float64), make("odd", 2, torch.float64)
    t = timesteps(x0.shape[0], 3)
    out = op(x0, noise, t, SQRT_ACP, SQRT_1M_ACP)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, manual(x0, noise, t, torch.float64), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("t_end", [0, T - 1])
def test_scalar_timestep_broadcasts(t_end):
    x0, noise = make("odd", 5, torch.float32), make("odd", 6, torch.float32)
    per_sample = torch.full((x0.shape[0],), t_end, dtype=torch.long)
    expected = add_noise(x0, noise, per_sample, SQRT_ACP, SQRT_1M_ACP)
    for t in (t_end, torch.tensor(t_end)):
        torch.testing.assert_close(add_noise(x0, noise, t, SQRT_ACP, SQRT_1M_ACP), expected, rtol=0, atol=0)
    # At t = 0 almost no noise, at T-1 almost all noise.
    a = SQRT_ACP[t_end].item()
    assert (a > 0.99) if t_end == 0 else (a < 0.01)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "sample"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_ddpm_step_matches_manual(dtype, prediction_type, variance_type, clip):
    for k, layout in enumerate(LAYOUTS):
        seed = 100 * k + DTYPES.index(dtype)
        m, x, z = make(layout, seed, dtype), make(layout, seed + 1, dtype, 2.0), make(layout, seed + 2, dtype)
        n = x.shape[0]
        t = timesteps(n, seed)
        # Jumps of 1..10 steps (prev_t = -1 ends at the data); the sample at t = 0 gets no noise.
        prev_t = (t - torch.randint(1, 11, (n,), generator=torch.Generator().manual_seed(seed))).clamp(min=-1)
        for noise in (z, None):
            args = (m, x, t, prev_t, ACP, prediction_type, variance_type, clip is not None, clip or 1.0, noise)
            x_prev, x0 = ddpm_step(*args)
            truth = manual_ddpm(m, x, t, prev_t, prediction_type, variance_type, clip, noise, torch.float64)
            eager = manual_ddpm(m, x, t, prev_t, prediction_type, variance_type, clip, noise, dtype)
            check_close(x_prev, truth[0], eager[0], dtype)
            check_close(x0, truth[1], eager[1], dtype)
            ref = ddpm_step_ref(*args)
            assert_matches_reference((x_prev, x0), ref)
            if layout == "channels_last":
                assert x_prev.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_ddim_step_matches_manual(dtype, prediction_type, eta, clip):
    for k, layout in enumerate(LAYOUTS):
        seed = 200 * k + DTYPES.index(dtype)
        m, x, z = make(layout, seed, dtype), make(layout, seed + 1, dtype, 2.0), make(layout, seed + 2, dtype)
        n = x.shape[0]
        t = timesteps(n, seed)
        prev_t = t - torch.randint(1, 21, (n,), generator=torch.Generator().manual_seed(seed))  # may go below -1
        final = 1.0 if k % 2 == 0 else ACP[0].item()  # diffusers' set_alpha_to_one True / False
        args = (m, x, t, prev_t, ACP, eta, prediction_type, clip is not None, clip or 1.0, z, final)
        x_prev, x0 = ddim_step(*args)
        truth = manual_ddim(m, x, t, prev_t, eta, prediction_type, clip, z, final, torch.float64)
        eager = manual_ddim(m, x, t, prev_t, eta, prediction_type, clip, z, final, dtype)
        check_close(x_prev, truth[0], eager[0], dtype)
        check_close(x0, truth[1], eager[1], dtype)
        assert_matches_reference((x_prev, x0), ddim_step_ref(*args))


def test_steps_float64_match_manual_exactly():
    m, x, z = (make("odd", s, torch.float64) for s in (1, 2, 3))
    # Ending at the data from t = 2 (prev_t = -1): fixed_small's variance is 0, clamped to 1e-20 as diffusers does.
    t, prev_t = torch.tensor([T - 1, 2, 0]), torch.tensor([T - 4, -1, -1])
    for variance_type in ("fixed_small", "fixed_large"):
        out = ddpm_step(m, x, t, prev_t, ACP, "v", variance_type, True, 1.0, z)
        expected = manual_ddpm(m, x, t, prev_t, "v", variance_type, 1.0, z, torch.float64)
        assert out[0].dtype == torch.float64
        torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)
    out = ddim_step(m, x, t, prev_t, ACP, 0.3, "epsilon", False, 1.0, z, 1.0)
    torch.testing.assert_close(out, manual_ddim(m, x, t, prev_t, 0.3, "epsilon", None, z, 1.0, torch.float64),
                               rtol=1e-14, atol=1e-14)


def test_ddpm_no_noise_at_t0_and_noise_elsewhere():
    m, x, z = (make("odd", s, torch.float64) for s in (7, 8, 9))
    t = torch.tensor([0, 5, 0])
    prev_t = t - 1
    noisy, _ = ddpm_step(m, x, t, prev_t, ACP, variance_noise=z)
    mean, x0 = ddpm_step(m, x, t, prev_t, ACP, variance_noise=None)
    assert torch.equal(noisy[0], mean[0]) and torch.equal(noisy[2], mean[2])
    assert not torch.allclose(noisy[1], mean[1])
    # From t = 0 to the data the posterior mean is the predicted x0.
    torch.testing.assert_close(mean[0], x0[0], rtol=1e-12, atol=1e-12)


def test_ddim_eta0_ignores_noise_and_is_deterministic():
    m, x, z = (make("odd", s, torch.float32) for s in (10, 11, 12))
    t, prev_t = torch.tensor([90, 50, 3]), torch.tensor([80, 40, -7])
    a = ddim_step(m, x, t, prev_t, ACP, eta=0.0, variance_noise=z)
    b = ddim_step(m, x, t, prev_t, ACP, eta=0.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------------------------------------------------
# Gradients.
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", [add_noise, velocity], ids=["add_noise", "velocity"])
def test_noising_ops_gradcheck(op):
    x0 = make("odd", 20, torch.float64)[:2, :2, :3, :3].clone().requires_grad_()
    noise = make("odd", 21, torch.float64)[:2, :2, :3, :3].clone().requires_grad_()
    t = torch.tensor([T - 1, 0])
    assert torch.autograd.gradcheck(lambda a, b: op(a, b, t, SQRT_ACP, SQRT_1M_ACP), (x0, noise))


def test_steps_gradcheck_in_model_output():
    m = make("odd", 22, torch.float64)[:2, :2, :3, :3].clone().requires_grad_()
    x = make("odd", 23, torch.float64)[:2, :2, :3, :3].clone().requires_grad_()
    t, prev_t = torch.tensor([T - 1, 10]), torch.tensor([T - 11, -1])
    assert torch.autograd.gradcheck(lambda a, b: ddpm_step(a, b, t, prev_t, ACP, "v"), (m, x))
    assert torch.autograd.gradcheck(lambda a, b: ddim_step(a, b, t, prev_t, ACP, 0.0, "epsilon"), (m, x))


# ----------------------------------------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------------------------------------

X = torch.zeros(2, 3, 4, 4)


@pytest.mark.parametrize("call,match", [
    (lambda: add_noise(X, X, torch.tensor([0, T]), SQRT_ACP, SQRT_1M_ACP), r"add_noise: t must be in \[0, 100\)"),
    (lambda: add_noise(X, X, -1, SQRT_ACP, SQRT_1M_ACP), r"t must be in \[0, 100\), got \[-1, -1\]"),
    (lambda: add_noise(X, X, torch.tensor([1, 2, 3]), SQRT_ACP, SQRT_1M_ACP),
     r"t must be a scalar or have shape \[N\] = \[2\]"),
    (lambda: add_noise(X, X, torch.tensor([[1, 2]]), SQRT_ACP, SQRT_1M_ACP), r"batch size of x0"),
    (lambda: add_noise(X, X, torch.tensor([1.0, 2.0]), SQRT_ACP, SQRT_1M_ACP), r"t must hold integer timesteps"),
    (lambda: add_noise(X, X, 1.5, SQRT_ACP, SQRT_1M_ACP), r"t must be an integer"),
    (lambda: add_noise(X, X, True, SQRT_ACP, SQRT_1M_ACP), r"t must be an integer"),
    (lambda: add_noise(X, X[:, :2], 0, SQRT_ACP, SQRT_1M_ACP), r"noise shape \(2, 2, 4, 4\) does not match x0"),
    (lambda: add_noise(X.long(), X, 0, SQRT_ACP, SQRT_1M_ACP), r"x0 must be a floating-point tensor"),
    (lambda: add_noise(X, X, 0, SQRT_ACP[None], SQRT_1M_ACP), r"sqrt_alphas_cumprod must be a non-empty 1-D"),
    (lambda: add_noise(X, X, 0, SQRT_ACP, SQRT_1M_ACP[:50]), r"sqrt_one_minus_alphas_cumprod has 50 entries"),
    (lambda: velocity(X, X[:1], 0, SQRT_ACP, SQRT_1M_ACP), r"velocity: noise shape"),
    (lambda: velocity(X, X, T, SQRT_ACP, SQRT_1M_ACP), r"velocity: t must be in \[0, 100\)"),
    (lambda: ddpm_step(X[:1], X, 5, 4, ACP), r"ddpm_step: model_output shape \(1, 3, 4, 4\) does not match x_t"),
    (lambda: ddpm_step(X, X, 5, 4, ACP, variance_noise=X[..., :2]), r"variance_noise shape"),
    (lambda: ddpm_step(X, X, 5, 5, ACP), r"prev_t must be < t"),
    (lambda: ddpm_step(X, X, T, 5, ACP), r"t must be in \[0, 100\)"),
    (lambda: ddpm_step(X, X, 5, torch.tensor([4, 3, 2]), ACP), r"prev_t must be a scalar or have shape \[N\]"),
    (lambda: ddpm_step(X, X, 5, 4, ACP, prediction_type="v_prediction"), r"prediction_type must be one of"),
    (lambda: ddpm_step(X, X, 5, 4, ACP, variance_type="learned"), r"variance_type must be one of"),
    (lambda: ddpm_step(X, X, 5, 4, ACP, clip_sample=True, clip_range=-1.0), r"clip_range must be >= 0"),
    (lambda: ddim_step(X, X, 5, 4, ACP, eta=1.5), r"ddim_step: eta must be in \[0.0, 1.0\]"),
    (lambda: ddim_step(X, X, 5, 4, ACP, final_alpha_cumprod=2.0), r"final_alpha_cumprod must be in"),
    (lambda: ddim_step(X, X, torch.tensor([5, 100]), 4, ACP), r"ddim_step: t must be in \[0, 100\), got \[100\]"),
    (lambda: ddim_step(X, X, 5, 4.0, ACP), r"prev_t must be an integer"),
])
def test_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
