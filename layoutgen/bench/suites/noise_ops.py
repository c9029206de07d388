"""The scheduler's noise ops: ours (the compiled C++/CUDA extension, torch.ops.layoutgen) against the eager reference
(the chain diffusers' DDPMScheduler.add_noise runs: gather, pow, mul, mul, add) and torch.compile of that reference.

Shapes: the seed's latents (N=64, 16x32x32), autoencoder-size tensors (N=16, 3x512x512) and a large batch of
latents (N=1024, 16x32x32). Rows:
- add_noise: x_t = sqrt(acp[t]) x0 + sqrt(1 - acp[t]) noise, per-sample t. GB/s counts the bytes the op must move at
  least: two reads (x0, noise) and one write (x_t) of the tensor's size.
- add_noise + noise draw: the noise drawn too; ours is the fused Philox op (writes noise and x_t in one pass: one
  read, two writes), eager and compile draw with torch.randn and then run the chain.
- ddim_step (epsilon, eta 0.5 with noise): x_prev and x0 from model_output, x_t and the noise: three reads, two
  writes; eager is the reference of kernels/noise_ops.py, compile its torch.compile.
"ours" calls the op itself (no argument checks, as eager and compile have none); "ours+checks" the public function
(which validates t: on a GPU that is one device-to-host sync per call). "% copy" relates ours' GB/s to a large device
copy measured in the same run. Targets: on a CPU, add_noise >= 2x eager on the large tensors; on a GPU >= 3x eager and
>= 85% of the copy bandwidth.
"""
from __future__ import annotations

import torch

from layoutgen.kernels import noise_ops

SHAPES = {"latents": (64, 16, 32, 32), "autoencoder": (16, 3, 512, 512), "large batch": (1024, 16, 32, 32)}
QUICK_CPU = ("latents", "autoencoder")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NUM_STEPS = 1000
OPS = ("add_noise", "add_noise + noise draw", "ddim_step")


def schedule(device: torch.device) -> dict[str, torch.Tensor]:
    """A cosine schedule's tables (float64 alphas_cumprod, as the schedulers keep them)."""
    from layoutgen.models.components.scheduler import CosineScheduler

    s = CosineScheduler(num_steps=NUM_STEPS)
    return {"acp": s.alphas_cumprod.to(device), "sqrt_acp": s.sqrt_alphas_cumprod.to(device, torch.float32),
            "sqrt_1m_acp": s.sqrt_one_minus_alphas_cumprod.to(device, torch.float32)}


def diffusers_add_noise(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                        t: torch.Tensor) -> torch.Tensor:
    """diffusers' DDPMScheduler.add_noise, line for line (alphas_cumprod already in x0's dtype and device)."""
    sqrt_alpha_prod = alphas_cumprod[t] ** 0.5
    sqrt_alpha_prod = sqrt_alpha_prod.flatten()
    while len(sqrt_alpha_prod.shape) < len(x0.shape):
        sqrt_alpha_prod = sqrt_alpha_prod.unsqueeze(-1)
    sqrt_one_minus_alpha_prod = (1 - alphas_cumprod[t]) ** 0.5
    sqrt_one_minus_alpha_prod = sqrt_one_minus_alpha_prod.flatten()
    while len(sqrt_one_minus_alpha_prod.shape) < len(x0.shape):
        sqrt_one_minus_alpha_prod = sqrt_one_minus_alpha_prod.unsqueeze(-1)
    return sqrt_alpha_prod * x0 + sqrt_one_minus_alpha_prod * noise


def diffusers_add_noise_drawn(alphas_cumprod: torch.Tensor, x0: torch.Tensor, t: torch.Tensor):
    noise = torch.randn_like(x0)
    return diffusers_add_noise(alphas_cumprod, x0, noise, t), noise


def analytic_bytes(op: str, numel: int, dtype: torch.dtype) -> int:
    size = numel * torch.tensor([], dtype=dtype).element_size()
    return {"add_noise": 3, "add_noise + noise draw": 3, "ddim_step": 5}[op] * size


def make_fns(op: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, tables) -> dict:
    """provider -> zero-argument callable, on fixed random inputs."""
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(shape, generator=g, device=device, dtype=dtype)
    noise = torch.randn(shape, generator=g, device=device, dtype=dtype)
    t = torch.randint(0, NUM_STEPS, (shape[0],), generator=g, device=device)
    acp_data = tables["acp"].to(dtype)
    a, b = tables["sqrt_acp"], tables["sqrt_1m_acp"]
    ops = torch.ops.layoutgen
    if op == "add_noise":
        compiled = torch.compile(diffusers_add_noise, dynamic=False)
        return {"eager": lambda: diffusers_add_noise(acp_data, x0, noise, t),
                "compile": lambda: compiled(acp_data, x0, noise, t),
                "ours": lambda: ops.add_noise(x0, noise, t, a, b),
                "ours+checks": lambda: noise_ops.add_noise(x0, noise, t, a, b)}
    if op == "add_noise + noise draw":
        compiled = torch.compile(diffusers_add_noise_drawn, dynamic=False)
        return {"eager": lambda: diffusers_add_noise_drawn(acp_data, x0, t),
                "compile": lambda: compiled(acp_data, x0, t),
                "ours": lambda: ops.add_noise_philox(x0, t, a, b, 1234, 0),
                "ours+checks": lambda: noise_ops.add_noise_philox(x0, t, a, b, 1234, 0)}
    prev_t = (t - NUM_STEPS // 50).clamp(min=-1)
    acp = tables["acp"]
    args = (noise, x0, t, prev_t, acp, 0.5, "epsilon", False, 1.0, noise, 1.0)
    compiled = torch.compile(noise_ops.ddim_step_ref, dynamic=False)
    return {"eager": lambda: noise_ops.ddim_step_ref(*args), "compile": lambda: compiled(*args),
            "ours": lambda: ops.ddim_step(*args), "ours+checks": lambda: noise_ops.ddim_step(*args)}
