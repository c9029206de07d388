"""GroupNorm+SiLU: ours (the Triton kernels) against eager PyTorch, torch.compile of the reference and apex.

    python benchmarks/bench_group_norm_silu.py [--quick] [--dtype bf16]     # script mode: prints a markdown table
    pytest benchmarks/bench_group_norm_silu.py                              # pytest-benchmark suite

The shapes, providers, modes and byte counts are layoutgen.bench.suites.group_norm_silu (shared with
`layoutgen bench`); this file is its command line and pytest-benchmark suite. "% copy" relates GB/s to a large device
copy measured in the same run.
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
from common import (allow_recompiles, bench_parser, copy_bandwidth_gbs, environment_line, gbs,  # noqa: E402
                    markdown_table, synced)

from layoutgen.bench.suites.group_norm_silu import (  # noqa: E402
    AUTOENCODER, CPU, DTYPES, GROUPS, MODES, QUICK_CPU, QUICK_GPU, UNET, analytic_bytes, inputs, make_fn, measure,
    providers, runner, target_verdicts)


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
    if on_gpu:
        print()
        for provider in [p for p in names if p.startswith("ours")]:
            print(f"Targets for {provider} (bf16; the worst row of each counts):")
            print("\n".join(target_verdicts(rows, provider)))


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
        run = runner(fn, mode, x, w, b, dy, provider)

        timed = synced(run, _DEVICE)
        timed()
        benchmark.extra_info["GB"] = analytic_bytes(shape, _SUITE_DTYPE, mode) / 1e9
        benchmark(timed)


if __name__ == "__main__":
    main()
