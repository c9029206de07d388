"""Data loading: the DALI pipeline against a torch DataLoader, both producing the full batch dict.

    python benchmarks/bench_data.py [--quick] [--workers 2] [--batch-size 32]   # script mode: a markdown table
    pytest benchmarks/bench_data.py                                              # pytest-benchmark suite

The synthetic data, the alternating-epoch comparison and the target are layoutgen.bench.suites.data (shared with
`layoutgen bench`); this file is its command line and pytest-benchmark suite. `--workers` DataLoader workers, as many
DALI threads.
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch

try:  # the script mode runs without pytest; the suite below needs it
    import pytest
except ImportError:
    pytest = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_parser, markdown_table  # noqa: E402

from layoutgen.bench.suites.data import OUTPUTS, TARGET_RATIO, compare, epoch_rate, make_data  # noqa: E402
from layoutgen.models.datasets import (  # noqa: E402
    ManifestDataset,
    build_dali_loader,
    build_torch_loader,
    dali_available,
)


def main(argv=None) -> int:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.set_defaults(device="cpu")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers = DALI threads (default 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data-dir", default=None, help="keep the generated data here (default: a temp folder)")
    args = parser.parse_args(argv)
    if not dali_available():
        print("nvidia-dali is not installed: pip install 'layoutgen[dali]'", file=sys.stderr)
        return 1
    rounds = args.repeats or (3 if args.quick else 5)
    sizes = [(512, 128 if args.quick else 256), (128, 256 if args.quick else 1024)]
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="bench_data_")
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for size, num in sizes:
        manifest = make_data(data_dir, size, num)
        r = compare(manifest, args.workers, args.batch_size, rounds, args.device)
        target = f">= {TARGET_RATIO}x: {'met' if r['ratio'] >= TARGET_RATIO else 'NOT met'}" if size == 512 else "-"
        rows.append({"size": f"{size}x{size}", "images": num, "batch": args.batch_size,
                     f"DataLoader ({args.workers} workers) samples/s": round(r["torch"], 1),
                     f"DALI ({args.workers} threads) samples/s": round(r["dali"], 1),
                     "DALI / DataLoader": f"{r['ratio']:.2f}x ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f})",
                     "target": target})
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device: CPU, {os.cpu_count()} cores; torch {torch.__version__}; DALI device {args.device}; "
          f"{rounds} alternating epochs per loader after a warm-up; load average {load_before:.2f} -> {load_after:.2f}")
    print(markdown_table(rows, list(rows[0])))
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# pytest-benchmark suite (small: 64 layouts of 128x128)
# ----------------------------------------------------------------------------------------------------------------------

if pytest is not None:

    @pytest.fixture(scope="module")
    def bench_manifest(tmp_path_factory):
        return make_data(str(tmp_path_factory.mktemp("bench_data")), 128, 64)

    def test_bench_torch_dataloader(benchmark, bench_manifest):
        loader = build_torch_loader(ManifestDataset(bench_manifest, outputs=OUTPUTS), 16, num_workers=2,
                                    persistent_workers=True)
        epoch_rate(loader)
        benchmark.pedantic(epoch_rate, args=(loader,), rounds=3, iterations=1)

    @pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
    def test_bench_dali_loader(benchmark, bench_manifest):
        loader = build_dali_loader(bench_manifest, 16, outputs=OUTPUTS, num_threads=2, device="cpu")
        epoch_rate(loader)
        benchmark.pedantic(epoch_rate, args=(loader,), rounds=3, iterations=1)
        loader.close()


if __name__ == "__main__":
    sys.exit(main())
