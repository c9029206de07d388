"""The scheduler's noise ops: ours (the compiled C++/CUDA extension, torch.ops.layoutgen) against the eager reference
(the chain diffusers' DDPMScheduler.add_noise runs: gather, pow, mul, mul, add) and torch.compile of that reference.

    python benchmarks/bench_noise_ops.py [--quick] [--dtype bf16] [--device cuda]   # script mode: a markdown table
    pytest benchmarks/bench_noise_ops.py                                           # pytest-benchmark suite

The shapes, ops, providers, byte counts and targets are layoutgen.bench.suites.noise_ops (shared with
`layoutgen bench`); this file is its command line and pytest-benchmark suite.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (allow_recompiles, bench_parser, copy_bandwidth_gbs, environment_line, gbs,  # noqa: E402
                    markdown_table, synced, time_ms)

from layoutgen.bench.suites.noise_ops import (  # noqa: E402
    DTYPES, OPS, QUICK_CPU, SHAPES, analytic_bytes, make_fns, schedule)
from layoutgen.kernels import noise_ops  # noqa: E402

try:
    import pytest
except ImportError:  # script mode needs no pytest
    pytest = None


def main(argv=None) -> None:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 (and bf16 on a GPU)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    allow_recompiles(256)  # one graph per op and shape
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    status = noise_ops.noise_ops_status()
    if not status.compiled or device.type not in status.devices:
        raise SystemExit(f"bench_noise_ops: no compiled noise ops on {device}: {status.reason}")
    dtypes = [DTYPES[args.dtype]] if args.dtype else ([torch.float32, torch.bfloat16] if on_gpu else [torch.float32])
    names = list(SHAPES) if (on_gpu or not args.quick) else list(QUICK_CPU)
    ops = OPS if not args.quick or on_gpu else ("add_noise", "add_noise + noise draw")
    repeats = args.repeats or (10 if args.quick else 30) if on_gpu else (args.repeats or (5 if args.quick else 10))
    tables = schedule(device)
    copy = copy_bandwidth_gbs(device)
    rows = []
    for dtype in dtypes:
        for op in ops:
            for name in names:
                shape = SHAPES[name]
                fns = make_fns(op, shape, device, dtype, tables)
                times = {p: time_ms(fn, device, warmup=3, repeats=repeats) for p, fn in fns.items()}
                nbytes = analytic_bytes(op, torch.Size(shape).numel(), dtype)
                ours = times["ours"]
                rows.append({"op": op, "shape": f"{name} {'x'.join(map(str, shape))}", "dtype": str(dtype)[6:],
                             "eager ms": times["eager"], "compile ms": times["compile"], "ours ms": ours,
                             "ours+checks ms": times["ours+checks"], "ours GB/s": gbs(nbytes, ours),
                             "% copy": 100 * gbs(nbytes, ours) / copy, "vs eager": times["eager"] / ours,
                             "vs compile": times["compile"] / ours})
                del fns
    columns = ["op", "shape", "dtype", "eager ms", "compile ms", "ours ms", "ours+checks ms", "ours GB/s", "% copy",
               "vs eager", "vs compile"]
    lines = [f"# noise ops ({environment_line(device)})", "",
             f"noise-op extension: {status.describe()}; copy bandwidth (read + write): {copy:.1f} GB/s; median of "
             f"{repeats} runs", "", markdown_table(rows, columns), "",
             "vs eager / vs compile: speed-up of ours over that provider (higher is faster). GB/s from analytic bytes "
             "(add_noise: 2 reads + 1 write; with the noise draw: 1 read + 2 writes; ddim_step: 3 reads + 2 writes)."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# pytest-benchmark suite: pytest benchmarks/bench_noise_ops.py [--benchmark-only]
# ---------------------------------------------------------------------------------------------------------------------

if pytest is not None:
    _DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _SUITE_SHAPES = ["latents", "autoencoder"]

    @pytest.mark.parametrize("provider", ["eager", "compile", "ours"])
    @pytest.mark.parametrize("op", OPS)
    @pytest.mark.parametrize("name", _SUITE_SHAPES)
    def test_noise_ops(benchmark, name, op, provider):
        allow_recompiles(256)  # one graph per op and shape
        if not noise_ops.noise_ops_status().compiled:
            pytest.skip("no compiled noise ops")
        fn = make_fns(op, SHAPES[name], _DEVICE, torch.float32, schedule(_DEVICE))[provider]

        timed = synced(fn, _DEVICE)
        timed()
        benchmark.extra_info["GB"] = analytic_bytes(op, torch.Size(SHAPES[name]).numel(), torch.float32) / 1e9
        benchmark(timed)


if __name__ == "__main__":
    main()
