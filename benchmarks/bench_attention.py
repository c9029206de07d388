"""Spatial self-attention: the backends of layoutgen.kernels.attention (sdpa, xformers, math) side by side.

    python benchmarks/bench_attention.py [--quick] [--dtype bf16]     # script mode: prints a markdown table
    pytest benchmarks/bench_attention.py                              # pytest-benchmark suite

Shapes [B, heads, tokens, head_dim] from the seed's blocks: the autoencoder's middle attention at the 32x32 latent
(N=16, 1 head of 128 channels), the UNet's attention levels (N=64, 4 heads, 16x16 and 8x8 tokens, 64..256
channels), ControlNet's cross-attention shape is the same. On a CPU: math vs sdpa at reduced batch.
TFLOP/s from the analytic count: forward 4 * B * H * Lq * Lk * D (q k^T and P v), backward 2.5x the forward
(flash-attention's convention: five matmuls of the same size, minus the recomputation they count separately).
"""
from __future__ import annotations

import os
import sys

import torch

try:  # the script mode runs without pytest (a bare GPU machine); the suite below needs it
    import pytest
except ImportError:
    pytest = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_parser, environment_line, markdown_table, time_ms  # noqa: E402

from layoutgen.kernels import attention  # noqa: E402
from layoutgen.kernels.attention import xformers_available  # noqa: E402

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


def main(argv=None) -> None:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    shapes = (QUICK_GPU if args.quick else GPU_SHAPES) if on_gpu else (QUICK_CPU if args.quick else CPU_SHAPES)
    repeats = args.repeats or (20 if on_gpu else 5)
    rows = []
    for shape in shapes:
        for mode in MODES:
            times = {}
            for backend in backends(device):
                q, k, v, dy = make_inputs(shape, device, dtype, requires_grad=mode != "fwd")
                times[backend] = time_ms(runner(backend, mode, q, k, v, dy), device, warmup=3, repeats=repeats)
            for backend, ms in times.items():
                rows.append({"shape": "x".join(map(str, shape)), "mode": mode, "backend": backend, "ms": ms,
                             "TFLOP/s": flops(shape, mode) / (ms * 1e-3) / 1e12, "vs math": times["math"] / ms})
    print(f"## Attention ({str(dtype).replace('torch.', '')}), [B, heads, tokens, head_dim], median of {repeats} runs")
    print()
    print(environment_line(device) + ("; xformers not installed" if on_gpu and not xformers_available() else ""))
    print()
    print(markdown_table(rows, ["shape", "mode", "backend", "ms", "TFLOP/s", "vs math"]))


if pytest is not None:
    _DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _SUITE_SHAPES = QUICK_GPU if _DEVICE.type == "cuda" else [(2, 1, 256, 64)]
    _SUITE_DTYPE = torch.bfloat16 if _DEVICE.type == "cuda" else torch.float32

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("backend", backends(_DEVICE))
    @pytest.mark.parametrize("shape", _SUITE_SHAPES, ids=lambda s: "x".join(map(str, s)))
    def test_attention(benchmark, shape, backend, mode):
        q, k, v, dy = make_inputs(shape, _DEVICE, _SUITE_DTYPE, requires_grad=mode != "fwd")
        run = runner(backend, mode, q, k, v, dy)

        def synced():
            run()
            if _DEVICE.type == "cuda":
                torch.cuda.synchronize()

        synced()
        benchmark.extra_info["TFLOP"] = flops(shape, mode) / 1e12
        benchmark(synced)


if __name__ == "__main__":
    main()
