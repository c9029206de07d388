"""Spatial self-attention: the backends of layoutgen.kernels.attention (sdpa, xformers, math) side by side.

Shapes [B, heads, tokens, head_dim] from the seed's blocks: the autoencoder's middle attention at the 32x32 latent
(N=16, 1 head of 128 channels), the UNet's attention levels (N=64, 4 heads, 16x16 and 8x8 tokens, 64..256
channels), ControlNet's cross-attention shape is the same. On a CPU: math vs sdpa at reduced batch.
TFLOP/s from the analytic count: forward 4 * B * H * Lq * Lk * D (q k^T and P v), backward 2.5x the forward
(flash-attention's convention: five matmuls of the same size, minus the recomputation they count separately).
"""
from __future__ import annotations

import torch

from layoutgen.kernels import attention
from layoutgen.kernels.attention import xformers_available

# (B, heads, tokens, head_dim)
GPU_SHAPES = [(16, 1, 1024, 128), (64, 4, 256, 32), (64, 4, 256, 64), (64, 4, 64, 64)]
QUICK_GPU = [(16, 1, 1024, 128), (64, 4, 256, 64)]
CPU_SHAPES = [(2, 1, 1024, 128), (8, 4, 256, 32)]
QUICK_CPU = [(2, 1, 1024, 128)]
MODES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def backends(device: torch.device) -> list[str]:
    names = ["math", "sdpa"]
    if device.type == "cuda" and xformers_available():
        names.append("xformers")
    return names


def flops(shape, mode: str) -> float:
    b, h, l, d = shape
    forward = 4.0 * b * h * l * l * d
    return forward * (1.0 if mode == "fwd" else 3.5)


def runner(backend: str, mode: str, q, k, v, dy):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                attention(q, k, v, backend=backend)
        return run
    return lambda: torch.autograd.grad(attention(q, k, v, backend=backend), (q, k, v), dy)


def make_inputs(shape, device, dtype, requires_grad):
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_(requires_grad)
               for _ in range(3))
    return q, k, v, torch.randn(shape, device=device, dtype=dtype, generator=gen)
