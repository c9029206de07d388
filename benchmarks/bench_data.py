"""Data loading: the DALI pipeline against a torch DataLoader, both producing the full batch dict.

    python benchmarks/bench_data.py [--quick] [--workers 2] [--batch-size 32]   # script mode: a markdown table
    pytest benchmarks/bench_data.py                                              # pytest-benchmark suite

Both loaders read the same synthetic manifest (PNG layouts, segmentation and outline images, written first by the
generator) and yield {index, rgb, segmentation, label, control}: rgb float32 [B, 3, S, S] in [-1, 1], segmentation
int64, control float32 [B, 1, S, S], label int64. The DataLoader uses `--workers` worker processes (PIL decoding,
persistent workers); DALI uses as many CPU threads (a CPU-only pipeline, device_id=None, unless --device gpu).
Samples/s is measured per epoch after a warm-up epoch, alternating the two loaders epoch by epoch so that load from
other processes on a shared machine hits both alike; the table gives the median epoch of each and the median of the
per-round ratios. Target (issue 6): DALI >= 2.5x the DataLoader with 2 workers at 512x512 on a 2-core machine.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch

try:  # the script mode runs without pytest; the suite below needs it
    import pytest
except ImportError:
    pytest = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from common import bench_parser, markdown_table  # the shared bench helpers
except ImportError:  # pragma: no cover - common.py is part of benchmarks/
    bench_parser = markdown_table = None

from layoutgen.models.datasets import (  # noqa: E402
    ManifestDataset,
    build_dali_loader,
    build_torch_loader,
    dali_available,
    write_synthetic_dataset,
)

OUTPUTS = ["rgb", "segmentation", "label", "control"]
TARGET_RATIO = 2.5


def make_data(root: str, size: int, num: int) -> str:
    """A synthetic manifest of ``num`` layouts of ``size`` pixels under ``root`` (reused when already there)."""
    folder = os.path.join(root, f"synth_{size}_{num}")
    manifest = os.path.join(folder, "manifest.csv")
    if not os.path.isfile(manifest):
        write_synthetic_dataset(folder, num=num, size=size, seed=0)
    return manifest


def epoch_rate(loader) -> float:
    start = time.perf_counter()
    count = 0
    for batch in loader:
        count += len(batch["index"])
        _ = batch["rgb"]  # the batch is complete (DALI outputs are ready once returned)
    return count / (time.perf_counter() - start)


def compare(manifest: str, workers: int, batch_size: int, rounds: int, device: str = "cpu") -> dict:
    """Alternating epochs of the torch DataLoader and the DALI loader; samples/s medians and their ratio."""
    torch_loader = build_torch_loader(ManifestDataset(manifest, outputs=OUTPUTS), batch_size, num_workers=workers,
                                      persistent_workers=workers > 0)
    epoch_rate(torch_loader)  # warm-up; forks the persistent workers before any DALI pipeline exists
    dali_loader = build_dali_loader(manifest, batch_size, outputs=OUTPUTS, num_threads=workers, device=device)
    epoch_rate(dali_loader)
    torch_rates, dali_rates = [], []
    for epoch in range(rounds):
        torch_loader.set_epoch(epoch)
        dali_loader.set_epoch(epoch)
        torch_rates.append(epoch_rate(torch_loader))
        dali_rates.append(epoch_rate(dali_loader))
    dali_loader.close()
    del torch_loader
    return {
        "torch": statistics.median(torch_rates),
        "dali": statistics.median(dali_rates),
        "ratio": statistics.median(d / t for d, t in zip(dali_rates, torch_rates)),
        "ratio_range": (min(d / t for d, t in zip(dali_rates, torch_rates)),
                        max(d / t for d, t in zip(dali_rates, torch_rates))),
    }


def _table(rows, columns) -> str:
    if markdown_table is not None:
        return markdown_table(rows, columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    if bench_parser is not None:
        parser = bench_parser(__doc__.splitlines()[0])
        parser.set_defaults(device="cpu")
    else:  # pragma: no cover
        import argparse

        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--quick", action="store_true")
        parser.add_argument("--device", default="cpu")
        parser.add_argument("--repeats", type=int, default=None)
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
    print(_table(rows, list(rows[0])))
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
