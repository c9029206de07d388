"""Helpers shared by the bench files: timing, bandwidth, tables, command line.

The timing, machine and table code lives in the package (layoutgen.bench, which `layoutgen bench` runs); this file
re-exports it under the names the bench scripts use, plus the scripts' own command line.

- `time_ms(fn, device)`: median milliseconds of `fn()` after warm-up; CUDA events on a GPU (with the L2 cache
  flushed before each call, so small tensors are not timed from cache), perf_counter on a CPU.
- `copy_bandwidth_gbs(device)`: the card's measured ceiling (a large device-to-device copy, read + write).
- `gbs(nbytes, ms)`: achieved GB/s (1e9 bytes) from an analytic byte count.
- `synced(run, device)`: `run` then a device synchronize, for pytest-benchmark's wall-clock timer.
- `markdown_table(rows, columns)`, `bench_parser(description)`, `environment_line(device)`.
"""
from __future__ import annotations

import argparse

import torch

from layoutgen.bench.machine import copy_bandwidth_gbs, device_name, environment_line  # noqa: F401
from layoutgen.bench.tables import fmt, markdown_table  # noqa: F401
from layoutgen.bench.timing import allow_recompiles, gbs, synced, synchronize, time_ms  # noqa: F401


def bench_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats (the GPU check script's mode)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median reported)")
    return parser
