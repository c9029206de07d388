"""The diffusion scheduler's noise ops: forward noising, the v target, and one DDPM or DDIM reverse step.

Every op works per sample: x is any tensor [N, ...], t is an int64 tensor [N] of timesteps (a Python int or a 0-d
tensor stands for the same timestep for every sample), and the coefficient tables are 1-D float tensors indexed by t
(`alphas_cumprod` is the cumulative product of (1 - beta) of the noise schedule, "alpha bar" in the papers).

Numerics. The per-sample coefficients ([N] numbers gathered from the tables) are computed in float64 (float32 on a
device without float64, such as MPS), because 1 - alphas_cumprod near t = 0 keeps only a few digits in float32; the
elementwise arithmetic on x runs in float32 for fp16 / bf16 / fp32 inputs and in float64 for float64 inputs, and the
outputs come back in the dtype of x. The ops are differentiable (plain PyTorch ops).

This file holds, per op, the public function (with its shape docstring: it validates its arguments and raises a
ValueError naming the argument at fault) and the pure-PyTorch reference `*_ref`: the readable formula, which tests and
benchmarks import. For now the public functions always dispatch to the references; the compiled C++/CUDA extension
(csrc/) will plug in behind the same functions.

Formulas follow diffusers' DDPMScheduler.step and DDIMScheduler.step exactly, so both can be checked against it:
  x_t          = sqrt(acp[t]) * x0 + sqrt(1 - acp[t]) * noise                 (Ho et al. 2020, eq. 4)
  v            = sqrt(acp[t]) * noise - sqrt(1 - acp[t]) * x0                 (Salimans & Ho 2022, sec. 4)
  DDPM step    posterior mean and variance of q(x_prev | x_t, x0)              (Ho et al. 2020, eqs. 6-7)
  DDIM step    x_prev = sqrt(acp_prev) x0 + sqrt(1 - acp_prev - sigma^2) eps + sigma z   (Song et al. 2021, eq. 12)
"""
from __future__ import annotations

import numbers

import torch

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
    bad = values >= high if low is None else (values < low) | (values >= high)
    if bool(bad.any()):
        where = f"< {high}" if low is None else f"in [{low}, {high})"
        raise ValueError(f"{op}: {name} must be {where}, got {values[bad].tolist()[:8]}")
    return values


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
    op = "add_noise"
    _check_tensor(op, "x0", x0)
    _check_same_shape(op, "noise", noise, "x0", x0)
    _check_table(op, "sqrt_alphas_cumprod", sqrt_alphas_cumprod)
    _check_table(op, "sqrt_one_minus_alphas_cumprod", sqrt_one_minus_alphas_cumprod, sqrt_alphas_cumprod.numel())
    _check_timesteps(op, "t", t, x0.shape[0], 0, sqrt_alphas_cumprod.numel(), "x0")
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
    op = "velocity"
    _check_tensor(op, "x0", x0)
    _check_same_shape(op, "noise", noise, "x0", x0)
    _check_table(op, "sqrt_alphas_cumprod", sqrt_alphas_cumprod)
    _check_table(op, "sqrt_one_minus_alphas_cumprod", sqrt_one_minus_alphas_cumprod, sqrt_alphas_cumprod.numel())
    _check_timesteps(op, "t", t, x0.shape[0], 0, sqrt_alphas_cumprod.numel(), "x0")
    return velocity_ref(x0, noise, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)


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
    _check_tensor(op, "x_t", x_t)
    _check_same_shape(op, "model_output", model_output, "x_t", x_t)
    if variance_noise is not None:
        _check_same_shape(op, "variance_noise", variance_noise, "x_t", x_t)
    _check_table(op, "alphas_cumprod", alphas_cumprod)
    _check_choice(op, "prediction_type", prediction_type, PREDICTION_TYPES)
    _check_choice(op, "variance_type", variance_type, VARIANCE_TYPES)
    if clip_sample:
        clip_range = _check_real(op, "clip_range", clip_range, 0.0)
    _check_prev(op, t, prev_t, x_t.shape[0], alphas_cumprod.numel())
    return ddpm_step_ref(model_output, x_t, t, prev_t, alphas_cumprod, prediction_type, variance_type, clip_sample,
                         clip_range, variance_noise)


def _check_prev(op: str, t: object, prev_t: object, n: int, num_steps: int) -> None:
    t = _check_timesteps(op, "t", t, n, 0, num_steps, "x_t")
    prev_t = _check_timesteps(op, "prev_t", prev_t, n, None, num_steps, "x_t")
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
    _check_tensor(op, "x_t", x_t)
    _check_same_shape(op, "model_output", model_output, "x_t", x_t)
    if variance_noise is not None:
        _check_same_shape(op, "variance_noise", variance_noise, "x_t", x_t)
    _check_table(op, "alphas_cumprod", alphas_cumprod)
    _check_choice(op, "prediction_type", prediction_type, PREDICTION_TYPES)
    eta = _check_real(op, "eta", eta, 0.0, 1.0)
    final_alpha_cumprod = _check_real(op, "final_alpha_cumprod", final_alpha_cumprod, 0.0, 1.0)
    if clip_sample:
        clip_range = _check_real(op, "clip_range", clip_range, 0.0)
    _check_prev(op, t, prev_t, x_t.shape[0], alphas_cumprod.numel())
    return ddim_step_ref(model_output, x_t, t, prev_t, alphas_cumprod, eta, prediction_type, clip_sample, clip_range,
                         variance_noise, final_alpha_cumprod)
