"""Multi-head attention behind one function, for the blocks' spatial self-attention.

`attention(q, k, v)` computes softmax(q k^T / sqrt(d)) v (Vaswani et al., 2017) with a selectable backend:
- "sdpa" (default): torch's scaled_dot_product_attention, which picks flash, memory-efficient or cuDNN kernels;
- "math": `attention_ref`, the plain formula in eager PyTorch, the reference for tests and benchmarks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "math")
DEFAULT_BACKEND = "sdpa"


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: expected q, k, v of shape [batch, heads, tokens, head_dim], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention in eager PyTorch, softmax in float32 (float64 for float64 inputs).

    [B, H, Lq, D], [B, H, Lk, D], [B, H, Lk, Dv].
    """
    _check_qkv(q, k, v)
    # Upcast half types to float32 but never downcast float64 (which would break gradcheck and float64 references).
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return torch.matmul(scores.softmax(dim=-1), v.to(dtype)).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v. q: [B, H, Lq, D], k: [B, H, Lk, D], v: [B, H, Lk, Dv] -> [B, H, Lq, Dv]."""
    backend = DEFAULT_BACKEND if backend is None else backend
    if backend == "sdpa":
        _check_qkv(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        return attention_ref(q, k, v)
    raise ValueError(f"attention: unknown backend {backend!r}; choose one of {list(BACKENDS)}")
