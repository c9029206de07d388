"""Noise schedulers for latent diffusion: the forward (noising) process, training targets and DDPM / DDIM sampling.

A scheduler holds a noise schedule, betas_1..T, and the tables derived from it (float64, on the CPU, with diffusers'
names): alphas = 1 - betas, alphas_cumprod ("alpha bar": x_t = sqrt(acp[t]) x0 + sqrt(1 - acp[t]) eps),
sqrt_alphas_cumprod and sqrt_one_minus_alphas_cumprod. Three schedules:

* `LinearScheduler`: betas evenly spaced from beta_start to beta_end (Ho et al. 2020, "Denoising diffusion
  probabilistic models"), scaled by 1000 / num_steps as in improved DDPM so that any number of steps spans the same
  noise range (Nichol & Dhariwal 2021).
* `CosineScheduler`: alpha_bar(t) = cos(((t / T) + s) / (1 + s) * pi / 2)^2 (Nichol & Dhariwal 2021, "Improved
  denoising diffusion probabilistic models", eq. 17); diffusers' "squaredcos_cap_v2".
* `QuadraticScheduler`: betas = linspace(sqrt(beta_start), sqrt(beta_end))^2 (latent diffusion, Rombach et al.
  2022); diffusers' "scaled_linear".

```python
scheduler = SCHEDULER_REGISTRY["CosineScheduler"](num_steps=500)
x_t, noise = scheduler.add_noise(latent, timestep)        # a tuple: the noised latent and the noise drawn
target = scheduler.training_target(latent, noise, timestep)
for t in scheduler.timesteps(50):                          # sampling in 50 steps
    x, x0_pred = scheduler.ddim_step(model(x, t), t, x, num_inference_steps=50)
scheduler = build_scheduler({"type": "CosineScheduler", "num_steps": 500})
```

The arithmetic runs in `layoutgen.kernels.noise_ops` (the fast ops and their references); schedulers only hold
tables and pick timesteps. Sampling matches diffusers' DDPMScheduler / DDIMScheduler step for step.
"""
from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from layoutgen.config import check_typed_config
from layoutgen.kernels import noise_ops

PREDICTION_TYPES = noise_ops.PREDICTION_TYPES
VARIANCE_TYPES = noise_ops.VARIANCE_TYPES
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


# ----------------------------------------------------------------------------------------------------------------------
# Argument checks: a ValueError that names the argument, its value and what is allowed.
# ----------------------------------------------------------------------------------------------------------------------

def _int_arg(owner: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{owner}: {name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
    return int(value)


def _float_arg(owner: str, name: str, value: Any, low: float, high: float, low_open: bool = False,
               high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{owner}: {name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):  # also rejects NaN
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{owner}: {name} must be in {bounds}, got {value}")
    return value


def _bool_arg(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def _choice_arg(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {list(choices)}, got {value!r}")
    return value


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescales betas so the last timestep has zero SNR (acp[T-1] = 0), keeping acp[0].

    Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", Algorithm 1: shift sqrt(acp) so
    its last value is 0, scale it so its first value is unchanged, and convert back to betas (the last beta is 1).
    A model sampled from t = T-1 then starts from pure noise; use v prediction with it, since an epsilon model cannot
    recover x0 where acp = 0.
    """
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


class NoiseScheduler:
    """Base scheduler: tables from `_make_betas`, forward noising, targets, timesteps and DDPM / DDIM steps.

    Args (keyword only; every subclass also takes its schedule's own arguments):
        num_steps: T, the number of training timesteps (t in [0, T)).
        prediction_type: what the model predicts: "epsilon" (the noise), "v" (sqrt(acp) eps - sqrt(1-acp) x0,
            Salimans & Ho 2022) or "sample" (x0).
        variance_type: DDPM step variance: "fixed_small" (the posterior's, beta~) or "fixed_large" (beta)
            (Ho et al. 2020, sec. 3.2).
        clip_sample, clip_sample_range: clamp the predicted x0 to [-range, range] while sampling.
        rescale_zero_terminal_snr: rescale betas to zero terminal SNR (Lin et al. 2024, Algorithm 1).
        timestep_spacing: how `timesteps(n)` picks n of the T steps: "leading", "trailing" or "linspace" (as
            diffusers; Lin et al. 2024, table 2).
        set_alpha_to_one: DDIM's last step ends at acp = 1 (True) or at acp[0] (False), as diffusers.
    """

    type_name = "NoiseScheduler"

    def __init__(self, *, num_steps: int = 1000, prediction_type: str = "epsilon",
                 variance_type: str = "fixed_small", clip_sample: bool = False, clip_sample_range: float = 1.0,
                 rescale_zero_terminal_snr: bool = False, timestep_spacing: str = "leading",
                 set_alpha_to_one: bool = True) -> None:
        owner = type(self).__name__
        self.num_steps = _int_arg(owner, "num_steps", num_steps, 1)
        self.prediction_type = _choice_arg(owner, "prediction_type", prediction_type, PREDICTION_TYPES)
        self.variance_type = _choice_arg(owner, "variance_type", variance_type, VARIANCE_TYPES)
        self.clip_sample = _bool_arg(owner, "clip_sample", clip_sample)
        self.clip_sample_range = _float_arg(owner, "clip_sample_range", clip_sample_range, 0.0, math.inf,
                                            low_open=True, high_open=True)
        self.rescale_zero_terminal_snr = _bool_arg(owner, "rescale_zero_terminal_snr", rescale_zero_terminal_snr)
        self.timestep_spacing = _choice_arg(owner, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.set_alpha_to_one = _bool_arg(owner, "set_alpha_to_one", set_alpha_to_one)
        self._tables: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    def _build_tables(self) -> None:
        """Called by subclasses once their own arguments are set: betas and every table derived from them."""
        betas = self._make_betas().to(torch.float64)
        if self.rescale_zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        # From the betas' side: 1 - acp near t = 0 is small and keeps its digits this way.
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # DDIM's acp after the last step (diffusers' final_alpha_cumprod).
        self.final_alpha_cumprod = 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

    def _make_betas(self) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------------------------
    # Config.
    # ------------------------------------------------------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """Every constructor argument as a plain dict with "type": `build_scheduler(s.config)` rebuilds s."""
        params = [name for name, p in inspect.signature(type(self)).parameters.items() if p.kind is p.KEYWORD_ONLY]
        return {"type": self.type_name, **{name: getattr(self, name) for name in params}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "type")
        return f"{type(self).__name__}({args})"

    def __len__(self) -> int:
        return self.num_steps

    # ------------------------------------------------------------------------------------------------------------------
    # Tables on the device of the data.
    # ------------------------------------------------------------------------------------------------------------------

    def _device_tables(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tables on `device`, cached: the noising tables in `dtype` (float32, or float64 for float64 data), and
        alphas_cumprod in float64 for the steps (their ops compute per-sample coefficients like 1 - acp in float64)."""
        device = torch.device(device)
        key = (device, dtype)
        if key not in self._tables:
            step_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
            self._tables[key] = {
                "sqrt_alphas_cumprod": self.sqrt_alphas_cumprod.to(device=device, dtype=dtype),
                "sqrt_one_minus_alphas_cumprod": self.sqrt_one_minus_alphas_cumprod.to(device=device, dtype=dtype),
                "alphas_cumprod": self.alphas_cumprod.to(device=device, dtype=step_dtype),
            }
        return self._tables[key]

    def _tables_for(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return self._device_tables(x.device, dtype)

    def _check_t(self, t: Any, x: torch.Tensor | None = None, x_name: str = "x") -> None:
        """t: an int or an int64 tensor [N] (N = x's batch size), each in [0, num_steps)."""
        n = 1 if x is None else x.shape[0]
        if x is None and isinstance(t, torch.Tensor) and t.dim() == 1:
            n = t.shape[0]
        noise_ops._check_timesteps(type(self).__name__, "t", t, n, 0, self.num_steps, x_name)

    def _check_x(self, name: str, x: Any) -> torch.Tensor:
        return noise_ops._check_tensor(type(self).__name__, name, x)

    # ------------------------------------------------------------------------------------------------------------------
    # Forward process and training targets.
    # ------------------------------------------------------------------------------------------------------------------

    def snr(self, t: int | torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio acp[t] / (1 - acp[t]) (float64; [N] for t [N], 0-d for an int t)."""
        self._check_t(t)
        index = t.cpu() if isinstance(t, torch.Tensor) else torch.tensor(int(t))
        acp = self.alphas_cumprod[index]
        snr = acp / (1.0 - acp)
        return snr.to(t.device) if isinstance(t, torch.Tensor) else snr

    def add_noise(self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Noises x0 to timestep t (the forward process q(x_t | x0), Ho et al. 2020, eq. 4).

        x0: [N, ...]; t: int64 [N] or an int, in [0, num_steps); noise: like x0, or None to draw it with
        torch.randn(..., generator=generator) in x0's dtype and device.
        Returns the tuple (x_t, noise): x_t = sqrt(acp[t]) x0 + sqrt(1 - acp[t]) noise, in x0's dtype, and the noise
        used (the epsilon target of training).
        """
        self._check_x("x0", x0)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        tables = self._tables_for(x0)
        x_t = noise_ops.add_noise(x0, noise, t, tables["sqrt_alphas_cumprod"], tables["sqrt_one_minus_alphas_cumprod"])
        return x_t, noise

    def get_velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """v = sqrt(acp[t]) noise - sqrt(1 - acp[t]) x0 (Salimans & Ho 2022). x0, noise: [N, ...]; t: [N] or int."""
        self._check_x("x0", x0)
        tables = self._tables_for(x0)
        return noise_ops.velocity(x0, noise, t, tables["sqrt_alphas_cumprod"], tables["sqrt_one_minus_alphas_cumprod"])

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """What the model learns to predict from x_t: noise ("epsilon"), velocity ("v") or x0 ("sample")."""
        if self.prediction_type == "v":
            return self.get_velocity(x0, noise, t)
        self._check_x("x0", x0)
        noise_ops._check_same_shape(type(self).__name__, "noise", noise, "x0", x0)
        self._check_t(t, x0, "x0")
        return noise if self.prediction_type == "epsilon" else x0

    def _split(self, model_output: torch.Tensor, x_t: torch.Tensor,
               t: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Checked inputs in the compute dtype and the per-sample sqrt(acp[t]), sqrt(1 - acp[t]) ([N, 1, ...])."""
        owner = type(self).__name__
        self._check_x("x_t", x_t)
        noise_ops._check_same_shape(owner, "model_output", model_output, "x_t", x_t)
        self._check_t(t, x_t, "x_t")
        tables = self._tables_for(x_t)
        x = x_t.to(noise_ops._compute_dtype(x_t))
        a, b = noise_ops._noise_coefs(x, t, tables["sqrt_alphas_cumprod"], tables["sqrt_one_minus_alphas_cumprod"])
        return model_output.to(x.dtype), x, a, b

    def predict_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """x0 implied by the model output at x_t (per prediction_type). All [N, ...]; returns x_t's dtype."""
        m, x, a, b = self._split(model_output, x_t, t)
        return noise_ops._predict_x0(m, x, a, b, self.prediction_type).to(x_t.dtype)

    def predict_noise(self, model_output: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The noise (epsilon) implied by the model output at x_t (per prediction_type); returns x_t's dtype."""
        m, x, a, b = self._split(model_output, x_t, t)
        return noise_ops._predict_eps(m, x, a, b, self.prediction_type).to(x_t.dtype)

    # ------------------------------------------------------------------------------------------------------------------
    # Sampling.
    # ------------------------------------------------------------------------------------------------------------------

    def _check_num_inference_steps(self, num_inference_steps: Any) -> int:
        n = _int_arg(type(self).__name__, "num_inference_steps", num_inference_steps, 1)
        if n > self.num_steps:
            raise ValueError(f"{type(self).__name__}: num_inference_steps must be <= num_steps = {self.num_steps}, "
                             f"got {n}")
        return n

    def timesteps(self, num_inference_steps: int | None = None) -> torch.Tensor:
        """The sampling timesteps, descending (int64 [num_inference_steps]); None: all num_steps steps.

        Spaced as diffusers' set_timesteps (steps_offset = 0), with T = num_steps and n = num_inference_steps:
        "leading": (T // n) * [n-1, ..., 1, 0]; "trailing": round(T - i T / n) - 1 for i in 0..n-1;
        "linspace": round(linspace(0, T - 1, n)) reversed. (diffusers' "trailing" sometimes yields n + 1 steps, the
        last being -1, from a floating-point np.arange; here it always yields n, the first n of diffusers'.)
        """
        T = self.num_steps
        if num_inference_steps is None:
            return torch.arange(T - 1, -1, -1, dtype=torch.long)
        n = self._check_num_inference_steps(num_inference_steps)
        if self.timestep_spacing == "leading":
            steps = (np.arange(0, n) * (T // n)).round()[::-1]
        elif self.timestep_spacing == "trailing":
            steps = np.round(np.arange(T, 0, -T / n))[:n] - 1
        else:  # "linspace"
            steps = np.linspace(0, T - 1, n).round()[::-1]
        return torch.from_numpy(steps.astype(np.int64).copy())

    def previous_timestep(self, t: int | torch.Tensor, num_inference_steps: int | None = None) -> int | torch.Tensor:
        """The timestep a sampling step from t lands on: the next one in `timesteps(num_inference_steps)`, i.e. the
        largest scheduled timestep below t, or -1 (the data) below the last; t - 1 when num_inference_steps is None.

        t: an int (returns an int) or int64 tensor [N] (returns [N] on its device).
        """
        self._check_t(t)
        if num_inference_steps is None:
            return t - 1
        ascending = self.timesteps(num_inference_steps).flip(0)
        t_tensor = t.cpu().long() if isinstance(t, torch.Tensor) else torch.tensor([int(t)])
        index = torch.searchsorted(ascending, t_tensor.reshape(-1), right=False)  # number of scheduled steps < t
        prev = torch.where(index > 0, ascending[(index - 1).clamp(min=0)], torch.full_like(t_tensor.reshape(-1), -1))
        if isinstance(t, torch.Tensor):
            return prev.reshape(t.shape).to(t.device)
        return int(prev[0])

    def _variance_noise(self, x_t: torch.Tensor, generator: torch.Generator | None,
                        variance_noise: torch.Tensor | None, needed: bool) -> torch.Tensor | None:
        if variance_noise is not None:
            if generator is not None:
                raise ValueError(f"{type(self).__name__}: pass generator or variance_noise, not both")
            return variance_noise
        if not needed:
            return None
        return torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)

    def ddpm_step(self, model_output: torch.Tensor, t: int | torch.Tensor, x_t: torch.Tensor,
                  num_inference_steps: int | None = None, generator: torch.Generator | None = None,
                  variance_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One ancestral DDPM step from t to previous_timestep(t, num_inference_steps) (Ho et al. 2020, Algorithm 2;
        with fewer steps the jump's beta is 1 - acp[t] / acp[prev], as diffusers).

        model_output, x_t: [N, ...]; t: int or int64 [N]. Noise (none where t == 0) is variance_noise if given, else
        drawn from `generator`. Returns (x_prev, x0_pred), in x_t's dtype. Equal to diffusers' DDPMScheduler.step.
        """
        self._check_x("x_t", x_t)
        self._check_t(t, x_t, "x_t")
        if num_inference_steps is not None:
            self._check_num_inference_steps(num_inference_steps)
        prev_t = self.previous_timestep(t, num_inference_steps)
        needs_noise = bool((torch.as_tensor(t) > 0).any())
        noise = self._variance_noise(x_t, generator, variance_noise, needs_noise)
        return noise_ops.ddpm_step(model_output, x_t, t, prev_t, self._tables_for(x_t)["alphas_cumprod"],
                                   prediction_type=self.prediction_type, variance_type=self.variance_type,
                                   clip_sample=self.clip_sample, clip_range=self.clip_sample_range,
                                   variance_noise=noise)

    def ddim_step(self, model_output: torch.Tensor, t: int | torch.Tensor, x_t: torch.Tensor,
                  num_inference_steps: int | None, eta: float = 0.0, generator: torch.Generator | None = None,
                  variance_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step from t to previous_timestep(t, num_inference_steps) (Song et al. 2021, eq. 12).

        model_output, x_t: [N, ...]; t: int or int64 [N]; eta in [0, 1] (0: deterministic). When eta > 0 the noise is
        variance_noise if given, else drawn from `generator`. The last step lands on acp = 1 (set_alpha_to_one) or
        acp[0]. Returns (x_prev, x0_pred), in x_t's dtype. Equal to diffusers' DDIMScheduler.step (with
        use_clipped_model_output=True when clip_sample) wherever both land on the same timestep: diffusers always
        steps to t - T // n, which is the next scheduled timestep for "leading" (and "trailing" when n divides T),
        but not for "linspace" or other "trailing" counts, where it leaves the schedule; here the step always lands
        on the next scheduled timestep, as diffusers' DDPMScheduler does.
        """
        self._check_x("x_t", x_t)
        self._check_t(t, x_t, "x_t")
        if num_inference_steps is not None:
            self._check_num_inference_steps(num_inference_steps)
        eta = noise_ops._check_real(type(self).__name__, "eta", eta, 0.0, 1.0)
        prev_t = self.previous_timestep(t, num_inference_steps)
        noise = self._variance_noise(x_t, generator, variance_noise, eta > 0)
        return noise_ops.ddim_step(model_output, x_t, t, prev_t, self._tables_for(x_t)["alphas_cumprod"], eta=eta,
                                   prediction_type=self.prediction_type, clip_sample=self.clip_sample,
                                   clip_range=self.clip_sample_range, variance_noise=noise,
                                   final_alpha_cumprod=self.final_alpha_cumprod)


class LinearScheduler(NoiseScheduler):
    """Linear betas (Ho et al. 2020): betas = linspace(beta_start, beta_end, num_steps).

    scale_betas_with_steps (default True) multiplies beta_start and beta_end by 1000 / num_steps first (improved DDPM,
    Nichol & Dhariwal 2021, sec. 3.2), so the defaults 1e-4..0.02 are the DDPM schedule at 1000 steps and span the
    same noise at any other number. Equal to diffusers' beta_schedule="linear" given the scaled beta_start/end.
    """

    type_name = "LinearScheduler"

    def __init__(self, *, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 scale_betas_with_steps: bool = True, prediction_type: str = "epsilon",
                 variance_type: str = "fixed_small", clip_sample: bool = False, clip_sample_range: float = 1.0,
                 rescale_zero_terminal_snr: bool = False, timestep_spacing: str = "leading",
                 set_alpha_to_one: bool = True) -> None:
        super().__init__(num_steps=num_steps, prediction_type=prediction_type, variance_type=variance_type,
                         clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                         rescale_zero_terminal_snr=rescale_zero_terminal_snr, timestep_spacing=timestep_spacing,
                         set_alpha_to_one=set_alpha_to_one)
        owner = type(self).__name__
        self.beta_start = _float_arg(owner, "beta_start", beta_start, 0.0, 1.0, low_open=True, high_open=True)
        self.beta_end = _float_arg(owner, "beta_end", beta_end, self.beta_start, 1.0, high_open=True)
        self.scale_betas_with_steps = _bool_arg(owner, "scale_betas_with_steps", scale_betas_with_steps)
        scale = 1000.0 / self.num_steps if self.scale_betas_with_steps else 1.0
        if self.beta_end * scale >= 1.0:
            raise ValueError(f"{owner}: beta_end * 1000 / num_steps = {self.beta_end * scale} must be < 1 "
                             f"(beta_end={self.beta_end}, num_steps={self.num_steps}); use more steps, a smaller "
                             f"beta_end or scale_betas_with_steps=False")
        self._build_tables()

    @property
    def scaled_beta_range(self) -> tuple[float, float]:
        """(beta_start, beta_end) after the 1000 / num_steps scaling: the betas' actual endpoints."""
        scale = 1000.0 / self.num_steps if self.scale_betas_with_steps else 1.0
        return self.beta_start * scale, self.beta_end * scale

    def _make_betas(self) -> torch.Tensor:
        start, end = self.scaled_beta_range
        return torch.linspace(start, end, self.num_steps, dtype=torch.float64)


class CosineScheduler(NoiseScheduler):
    """Cosine schedule (Nichol & Dhariwal 2021, "Improved DDPM", eq. 17):

        alpha_bar(u) = cos((u + s) / (1 + s) * pi / 2)^2,  u = t / T,
        betas_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta),  i = 0..T-1,

    so acp[i] = alpha_bar((i + 1) / T) / alpha_bar(0) wherever no beta is capped. s = cosine_s (0.008) keeps beta_0
    from vanishing; max_beta (0.999) avoids the singularity at u = 1. Equal to diffusers' "squaredcos_cap_v2".
    """

    type_name = "CosineScheduler"

    def __init__(self, *, num_steps: int = 1000, cosine_s: float = 0.008, max_beta: float = 0.999,
                 prediction_type: str = "epsilon", variance_type: str = "fixed_small", clip_sample: bool = False,
                 clip_sample_range: float = 1.0, rescale_zero_terminal_snr: bool = False,
                 timestep_spacing: str = "leading", set_alpha_to_one: bool = True) -> None:
        super().__init__(num_steps=num_steps, prediction_type=prediction_type, variance_type=variance_type,
                         clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                         rescale_zero_terminal_snr=rescale_zero_terminal_snr, timestep_spacing=timestep_spacing,
                         set_alpha_to_one=set_alpha_to_one)
        owner = type(self).__name__
        self.cosine_s = _float_arg(owner, "cosine_s", cosine_s, 0.0, 1.0)
        self.max_beta = _float_arg(owner, "max_beta", max_beta, 0.0, 1.0, low_open=True)
        self._build_tables()

    def alpha_bar(self, u: float) -> float:
        """cos((u + s) / (1 + s) * pi / 2)^2 at u = t / T in [0, 1] (unnormalised: alpha_bar(0) < 1)."""
        return math.cos((u + self.cosine_s) / (1 + self.cosine_s) * math.pi / 2) ** 2

    def _make_betas(self) -> torch.Tensor:
        # Python floats, in diffusers' order of operations: its float64 values are reproduced to the last bit or so.
        T = self.num_steps
        betas = [min(1 - self.alpha_bar((i + 1) / T) / self.alpha_bar(i / T), self.max_beta) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float64)


class QuadraticScheduler(NoiseScheduler):
    """Quadratic betas: betas = linspace(sqrt(beta_start), sqrt(beta_end), num_steps)^2 (the latent diffusion
    schedule, Rombach et al. 2022; diffusers' "scaled_linear"). No step-count scaling: pass the endpoints you want.
    """

    type_name = "QuadraticScheduler"

    def __init__(self, *, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 prediction_type: str = "epsilon", variance_type: str = "fixed_small", clip_sample: bool = False,
                 clip_sample_range: float = 1.0, rescale_zero_terminal_snr: bool = False,
                 timestep_spacing: str = "leading", set_alpha_to_one: bool = True) -> None:
        super().__init__(num_steps=num_steps, prediction_type=prediction_type, variance_type=variance_type,
                         clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                         rescale_zero_terminal_snr=rescale_zero_terminal_snr, timestep_spacing=timestep_spacing,
                         set_alpha_to_one=set_alpha_to_one)
        owner = type(self).__name__
        self.beta_start = _float_arg(owner, "beta_start", beta_start, 0.0, 1.0, low_open=True, high_open=True)
        self.beta_end = _float_arg(owner, "beta_end", beta_end, self.beta_start, 1.0, high_open=True)
        self._build_tables()

    def _make_betas(self) -> torch.Tensor:
        return torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, self.num_steps, dtype=torch.float64) ** 2


class UnknownSchedulerError(KeyError, ValueError):
    """An unknown scheduler name: a ValueError (like every bad argument here) and a KeyError (a failed lookup)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class _Registry(dict):
    """A dict of scheduler classes whose failed lookups list the valid names."""

    def __missing__(self, key: Any) -> type[NoiseScheduler]:
        raise UnknownSchedulerError(f"unknown scheduler {key!r}; valid schedulers: {list(self)}")


SCHEDULER_REGISTRY: dict[str, type[NoiseScheduler]] = _Registry({
    "LinearScheduler": LinearScheduler,
    "CosineScheduler": CosineScheduler,
    "QuadraticScheduler": QuadraticScheduler,
})


def build_scheduler(config: Mapping[str, Any] | NoiseScheduler) -> NoiseScheduler:
    """A scheduler from a config dict {"type": "CosineScheduler", "num_steps": 500, ...} (or a scheduler, as is).

    An unknown type raises a ValueError listing the valid ones; an unknown key one naming it and the valid keys;
    a bad value one naming the argument.
    """
    if isinstance(config, NoiseScheduler):
        return config
    if not isinstance(config, Mapping):
        raise ValueError(f"build_scheduler: config must be a dict, got {type(config).__name__}")
    cls, kwargs = check_typed_config(config, SCHEDULER_REGISTRY, "build_scheduler", "scheduler")
    return cls(**kwargs)
