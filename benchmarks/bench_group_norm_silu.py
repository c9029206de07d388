"""GroupNorm+SiLU: ours (the Triton kernels) against eager PyTorch, torch.compile of the reference and apex.

    python benchmarks/bench_group_norm_silu.py [--quick] [--dtype bf16]     # script mode: prints a markdown table
    pytest benchmarks/bench_group_norm_silu.py                              # pytest-benchmark suite

Shapes (8 groups, the seed's): the autoencoder's (N=16, C 32..256, 512x512 down to 32x32) and the UNet's (N=64,
C 64..512, 32x32 down to 4x4). On a CPU the same table runs at reduced sizes, comparing the reference with
torch.compile (the Triton kernels only run there in the interpreter, which is not a speed).
Providers: eager (F.group_norm then F.silu), compile (torch.compile of that), ours (CUDA), apex (NVIDIA apex's
contrib NHWC GroupNorm with fused swish, when importable, on the shapes it supports natively: 16 or 32 groups and
its channel list, so with the seed's 8 groups it has none and says so).
Modes: fwd, bwd (gradients of x, weight and bias from a kept graph), fwd+bwd.
GB/s counts the bytes a fused kernel must move at least: fwd reads x and writes y, bwd reads x and dy and writes dx
(parameters and statistics are negligible). "% copy" relates it to a large device copy measured in the same run.
"""
from __future__ import annotations

import math
import os
import sys

import torch

try:  # the script mode runs without pytest (a bare GPU machine); the suite below needs it
    import pytest
except ImportError:
    pytest = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (allow_recompiles, bench_parser, copy_bandwidth_gbs, environment_line, gbs,  # noqa: E402
                    markdown_table, time_ms)

from layoutgen.kernels import group_norm_silu, group_norm_silu_ref, use_backend  # noqa: E402

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
        names.append("ours")
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
    if provider == "ours":
        def ours(x, w, b):
            with use_backend("triton"):
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


def runner(fn, mode: str, x, w, b, dy):
    """A no-argument callable running `mode` once."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(x, w, b)
        return run
    if mode == "bwd":
        y = fn(x, w, b)
        return lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
    return lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), dy)


def analytic_bytes(shape, dtype, mode: str) -> int:
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * size


def measure(shape, dtype, channels_last, mode, provider, device, repeats) -> float | None:
    x, w, b, dy = inputs(shape, device, dtype, channels_last, requires_grad=mode != "fwd")
    fn = make_fn(provider, shape[1], device, dtype, x)
    if fn is None:
        return None
    return time_ms(runner(fn, mode, x, w, b, dy), device, warmup=3 if device.type == "cpu" else 10, repeats=repeats)



def main(argv=None) -> None:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--channels-last", action="store_true", help="NHWC inputs (apex only runs on these)")
    args = parser.parse_args(argv)
    allow_recompiles(4096)  # one graph per shape, layout and mode
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    if on_gpu:
        shapes = QUICK_GPU if args.quick else AUTOENCODER + UNET
    else:
        shapes = QUICK_CPU if args.quick else CPU
    repeats = args.repeats or (5 if not on_gpu else (20 if args.quick else 50))
    layouts = [args.channels_last] if (args.quick or not on_gpu) else [False, True]
    names = providers(device)
    ceiling = copy_bandwidth_gbs(device)
    rows = []
    for shape in shapes:
        for channels_last in layouts:
            for mode in MODES:
                times = {p: measure(shape, dtype, channels_last, mode, p, device, repeats) for p in names}
                eager, compiled = times["eager"], times["compile"]
                for p in names:
                    ms = times[p]
                    if ms is None:
                        continue
                    rate = gbs(analytic_bytes(shape, dtype, mode), ms)
                    rows.append({"shape": "x".join(map(str, shape)), "layout": "NHWC" if channels_last else "NCHW",
                                 "mode": mode, "provider": p, "ms": ms, "GB/s": rate, "% copy": 100 * rate / ceiling,
                                 "vs eager": eager / ms, "vs compile": compiled / ms})
    print(f"## GroupNorm+SiLU ({GROUPS} groups, {str(dtype).replace('torch.', '')}), median of {repeats} runs")
    print()
    print(f"{environment_line(device)}; measured copy bandwidth {ceiling:.0f} GB/s")
    if on_gpu and "apex" not in names:
        print("apex: not importable (NVIDIA apex with its contrib group_norm extension), not compared")
    elif on_gpu:
        print("apex: compared only where it runs its own kernels (16 or 32 groups, its channel list, NHWC)")
    print()
    print(markdown_table(rows, ["shape", "layout", "mode", "provider", "ms", "GB/s", "% copy", "vs eager",
                                "vs compile"]))
    print()
    print("vs eager / vs compile: speed-up over that provider (higher is faster).")


# ---------------------------------------------------------------------------------------------------------------------
# pytest-benchmark suite: pytest benchmarks/bench_group_norm_silu.py [--benchmark-only]
# ---------------------------------------------------------------------------------------------------------------------

if pytest is not None:
    _DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _SUITE_SHAPES = QUICK_GPU if _DEVICE.type == "cuda" else QUICK_CPU[:1]
    _SUITE_DTYPE = torch.bfloat16 if _DEVICE.type == "cuda" else torch.float32
    allow_recompiles(4096)  # one graph per shape, layout and mode

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("provider", providers(_DEVICE))
    @pytest.mark.parametrize("shape", _SUITE_SHAPES, ids=lambda s: "x".join(map(str, s)))
    def test_group_norm_silu(benchmark, shape, provider, mode):
        x, w, b, dy = inputs(shape, _DEVICE, _SUITE_DTYPE, False, requires_grad=mode != "fwd")
        fn = make_fn(provider, shape[1], _DEVICE, _SUITE_DTYPE, x)
        if fn is None:
            pytest.skip(f"{provider} does not support this shape")
        run = runner(fn, mode, x, w, b, dy)

        def synced():
            run()
            if _DEVICE.type == "cuda":
                torch.cuda.synchronize()

        synced()
        benchmark.extra_info["GB"] = analytic_bytes(shape, _SUITE_DTYPE, mode) / 1e9
        benchmark(synced)


if __name__ == "__main__":
    main()
