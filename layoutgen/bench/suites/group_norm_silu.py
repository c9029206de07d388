"""GroupNorm+SiLU: ours (the Triton kernels) against eager PyTorch, torch.compile of the reference and apex.

Shapes (8 groups, the seed's): the autoencoder's (N=16, C 32..256, 512x512 down to 32x32) and the UNet's (N=64,
C 64..512, 32x32 down to 4x4). On a CPU the same table runs at reduced sizes, comparing the reference with
torch.compile (the Triton kernels only run there in the interpreter, which is not a speed).
Providers: eager (F.group_norm then F.silu), compile (torch.compile of that), ours (CUDA: the Triton kernels as the
library runs them), ours-1pass (CUDA: the same with the one-pass chunked kernels, group_norm_silu_one_pass.py, which
read every input once where the default two-pass ones read it twice; shapes on the single-pass path run the same
kernel in both), apex (NVIDIA apex's contrib NHWC GroupNorm with fused swish, when importable, on the shapes it
supports natively: 16 or 32 groups and its channel list, so with the seed's 8 groups it has none and says so).
Modes: fwd, bwd (gradients of x, weight and bias from a kept graph), fwd+bwd.
GB/s counts the bytes a fused kernel must move at least: fwd reads x and writes y, bwd reads x and dy and writes dx
(parameters and statistics are negligible).
"""
from __future__ import annotations

import contextlib
import math

import torch

from layoutgen.bench.timing import time_ms
from layoutgen.kernels import group_norm_silu, group_norm_silu_ref
from layoutgen.kernels.backend import use_kernel_choice

GROUPS = 8
AUTOENCODER = [(16, 32, 512, 512), (16, 64, 256, 256), (16, 128, 128, 128), (16, 256, 64, 64), (16, 256, 32, 32)]
UNET = [(64, 64, 32, 32), (64, 128, 16, 16), (64, 256, 8, 8), (64, 512, 4, 4)]
QUICK_GPU = [(16, 32, 512, 512), (16, 128, 128, 128), (16, 256, 32, 32), (64, 64, 32, 32), (64, 512, 4, 4)]
CPU = [(2, 32, 128, 128), (2, 128, 32, 32), (8, 256, 8, 8), (16, 512, 4, 4)]
QUICK_CPU = [(2, 32, 128, 128), (16, 512, 4, 4)]
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _apex_group_norm():
    """NVIDIA apex's contrib GroupNorm class, or None (the PyPI package named apex is unrelated)."""
    try:
        from apex.contrib.group_norm import GroupNorm
    except Exception:  # ImportError, or an apex built without its CUDA extensions
        return None
    return GroupNorm


def providers(device: torch.device) -> list[str]:
    names = ["eager", "compile"]
    if device.type == "cuda":
        names += ["ours", "ours-1pass"]
        if _apex_group_norm() is not None:
            names.append("apex")
    return names


def make_fn(provider: str, c: int, device: torch.device, dtype: torch.dtype, x: torch.Tensor):
    """A callable (x, weight, bias) -> y for `provider`, or None where it does not apply."""
    if provider == "eager":
        return lambda x, w, b: group_norm_silu_ref(x, GROUPS, w, b)
    if provider == "compile":
        compiled = torch.compile(group_norm_silu_ref, dynamic=False)
        return lambda x, w, b: compiled(x, GROUPS, w, b)
    if provider in ("ours", "ours-1pass"):
        def ours(x, w, b):
            with kernel_choice(provider):
                return group_norm_silu(x, GROUPS, w, b)
        return ours
    if provider == "apex":
        cls = _apex_group_norm()
        module = cls(GROUPS, c, act="silu").to(device=device, dtype=dtype)
        if not module._check_legality(x):
            return None  # apex would fall back to PyTorch itself: no point timing that as "apex"
        return lambda x, w, b: module(x)
    raise ValueError(provider)


def inputs(shape, device, dtype, channels_last, requires_grad):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1], device=device, dtype=dtype, generator=gen)
    b = torch.randn(shape[1], device=device, dtype=dtype, generator=gen)
    dy = torch.randn_like(x)
    for t in (x, w, b):
        t.requires_grad_(requires_grad)
    return x, w, b, dy


def kernel_choice(provider: str | None) -> contextlib.AbstractContextManager:
    """The kernel choice `provider` runs under, forward and backward: ours, the Triton kernels with the two-pass
    chunked kernels; ours-1pass, with the one-pass ones; any other, the process's own choice. The backward must run
    under it too: it reads the chunked-path choice when it runs, not when the forward did."""
    if provider == "ours":
        return use_kernel_choice("triton", "two-pass")
    if provider == "ours-1pass":
        return use_kernel_choice("triton", "one-pass")
    return contextlib.nullcontext()


def runner(fn, mode: str, x, w, b, dy, provider: str | None = None):
    """A no-argument callable running `mode` once, under kernel_choice(provider)."""
    if mode == "fwd":
        def run():
            with torch.no_grad(), kernel_choice(provider):
                fn(x, w, b)
        return run
    if mode == "bwd":
        y = fn(x, w, b)

        def run():
            with kernel_choice(provider):
                torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
        return run

    def run():
        with kernel_choice(provider):
            torch.autograd.grad(fn(x, w, b), (x, w, b), dy)
    return run


def analytic_bytes(shape, dtype, mode: str) -> int:
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * size


def measure(shape, dtype, channels_last, mode, provider, device, repeats) -> float | None:
    x, w, b, dy = inputs(shape, device, dtype, channels_last, requires_grad=mode != "fwd")
    fn = make_fn(provider, shape[1], device, dtype, x)
    if fn is None:
        return None
    return time_ms(runner(fn, mode, x, w, b, dy, provider), device, warmup=3 if device.type == "cpu" else 10,
                   repeats=repeats)


# The targets for ours on a GPU (bf16, one run): (what, mode, column, minimum, shapes it applies to).
TARGETS = [
    ("forward >= 3x eager", "fwd", "vs eager", 3.0, "all"),
    ("forward >= 1.2x torch.compile", "fwd", "vs compile", 1.2, "all"),
    ("forward+backward >= 2x eager", "fwd+bwd", "vs eager", 2.0, "all"),
    ("forward >= 70% of the measured copy bandwidth", "fwd", "% copy", 70.0, "autoencoder"),
]


def target_verdicts(rows: list[dict], provider: str = "ours") -> list[str]:
    """One line per target: PASS or FAIL with the worst row (shape, layout and its figure), from the bench rows of
    `provider` (dicts with shape "NxCxHxW", layout, mode, provider and the target's column)."""
    autoencoder = {"x".join(map(str, s)) for s in AUTOENCODER}
    lines = []
    for what, mode, column, minimum, shapes in TARGETS:
        measured = [r for r in rows if r["provider"] == provider and r["mode"] == mode and r.get(column) is not None
                    and (shapes == "all" or r["shape"] in autoencoder)]
        if not measured:
            lines.append(f"- {what}: not measured in this run")
            continue
        worst = min(measured, key=lambda r: r[column])
        verdict = "PASS" if worst[column] >= minimum else "FAIL"
        lines.append(f"- {what}: {verdict} (worst {worst[column]:.2f} at {worst['shape']} {worst['layout']}; "
                     f"{len(measured)} rows)")
    return lines
