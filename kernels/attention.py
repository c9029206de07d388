"""Multi-head attention behind one function, for the blocks' spatial self-attention.

`attention(q, k, v)` computes softmax(q k^T / sqrt(d)) v (Vaswani et al., 2017) with a selectable backend:
- "sdpa" (default): torch's scaled_dot_product_attention, which picks flash, memory-efficient or cuDNN kernels;
- "xformers": xformers.ops.memory_efficient_attention (Rabe & Staats, 2021; flash-style tiling), on CUDA tensors
  when the optional xformers package is installed. Its absence is never an error unless it is asked for by name;
- "math": `attention_ref`, the plain formula in eager PyTorch, the reference for tests and benchmarks.

The backend is chosen like the kernel backend (backend.py): the `backend` argument, else the innermost
`use_attention_backend(name)` block, else `set_attention_backend(name)`, else the environment variable
LAYOUTGEN_ATTENTION_BACKEND, else "sdpa".

Layouts: the blocks hold q, k, v as views of a [B, C, H, W] feature map, i.e. [B, heads, H*W, head_dim] whose
head_dim axis is strided (`heads_view`); sdpa takes that layout as is. xformers wants [B, tokens, heads, head_dim]
with a unit stride on head_dim: the transposes are views, and q, k, v are copied only when head_dim is strided. The
output always comes back as [B, heads, Lq, Dv] (a view of xformers' output), and `merge_heads` turns it back into a
[B, C, H, W] map, a view whenever the strides allow it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math

import torch
import torch.nn.functional as F

from layoutgen.kernels.backend import Switch

BACKENDS = ("sdpa", "xformers", "math")
DEFAULT_BACKEND = "sdpa"
ENV_VAR = "LAYOUTGEN_ATTENTION_BACKEND"

# Checked once, without importing xformers (whose import is slow and needs a CUDA build of torch).
XFORMERS_INSTALLED = importlib.util.find_spec("xformers") is not None


# ---------------------------------------------------------------------------------------------------------------------
# Backend selection (same mechanism as layoutgen.kernels.backend)
# ---------------------------------------------------------------------------------------------------------------------

attention_backend = Switch("attention", BACKENDS, DEFAULT_BACKEND, ENV_VAR)


def get_attention_backend() -> str:
    """The innermost use_attention_backend block, else set_attention_backend's, else the environment, else sdpa."""
    return attention_backend.get()


def set_attention_backend(name: str) -> None:
    """Sets the attention backend for the whole process (use_attention_backend blocks still take precedence)."""
    attention_backend.set(name, "set_attention_backend")


def use_attention_backend(name: str) -> contextlib.AbstractContextManager[str]:
    """Uses attention backend `name` inside the block, in this thread."""
    return attention_backend.use(name, "use_attention_backend")


def xformers_available() -> bool:
    """Whether the optional xformers package is installed."""
    return XFORMERS_INSTALLED


# ---------------------------------------------------------------------------------------------------------------------
# Layout helpers
# ---------------------------------------------------------------------------------------------------------------------

def heads_view(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, heads, H*W, C / heads], a view when H and W can be merged (NCHW or channels_last)."""
    b, c = x.shape[:2]
    return x.reshape(b, num_heads, c // num_heads, -1).transpose(-1, -2)


def to_bmhk(t: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, D] -> xformers' [B, L, heads, D]: a view, copied only when D is not unit-stride."""
    t = t.transpose(1, 2)
    return t if t.stride(-1) == 1 else t.contiguous()


def merge_heads(out: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, heads, H*W, D] -> [B, heads * D, H, W]; a view when the attention output is token-major (xformers, flash)."""
    b, h, _, d = out.shape
    return out.transpose(-1, -2).reshape(b, h * d, height, width)


# ---------------------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------------------

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


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if not xformers_available():
        raise RuntimeError("attention: backend 'xformers' was asked for but the xformers package is not installed "
                           "(pip install xformers, CUDA only); use 'sdpa' (the default) or 'math'")
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        raise RuntimeError(f"attention: backend 'xformers' needs CUDA tensors (xformers has no CPU kernels), got "
                           f"q on {q.device}; use 'sdpa' (the default) or 'math'")
    import xformers.ops as xops

    out = xops.memory_efficient_attention(to_bmhk(q), to_bmhk(k), to_bmhk(v))
    return out.transpose(1, 2)  # [B, Lq, H, Dv] -> [B, H, Lq, Dv], a view


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v. q: [B, H, Lq, D], k: [B, H, Lk, D], v: [B, H, Lk, Dv] -> [B, H, Lq, Dv].

    backend: "sdpa", "xformers" or "math"; None takes get_attention_backend() (default "sdpa").
    """
    backend = get_attention_backend() if backend is None else attention_backend.check(backend, "attention")
    _check_qkv(q, k, v)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "xformers":
        return _xformers_attention(q, k, v)
    return attention_ref(q, k, v)
