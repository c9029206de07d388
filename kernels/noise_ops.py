"""The diffusion scheduler's noise ops: forward noising, the v target, and one DDPM or DDIM reverse step.

Every op works per sample: x is any tensor [N, ...], t is an int64 tensor [N] of timesteps (a Python int or a 0-d
tensor stands for the same timestep for every sample), and the coefficient tables are 1-D float tensors indexed by t
(`alphas_cumprod` is the cumulative product of (1 - beta) of the noise schedule, "alpha bar" in the papers).

Numerics. The per-sample coefficients ([N] numbers gathered from the tables) are computed in float64 (float32 on a
device without float64, such as MPS), because 1 - alphas_cumprod near t = 0 keeps only a few digits in float32; the
elementwise arithmetic on x runs in float32 for fp16 / bf16 / fp32 inputs and in float64 for float64 inputs, and the
outputs come back in the dtype of x.

This file holds, per op, the public function (with its shape docstring: it validates its arguments and raises a
ValueError naming the argument at fault) and the pure-PyTorch reference `*_ref`: the readable formula, which tests and
benchmarks import. The public functions run the compiled C++/CUDA extension (csrc/, the ops `torch.ops.layoutgen.*`:
one fused pass each, registered schema-first with TORCH_LIBRARY) unless the kernel backend is "reference"
(layoutgen.kernels.set_backend / use_backend / LAYOUTGEN_KERNEL_BACKEND), and the references otherwise: on devices
other than CPU and CUDA, when noise and x0 differ in dtype, and for the two steps when autograd must record them
(add_noise, velocity and add_noise_philox have autograd formulas; the steps are inference ops).

Where the extension comes from (`noise_ops_status()`, `python -m layoutgen.kernels.noise_ops`, `layoutgen info`):
1. `layoutgen._C`, built by setup.py (pip install --no-build-isolation [-e] .);
2. else a JIT build of csrc/ with torch.utils.cpp_extension.load (ninja) on first use, cached in
   $LAYOUTGEN_CACHE_DIR or ~/.cache/layoutgen (XDG_CACHE_HOME), one folder per torch / Python / CUDA version;
3. else the PyTorch references, with one warning that says why.
LAYOUTGEN_NOISE_OPS=auto (default) | prebuilt (no JIT build) | jit (skip layoutgen._C) | off (references only);
LAYOUTGEN_BUILD_CUDA=0 leaves the CUDA sources out of a build (setup.py and JIT alike).

Formulas follow diffusers' DDPMScheduler.step and DDIMScheduler.step exactly, so both can be checked against it:
  x_t          = sqrt(acp[t]) * x0 + sqrt(1 - acp[t]) * noise                 (Ho et al. 2020, eq. 4)
  v            = sqrt(acp[t]) * noise - sqrt(1 - acp[t]) * x0                 (Salimans & Ho 2022, sec. 4)
  DDPM step    posterior mean and variance of q(x_prev | x_t, x0)              (Ho et al. 2020, eqs. 6-7)
  DDIM step    x_prev = sqrt(acp_prev) x0 + sqrt(1 - acp_prev - sigma^2) eps + sigma z   (Song et al. 2021, eq. 12)
The fused-noise add_noise_philox draws the noise itself with Philox4x32-10 (Salmon et al. 2011) and Box-Muller.
"""
from __future__ import annotations

import numbers
import sys
import threading
import warnings

import torch

from layoutgen.kernels.backend import get_backend
from layoutgen.kernels.noise_ops_build import EXTENSION_ENV, NoiseOpsStatus, _mode, _try_jit, _try_prebuilt

PREDICTION_TYPES = ("epsilon", "v", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_large")


# ----------------------------------------------------------------------------------------------------------------------
# Shared helpers: dtypes, per-sample timesteps and coefficients.
# ----------------------------------------------------------------------------------------------------------------------

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Elementwise arithmetic dtype: float64 stays float64, every other float type computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _coef_dtype(device: torch.device) -> torch.dtype:
    """Per-sample coefficients in float64, except on devices that have no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _per_sample(t: int | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """t as an int64 tensor [n] on `device` (a Python int or 0-d tensor is broadcast to every sample)."""
    if isinstance(t, torch.Tensor):
        t = t.to(device=device, dtype=torch.long)
        return t.expand(n) if t.dim() == 0 else t
    return torch.full((n,), int(t), dtype=torch.long, device=device)


def _gather(table: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """table[t] as `dtype`, on t's device ([N])."""
    return table.to(device=t.device, dtype=dtype)[t]


def _bcast(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample coefficient [N] reshaped to [N, 1, ..., 1] to broadcast over x's other dims, in x's dtype."""
    return coef.to(dtype=x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))


def _noise_coefs(x: torch.Tensor, t: int | torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
                 sqrt_one_minus_alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(acp[t]), sqrt(1 - acp[t])) as [N, 1, ..., 1] in x's dtype."""
    t = _per_sample(t, x.shape[0], x.device)
    dtype = _coef_dtype(t.device)
    return (_bcast(_gather(sqrt_alphas_cumprod, t, dtype), x),
            _bcast(_gather(sqrt_one_minus_alphas_cumprod, t, dtype), x))


def _alphas_cumprod_pair(alphas_cumprod: torch.Tensor, t: torch.Tensor, prev_t: torch.Tensor,
                         prev_value: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(acp[t], acp[prev_t]) per sample in the coefficient dtype; acp_prev = prev_value where prev_t < 0."""
    dtype = _coef_dtype(t.device)
    acp = alphas_cumprod.to(device=t.device, dtype=dtype)
    acp_t = acp[t]
    acp_prev = torch.where(prev_t >= 0, acp[prev_t.clamp(min=0)],
                           torch.as_tensor(prev_value, dtype=dtype, device=t.device))
    return acp_t, acp_prev


# ----------------------------------------------------------------------------------------------------------------------
# Argument checks (the public functions only; the references assume valid inputs).
# ----------------------------------------------------------------------------------------------------------------------

def _check_tensor(op: str, name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: {name} must have a batch dimension [N, ...], got a 0-d tensor")
    return x


def _check_same_shape(op: str, name: str, y: object, ref_name: str, ref: torch.Tensor) -> None:
    _check_tensor(op, name, y)
    if y.shape != ref.shape:
        raise ValueError(f"{op}: {name} shape {tuple(y.shape)} does not match {ref_name} shape {tuple(ref.shape)}")


def _check_table(op: str, name: str, table: object, length: int | None = None) -> torch.Tensor:
    if not isinstance(table, torch.Tensor) or not table.is_floating_point() or table.dim() != 1 or table.numel() == 0:
        desc = (f"shape {tuple(table.shape)}, dtype {table.dtype}" if isinstance(table, torch.Tensor)
                else type(table).__name__)
        raise ValueError(f"{op}: {name} must be a non-empty 1-D float tensor indexed by timestep, got {desc}")
    if length is not None and table.numel() != length:
        raise ValueError(f"{op}: {name} has {table.numel()} entries but the other table has {length}")
    return table


def _check_timesteps(op: str, name: str, t: object, n: int, low: int | None, high: int,
                     x_name: str) -> torch.Tensor:
    """t as int64 [n] after checking its type, its batch size against x's (n) and low <= t < high (no low: any t<high).
    """
    if isinstance(t, bool) or not isinstance(t, (numbers.Integral, torch.Tensor)):
        raise ValueError(f"{op}: {name} must be an integer or an int64 tensor [N] of timesteps, "
                         f"got {type(t).__name__} ({t!r})")
    if isinstance(t, torch.Tensor):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{op}: {name} must hold integer timesteps, got dtype {t.dtype}")
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != n):
            raise ValueError(f"{op}: {name} must be a scalar or have shape [N] = [{n}] (the batch size of {x_name}), "
                             f"got shape {tuple(t.shape)}")
    values = _per_sample(t, n, t.device if isinstance(t, torch.Tensor) else torch.device("cpu"))
    if torch.compiler.is_compiling():
        return values  # a data-dependent check would break the graph; the compiled ops check t themselves
    bad = values >= high if low is None else (values < low) | (values >= high)
    if bool(bad.any()):
        where = f"< {high}" if low is None else f"in [{low}, {high})"
        raise ValueError(f"{op}: {name} must be {where}, got {values[bad].tolist()[:8]}")
    return values


def _check_noise_args(op: str, x0: object, noise: object, t: object, sqrt_alphas_cumprod: object,
                      sqrt_one_minus_alphas_cumprod: object) -> None:
    """The checks add_noise and velocity share: x0 and noise alike, two tables of one length, t in range."""
    x0 = _check_tensor(op, "x0", x0)
    _check_same_shape(op, "noise", noise, "x0", x0)
    sqrt_alphas_cumprod = _check_table(op, "sqrt_alphas_cumprod", sqrt_alphas_cumprod)
    _check_table(op, "sqrt_one_minus_alphas_cumprod", sqrt_one_minus_alphas_cumprod, sqrt_alphas_cumprod.numel())
    _check_timesteps(op, "t", t, x0.shape[0], 0, sqrt_alphas_cumprod.numel(), "x0")


def _check_step_args(op: str, model_output: object, x_t: object, alphas_cumprod: object, prediction_type: object,
                     variance_noise: object) -> None:
    """The checks ddpm_step and ddim_step share: tensors alike, the table, the prediction type."""
    x_t = _check_tensor(op, "x_t", x_t)
    _check_same_shape(op, "model_output", model_output, "x_t", x_t)
    if variance_noise is not None:
        _check_same_shape(op, "variance_noise", variance_noise, "x_t", x_t)
    _check_table(op, "alphas_cumprod", alphas_cumprod)
    _check_choice(op, "prediction_type", prediction_type, PREDICTION_TYPES)


def _check_choice(op: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {list(choices)}, got {value!r}")


def _check_real(op: str, name: str, value: object, low: float, high: float | None = None) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{op}: {name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not (value >= low and (high is None or value <= high)):  # also rejects NaN
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{op}: {name} must be {bounds}, got {value}")
    return value


# ----------------------------------------------------------------------------------------------------------------------
# The compiled extension (found or built by noise_ops_build.py): its status, its fake and autograd registrations,
# and when the public functions use it.
# ----------------------------------------------------------------------------------------------------------------------

_DATA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_lock = threading.RLock()
_status: NoiseOpsStatus | None = None
_jit_tried = False
_warned = False


def _initial_status() -> NoiseOpsStatus:
    """At import: the prebuilt module if there is one (a cheap dlopen); a JIT build waits for the first call."""
    mode = _mode()
    if mode == "off":
        return NoiseOpsStatus("reference", f"compiled noise ops switched off ({EXTENSION_ENV}=off)")
    if mode == "jit":
        return NoiseOpsStatus("pending", f"{EXTENSION_ENV}=jit skips layoutgen._C")
    status = _try_prebuilt()
    if status.path == "pending" and mode == "prebuilt":
        return NoiseOpsStatus("reference", f"{status.reason}; JIT builds are off ({EXTENSION_ENV}=prebuilt)")
    return status


def _set_status(status: NoiseOpsStatus) -> NoiseOpsStatus:
    global _status
    _status = status
    if status.compiled:
        _register_python_parts()
    return status


def noise_ops_status(build: bool = True) -> NoiseOpsStatus:
    """The noise ops' implementation and why. build=True tries the JIT build now if it is still pending (slow once,
    cached after); build=False only reports."""
    global _jit_tried, _warned
    with _lock:
        status = _status if _status is not None else _set_status(_initial_status())
        if status.path == "pending" and build and not _jit_tried:
            _jit_tried = True
            previous = status.reason
            status = _try_jit()
            if status.path == "reference":
                status = NoiseOpsStatus("reference", f"{status.reason}; earlier: {previous}")
            _set_status(status)
        if status.path == "reference" and build and not _warned and _mode() != "off":
            _warned = True
            warnings.warn(f"layoutgen noise ops run on the PyTorch references (slower): {status.reason}",
                          RuntimeWarning, stacklevel=3)
        return status


def _compiled_available(device_type: str) -> bool:
    status = _status
    if status is None or (status.path == "pending" and not _jit_tried):
        if torch.compiler.is_compiling():
            return False  # no build inside a trace: a compiled graph uses what eager calls have loaded
        status = noise_ops_status(build=True)
    return status.compiled and device_type in status.devices


def _use_compiled(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether a public function runs the compiled op on these tensors (else its reference)."""
    if get_backend() == "reference":
        return False
    if x.dtype not in _DATA_DTYPES or x.device.type not in ("cpu", "cuda"):
        return False
    if any(o is not None and (o.dtype != x.dtype or o.device != x.device) for o in others):
        return False  # mixed dtypes or devices: the reference has the semantics (and the error)
    return _compiled_available(x.device.type)


def _op_table(table: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A table as the compiled ops take it: float32 or float64 on the data's device."""
    if dtype is None:
        dtype = table.dtype if table.dtype in (torch.float32, torch.float64) else torch.float64
    return table.to(device=device, dtype=dtype)


def _op_tables(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Both noising tables in one dtype (float64 unless both are float32), on the data's device."""
    dtype = torch.float32 if a.dtype == b.dtype == torch.float32 else torch.float64
    return _op_table(a, device, dtype), _op_table(b, device, dtype)


def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


# Fake (meta) functions: the output layout of the C++ ops (x's own strides where x is dense with the batch
# dimension outermost in memory, as contiguous and channels_last tensors are; contiguous otherwise).

def _is_batch_major(x: torch.Tensor) -> bool:
    """As batch_major in csrc/noise_ops.cpp: non-overlapping and dense (the strides of the dims of size > 1, in
    increasing order, are the running products of the sizes), with dim 0 outermost."""
    if x.numel() == 0:
        return False
    expected = 1
    for d in sorted((d for d in range(x.dim()) if x.shape[d] != 1), key=x.stride):
        if x.stride(d) != expected:
            return False
        expected *= x.shape[d]
    return x.shape[0] == 1 or x.stride(0) == x.numel() // x.shape[0]


def _empty_out(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x) if _is_batch_major(x) else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fake_noise_mix(x0, noise, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    torch._check(noise.shape == x0.shape, lambda: f"noise shape {tuple(noise.shape)} does not match x0")
    return _empty_out(x0)


def _fake_add_noise_philox(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, offset):
    return _empty_out(x0), _empty_out(x0)


def _fake_step(model_output, x_t, *args):
    torch._check(model_output.shape == x_t.shape, lambda: "model_output shape does not match x_t")
    return _empty_out(x_t), _empty_out(x_t)


# Autograd: x_t = a x0 + b noise and v = a noise - b x0 are linear, so the gradients are the per-sample coefficients
# times the incoming gradient (computed as the references compute: coefficients in float64, products in opmath).

def _setup_noise_mix(ctx, inputs, output):
    x0, _, t, a, b = inputs
    ctx.save_for_backward(t, a, b)
    ctx.dtype = x0.dtype


def _setup_add_noise_philox(ctx, inputs, output):
    x0, t, a, b, _, _ = inputs
    ctx.save_for_backward(t, a, b)
    ctx.dtype = x0.dtype


def _scaled(grad: torch.Tensor | None, t, table: torch.Tensor, sign: float, dtype: torch.dtype):
    if grad is None:
        return None
    g = grad.to(_compute_dtype(grad))
    coef = _bcast(_gather(table, t, _coef_dtype(t.device)), g)
    return (coef * g * sign).to(dtype)


def _add_noise_backward(ctx, grad):
    t, a, b = ctx.saved_tensors
    need = ctx.needs_input_grad
    return (_scaled(grad, t, a, 1.0, ctx.dtype) if need[0] else None,
            _scaled(grad, t, b, 1.0, ctx.dtype) if need[1] else None, None, None, None)


def _velocity_backward(ctx, grad):
    t, a, b = ctx.saved_tensors
    need = ctx.needs_input_grad
    return (_scaled(grad, t, b, -1.0, ctx.dtype) if need[0] else None,
            _scaled(grad, t, a, 1.0, ctx.dtype) if need[1] else None, None, None, None)


def _add_noise_philox_backward(ctx, grad_x_t, grad_noise):
    t, a, _ = ctx.saved_tensors
    return _scaled(grad_x_t, t, a, 1.0, ctx.dtype), None, None, None, None, None


_registered = False


def _register_python_parts() -> None:
    """register_fake and register_autograd for the C++ ops, once they exist."""
    global _registered
    if _registered:
        return
    _registered = True
    for name in ("add_noise", "velocity"):
        torch.library.register_fake(f"layoutgen::{name}", _fake_noise_mix)
    torch.library.register_fake("layoutgen::add_noise_philox", _fake_add_noise_philox)
    for name in ("ddpm_step", "ddim_step"):
        torch.library.register_fake(f"layoutgen::{name}", _fake_step)
    torch.library.register_autograd("layoutgen::add_noise", _add_noise_backward, setup_context=_setup_noise_mix)
    torch.library.register_autograd("layoutgen::velocity", _velocity_backward, setup_context=_setup_noise_mix)
    torch.library.register_autograd("layoutgen::add_noise_philox", _add_noise_philox_backward,
                                    setup_context=_setup_add_noise_philox)


# ----------------------------------------------------------------------------------------------------------------------
# add_noise: the forward process q(x_t | x0).
# ----------------------------------------------------------------------------------------------------------------------

def add_noise_ref(x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
                  sqrt_one_minus_alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Reference: x_t = a[t] * x0 + b[t] * noise with a = sqrt(acp), b = sqrt(1 - acp) (Ho et al. 2020, eq. 4)."""
    x0_c, noise_c = x0.to(_compute_dtype(x0)), noise.to(_compute_dtype(x0))
    a, b = _noise_coefs(x0_c, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    return (a * x0_c + b * noise_c).to(x0.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
              sqrt_one_minus_alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Noises clean samples to timestep t: x_t = sqrt(acp[t]) * x0 + sqrt(1 - acp[t]) * noise.

    x0, noise: [N, ...] (same shape); t: int64 [N], or an int / 0-d tensor for all samples, each in [0, T);
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod: [T]. Returns x_t: [N, ...] in x0's dtype. Differentiable in x0
    and noise.
    """
    _check_noise_args("add_noise", x0, noise, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    if _use_compiled(x0, noise):
        a, b = _op_tables(sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, x0.device)
        return torch.ops.layoutgen.add_noise(x0, noise, _per_sample(t, x0.shape[0], x0.device), a, b)
    return add_noise_ref(x0, noise, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)


# ----------------------------------------------------------------------------------------------------------------------
# velocity: the v-prediction target.
# ----------------------------------------------------------------------------------------------------------------------

def velocity_ref(x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
                 sqrt_one_minus_alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Reference: v = a[t] * noise - b[t] * x0 (Salimans & Ho 2022, "Progressive distillation", sec. 4)."""
    x0_c, noise_c = x0.to(_compute_dtype(x0)), noise.to(_compute_dtype(x0))
    a, b = _noise_coefs(x0_c, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    return (a * noise_c - b * x0_c).to(x0.dtype)


def velocity(x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
             sqrt_one_minus_alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The v target: v = sqrt(acp[t]) * noise - sqrt(1 - acp[t]) * x0.

    x0, noise: [N, ...] (same shape); t: int64 [N] (or an int / 0-d tensor) in [0, T); tables: [T].
    Returns v: [N, ...] in x0's dtype. Differentiable in x0 and noise.
    """
    _check_noise_args("velocity", x0, noise, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    if _use_compiled(x0, noise):
        a, b = _op_tables(sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, x0.device)
        return torch.ops.layoutgen.velocity(x0, noise, _per_sample(t, x0.shape[0], x0.device), a, b)
    return velocity_ref(x0, noise, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)


# ----------------------------------------------------------------------------------------------------------------------
# add_noise_philox: forward noising that draws its own noise (Philox4x32-10, counter-based) in the same pass.
# ----------------------------------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)   # Weyl key increments
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)   # round multipliers
_TWO_PI_F32 = 6.283185307179586
_MAX_INT64 = 2 ** 63 - 1


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for uint32 values held in int64, via 16-bit halves (no int64 overflow)."""
    p_hi, p_lo = (a >> 16) * m, (a & 0xFFFF) * m   # each < 2^48
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox4x32_10_ref(blocks: torch.Tensor, offset: int, seed: int) -> torch.Tensor:
    """Philox4x32-10 (Salmon et al. 2011) of the counters (blocks, offset) under the key seed: int64 [B] -> [B, 4]
    uint32 values in int64, round for round as csrc/noise_ops.h (and at::Philox4_32). The 128-bit counter is
    (lo(block), hi(block), lo(offset), hi(offset)) and the key (lo(seed), hi(seed)), in Random123's word order."""
    c0, c1 = blocks & _MASK32, (blocks >> 32) & _MASK32
    c2 = torch.full_like(blocks, offset & _MASK32)
    c3 = torch.full_like(blocks, (offset >> 32) & _MASK32)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def philox_normal_ref(numel: int, seed: int, offset: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """numel float32 standard normals: element p is normal p % 4 of the Philox block (p // 4, offset), Box-Muller on
    the uniform pairs (bits >> 8) * 2^-24 + 2^-25 in (0, 1), as the compiled ops draw them for memory position p."""
    blocks = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    bits = philox4x32_10_ref(blocks, offset, seed)
    u = (bits >> 8).to(torch.float32) * 2.0 ** -24 + 2.0 ** -25
    radius = torch.sqrt(-2.0 * torch.log(u[:, 0::2]))          # pairs (0, 1) and (2, 3)
    angle = _TWO_PI_F32 * u[:, 1::2]
    z = torch.stack([radius[:, 0] * torch.cos(angle[:, 0]), radius[:, 0] * torch.sin(angle[:, 0]),
                     radius[:, 1] * torch.cos(angle[:, 1]), radius[:, 1] * torch.sin(angle[:, 1])], dim=-1)
    return z.reshape(-1)[:numel]


def _in_memory_order(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """flat laid out in the memory order of `like` (dense, batch outermost): element p of flat at memory position p."""
    order = like.dim_order()
    inverse = sorted(range(like.dim()), key=lambda d: order[d])
    return flat.view([like.shape[d] for d in order]).permute(inverse)


def add_noise_philox_ref(x0: torch.Tensor, t: int | torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
                         sqrt_one_minus_alphas_cumprod: torch.Tensor, seed: int,
                         offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the noise of philox_normal_ref in x0's memory order (x0 itself if it is dense with the batch
    outermost, else its contiguous copy), rounded to x0's dtype, then add_noise_ref. Equal to the compiled op up to
    the last bits of log / sin / cos."""
    like = x0 if _is_batch_major(x0) else x0.contiguous()
    noise = _in_memory_order(philox_normal_ref(x0.numel(), seed, offset, x0.device), like).to(x0.dtype)
    return add_noise_ref(x0, noise, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod), noise


def _check_int(op: str, name: str, value: object, low: int, high: int) -> int:
    if torch.compiler.is_compiling():
        return value  # a (possibly symbolic) int: checking it would specialise the graph on its value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{op}: {name} must be an int, got {type(value).__name__} ({value!r})")
    if not low <= value <= high:
        raise ValueError(f"{op}: {name} must be in [{low}, {high}], got {value}")
    return int(value)


def add_noise_philox(x0: torch.Tensor, t: int | torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
                     sqrt_one_minus_alphas_cumprod: torch.Tensor, seed: int,
                     offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """add_noise with the noise drawn in the same pass: returns (x_t, noise), noise ~ N(0, 1) in x0's dtype.

    x0: [N, ...]; t: int64 [N] (or an int / 0-d tensor) in [0, T); tables: [T]; seed, offset: ints in [0, 2^63).
    The noise is a counter-based Philox4x32-10 stream (Box-Muller to normals): element p in memory order takes the
    counter (p // 4, offset) under the key seed, so the same (seed, offset) gives the same noise on the same device
    whatever the thread layout (channels_last and contiguous x0 get the same noise per memory position, not per
    index). Distinct offsets give independent streams: use e.g. seed = run seed, offset = training step.
    x_t = sqrt(acp[t]) x0 + sqrt(1 - acp[t]) noise exactly as add_noise(x0, noise, ...) computes it. Differentiable in
    x0.
    """
    op = "add_noise_philox"
    _check_tensor(op, "x0", x0)
    _check_table(op, "sqrt_alphas_cumprod", sqrt_alphas_cumprod)
    _check_table(op, "sqrt_one_minus_alphas_cumprod", sqrt_one_minus_alphas_cumprod, sqrt_alphas_cumprod.numel())
    _check_timesteps(op, "t", t, x0.shape[0], 0, sqrt_alphas_cumprod.numel(), "x0")
    seed = _check_int(op, "seed", seed, 0, _MAX_INT64)
    offset = _check_int(op, "offset", offset, 0, _MAX_INT64)
    if _use_compiled(x0):
        a, b = _op_tables(sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, x0.device)
        return torch.ops.layoutgen.add_noise_philox(x0, _per_sample(t, x0.shape[0], x0.device), a, b, seed, offset)
    return add_noise_philox_ref(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, seed, offset)


# ----------------------------------------------------------------------------------------------------------------------
# Model output -> x0 and epsilon, shared by the two steps.
# ----------------------------------------------------------------------------------------------------------------------

def _predict_x0(model_output: torch.Tensor, x_t: torch.Tensor, sqrt_acp: torch.Tensor, sqrt_1m_acp: torch.Tensor,
                prediction_type: str) -> torch.Tensor:
    """x0 from the model output, inverting x_t = a x0 + b eps and v = a eps - b x0 (a^2 + b^2 = 1)."""
    if prediction_type == "epsilon":
        return (x_t - sqrt_1m_acp * model_output) / sqrt_acp
    if prediction_type == "v":
        return sqrt_acp * x_t - sqrt_1m_acp * model_output
    return model_output  # "sample": the model predicts x0


def _predict_eps(model_output: torch.Tensor, x_t: torch.Tensor, sqrt_acp: torch.Tensor, sqrt_1m_acp: torch.Tensor,
                 prediction_type: str) -> torch.Tensor:
    """eps (the noise in x_t) from the model output, by the same identities as _predict_x0."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v":
        return sqrt_acp * model_output + sqrt_1m_acp * x_t
    return (x_t - sqrt_acp * model_output) / sqrt_1m_acp


# ----------------------------------------------------------------------------------------------------------------------
# ddpm_step: one ancestral step of the reverse process.
# ----------------------------------------------------------------------------------------------------------------------

def ddpm_step_ref(model_output: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor, prev_t: int | torch.Tensor,
                  alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon", variance_type: str = "fixed_small",
                  clip_sample: bool = False, clip_range: float = 1.0,
                  variance_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference DDPM step from t to prev_t (< t; prev_t < 0 means acp_prev = 1), as diffusers' DDPMScheduler.step.

    With beta' = 1 - acp[t] / acp_prev (the beta of the jump t -> prev_t) and alpha' = 1 - beta', the posterior
    q(x_prev | x_t, x0) of Ho et al. 2020 (eqs. 6-7) has
      mean     = sqrt(acp_prev) beta' / (1 - acp[t]) * x0 + sqrt(alpha') (1 - acp_prev) / (1 - acp[t]) * x_t
      variance = (1 - acp_prev) / (1 - acp[t]) * beta'  ("fixed_small", clamped at 1e-20)  or  beta' ("fixed_large")
    and x_prev = mean + sqrt(variance) * variance_noise, with no noise where t == 0 (or when variance_noise is None).
    """
    n = x_t.shape[0]
    t = _per_sample(t, n, x_t.device)
    prev_t = _per_sample(prev_t, n, x_t.device)
    dtype = _compute_dtype(x_t)
    x = x_t.to(dtype)

    acp_t, acp_prev = _alphas_cumprod_pair(alphas_cumprod, t, prev_t, 1.0)
    beta_prod_t = 1 - acp_t
    beta_prod_prev = 1 - acp_prev
    alpha_jump = acp_t / acp_prev
    beta_jump = 1 - alpha_jump

    x0 = _predict_x0(model_output.to(dtype), x, _bcast(acp_t.sqrt(), x), _bcast(beta_prod_t.sqrt(), x),
                     prediction_type)
    if clip_sample:
        x0 = x0.clamp(-clip_range, clip_range)

    x0_coef = acp_prev.sqrt() * beta_jump / beta_prod_t
    xt_coef = alpha_jump.sqrt() * beta_prod_prev / beta_prod_t
    x_prev = _bcast(x0_coef, x) * x0 + _bcast(xt_coef, x) * x

    if variance_noise is not None:
        if variance_type == "fixed_small":
            variance = (beta_prod_prev / beta_prod_t * beta_jump).clamp(min=1e-20)
        else:  # "fixed_large"
            variance = beta_jump
        std = torch.where(t > 0, variance.sqrt(), torch.zeros_like(variance))
        x_prev = x_prev + _bcast(std, x) * variance_noise.to(dtype)
    return x_prev.to(x_t.dtype), x0.to(x_t.dtype)


def ddpm_step(model_output: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor, prev_t: int | torch.Tensor,
              alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon", variance_type: str = "fixed_small",
              clip_sample: bool = False, clip_range: float = 1.0,
              variance_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDPM reverse step x_t -> x_prev (Ho et al. 2020), equal to diffusers' DDPMScheduler.step.

    model_output, x_t: [N, ...] (same shape); t: int64 [N] in [0, T), prev_t: int64 [N] with prev_t < t (prev_t < 0,
    e.g. -1, means the step ends at the data: acp_prev = 1); scalars broadcast. alphas_cumprod: [T].
    prediction_type: "epsilon" | "v" | "sample"; variance_type: "fixed_small" | "fixed_large"; clip_sample clamps the
    predicted x0 to [-clip_range, clip_range]; variance_noise: like x_t, or None for the posterior mean (no noise).
    Returns (x_prev, x0_pred), both [N, ...] in x_t's dtype.
    """
    op = "ddpm_step"
    _check_step_args(op, model_output, x_t, alphas_cumprod, prediction_type, variance_noise)
    _check_choice(op, "variance_type", variance_type, VARIANCE_TYPES)
    if clip_sample:
        clip_range = _check_real(op, "clip_range", clip_range, 0.0)
    _check_prev(op, t, prev_t, x_t.shape[0], alphas_cumprod.numel())
    if _use_compiled(x_t, model_output, variance_noise) and not _needs_autograd(model_output, x_t, variance_noise):
        n = x_t.shape[0]
        return torch.ops.layoutgen.ddpm_step(
            model_output, x_t, _per_sample(t, n, x_t.device), _per_sample(prev_t, n, x_t.device),
            _op_table(alphas_cumprod, x_t.device), prediction_type, variance_type, bool(clip_sample),
            float(clip_range) if clip_sample else 1.0, variance_noise)
    return ddpm_step_ref(model_output, x_t, t, prev_t, alphas_cumprod, prediction_type, variance_type, clip_sample,
                         clip_range, variance_noise)


def _check_prev(op: str, t: object, prev_t: object, n: int, num_steps: int) -> None:
    t = _check_timesteps(op, "t", t, n, 0, num_steps, "x_t")
    prev_t = _check_timesteps(op, "prev_t", prev_t, n, None, num_steps, "x_t")
    if torch.compiler.is_compiling():
        return
    bad = prev_t.to(t.device) >= t
    if bool(bad.any()):
        raise ValueError(f"{op}: prev_t must be < t for every sample (a negative prev_t ends at the data), got "
                         f"prev_t={prev_t.to(t.device)[bad].tolist()[:8]} for t={t[bad].tolist()[:8]}")


# ----------------------------------------------------------------------------------------------------------------------
# ddim_step: one step of the (generalised) DDIM sampler.
# ----------------------------------------------------------------------------------------------------------------------

def ddim_step_ref(model_output: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor, prev_t: int | torch.Tensor,
                  alphas_cumprod: torch.Tensor, eta: float = 0.0, prediction_type: str = "epsilon",
                  clip_sample: bool = False, clip_range: float = 1.0, variance_noise: torch.Tensor | None = None,
                  final_alpha_cumprod: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference DDIM step from t to prev_t (Song et al. 2021, eq. 12), as diffusers' DDIMScheduler.step.

      sigma  = eta * sqrt((1 - acp_prev) / (1 - acp[t])) * sqrt(1 - acp[t] / acp_prev)           (eq. 16)
      x_prev = sqrt(acp_prev) * x0 + sqrt(1 - acp_prev - sigma^2) * eps + sigma * variance_noise
    with acp_prev = final_alpha_cumprod where prev_t < 0. When clip_sample, x0 is clamped and eps recomputed from the
    clamped x0 (diffusers' use_clipped_model_output=True). Noise is added only when eta > 0 and variance_noise is given.
    """
    n = x_t.shape[0]
    t = _per_sample(t, n, x_t.device)
    prev_t = _per_sample(prev_t, n, x_t.device)
    dtype = _compute_dtype(x_t)
    x = x_t.to(dtype)

    acp_t, acp_prev = _alphas_cumprod_pair(alphas_cumprod, t, prev_t, final_alpha_cumprod)
    beta_prod_t = 1 - acp_t
    beta_prod_prev = 1 - acp_prev
    sqrt_acp, sqrt_1m_acp = _bcast(acp_t.sqrt(), x), _bcast(beta_prod_t.sqrt(), x)

    model_output = model_output.to(dtype)
    x0 = _predict_x0(model_output, x, sqrt_acp, sqrt_1m_acp, prediction_type)
    eps = _predict_eps(model_output, x, sqrt_acp, sqrt_1m_acp, prediction_type)
    if clip_sample:
        x0 = x0.clamp(-clip_range, clip_range)
        eps = (x - sqrt_acp * x0) / sqrt_1m_acp

    variance = beta_prod_prev / beta_prod_t * (1 - acp_t / acp_prev)
    sigma = eta * variance.sqrt()
    # 1 - acp_prev - sigma^2 >= 0 for eta <= 1; the clamp only absorbs rounding.
    direction = (1 - acp_prev - sigma ** 2).clamp(min=0).sqrt()
    x_prev = _bcast(acp_prev.sqrt(), x) * x0 + _bcast(direction, x) * eps
    if eta > 0 and variance_noise is not None:
        x_prev = x_prev + _bcast(sigma, x) * variance_noise.to(dtype)
    return x_prev.to(x_t.dtype), x0.to(x_t.dtype)


def ddim_step(model_output: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor, prev_t: int | torch.Tensor,
              alphas_cumprod: torch.Tensor, eta: float = 0.0, prediction_type: str = "epsilon",
              clip_sample: bool = False, clip_range: float = 1.0, variance_noise: torch.Tensor | None = None,
              final_alpha_cumprod: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_prev (Song et al. 2021), equal to diffusers' DDIMScheduler.step.

    model_output, x_t: [N, ...] (same shape); t: int64 [N] in [0, T), prev_t: int64 [N] with prev_t < t (negative:
    the last step, acp_prev = final_alpha_cumprod, 1.0 as diffusers' set_alpha_to_one=True, else acp[0]); scalars
    broadcast. alphas_cumprod: [T]. eta in [0, 1]: 0 is deterministic DDIM, 1 DDPM-like; variance_noise: like x_t,
    used when eta > 0 (None: no noise). prediction_type: "epsilon" | "v" | "sample"; clip_sample clamps the
    predicted x0 to [-clip_range, clip_range] (eps is then recomputed from it).
    Returns (x_prev, x0_pred), both [N, ...] in x_t's dtype.
    """
    op = "ddim_step"
    _check_step_args(op, model_output, x_t, alphas_cumprod, prediction_type, variance_noise)
    eta = _check_real(op, "eta", eta, 0.0, 1.0)
    final_alpha_cumprod = _check_real(op, "final_alpha_cumprod", final_alpha_cumprod, 0.0, 1.0)
    if clip_sample:
        clip_range = _check_real(op, "clip_range", clip_range, 0.0)
    _check_prev(op, t, prev_t, x_t.shape[0], alphas_cumprod.numel())
    if _use_compiled(x_t, model_output, variance_noise) and not _needs_autograd(model_output, x_t, variance_noise):
        n = x_t.shape[0]
        return torch.ops.layoutgen.ddim_step(
            model_output, x_t, _per_sample(t, n, x_t.device), _per_sample(prev_t, n, x_t.device),
            _op_table(alphas_cumprod, x_t.device), eta, prediction_type, bool(clip_sample),
            float(clip_range) if clip_sample else 1.0, variance_noise, final_alpha_cumprod)
    return ddim_step_ref(model_output, x_t, t, prev_t, alphas_cumprod, eta, prediction_type, clip_sample, clip_range,
                         variance_noise, final_alpha_cumprod)


# ----------------------------------------------------------------------------------------------------------------------
# Status report: python -m layoutgen.kernels.noise_ops
# ----------------------------------------------------------------------------------------------------------------------

def describe_path(build: bool = False) -> str:
    """One line for `layoutgen info`: the path the public functions take and why (build=False: no JIT build)."""
    status = noise_ops_status(build=build)
    backend = get_backend()
    if backend == "reference":
        return f"reference (kernel backend 'reference'; extension: {status.describe()})"
    if status.path == "pending":
        return f"JIT build on first use ({status.reason})"
    return f"{status.describe()}: {status.reason}"


def main(argv: list[str] | None = None) -> int:
    """Prints which noise-op path is active and why (building the extension now if it is built on first use), and
    checks the compiled add_noise against its reference."""
    status = noise_ops_status(build=True)
    backend = get_backend()
    print(f"noise ops: {status.describe()}")
    print(f"  why: {status.reason}")
    if status.location:
        print(f"  library: {status.location}")
    devices = ", ".join(status.devices) if status.compiled else "no device"
    uses = ("the PyTorch references (backend 'reference')" if backend == "reference" else
            f"the compiled ops on {devices}, the references elsewhere" if status.compiled else
            "the PyTorch references")
    print(f"  kernel backend: {backend} -> add_noise, velocity, add_noise_philox, ddpm_step, ddim_step "
          f"(and the schedulers) use {uses}")
    if status.compiled:
        g = torch.Generator().manual_seed(0)
        x0, noise = torch.randn(3, 4, 5, 7, generator=g), torch.randn(3, 4, 5, 7, generator=g)
        t = torch.tensor([0, 7, 9])
        acp = torch.cumprod(1 - torch.linspace(1e-3, 0.2, 10, dtype=torch.float64), 0)
        tables = (acp.sqrt(), (1 - acp).sqrt())
        diff = (torch.ops.layoutgen.add_noise(x0, noise, t, *tables) - add_noise_ref(x0, noise, t, *tables)).abs()
        print(f"  self-check: add_noise max |compiled - reference| = {diff.max().item():.2e} (cpu, float32)")
    return 0


if __name__ == "__main__":
    # Run through the package module, so the ops are registered once, by layoutgen.kernels.noise_ops.
    from layoutgen.kernels import noise_ops as _module

    sys.exit(_module.main())
else:
    with _lock:
        if _status is None:
            _set_status(_initial_status())
