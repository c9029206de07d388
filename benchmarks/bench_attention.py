"""Spatial self-attention: the backends of layoutgen.kernels.attention (sdpa, xformers, math) side by side.

    python benchmarks/bench_attention.py [--quick] [--dtype bf16]     # script mode: prints a markdown table
    pytest benchmarks/bench_attention.py                              # pytest-benchmark suite

The shapes, backends and FLOP counts are layoutgen.bench.suites.attention (shared with `layoutgen bench`); this file
is its command line and pytest-benchmark suite.
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
from common import bench_parser, environment_line, markdown_table, synced, time_ms  # noqa: E402

from layoutgen.bench.suites.attention import (  # noqa: E402
    CPU_SHAPES, DTYPES, GPU_SHAPES, MODES, QUICK_CPU, QUICK_GPU, backends, flops, make_inputs, runner)
from layoutgen.kernels.attention import xformers_available  # noqa: E402


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

        timed = synced(run, _DEVICE)
        timed()
        benchmark.extra_info["TFLOP"] = flops(shape, mode) / 1e12
        benchmark(timed)


if __name__ == "__main__":
    main()
