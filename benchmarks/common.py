"""Helpers shared by the bench files: timing, bandwidth, tables, command line.

- `time_ms(fn, device)`: median milliseconds of `fn()` after warm-up; CUDA events on a GPU (with the L2 cache
  flushed before each call, so small tensors are not timed from cache), perf_counter on a CPU.
- `copy_bandwidth_gbs(device)`: the card's measured ceiling (a large device-to-device copy, read + write).
- `gbs(nbytes, ms)`: achieved GB/s (1e9 bytes) from an analytic byte count.
- `markdown_table(rows, columns)`, `bench_parser(description)`, `environment_line(device)`.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch

_L2_FLUSH_BYTES = 256 * 2 ** 20
_flush_buffers: dict[str, torch.Tensor] = {}


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _flush_l2(device: torch.device) -> None:
    key = str(device)
    if key not in _flush_buffers:
        _flush_buffers[key] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    _flush_buffers[key].zero_()


def time_ms(fn: Callable[[], object], device: torch.device | str, warmup: int = 5, repeats: int = 20,
            flush_l2: bool = True) -> float:
    """Median wall time of fn() in milliseconds over `repeats` runs, after `warmup` runs."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            if flush_l2:
                _flush_l2(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gbs(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def copy_bandwidth_gbs(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """Achieved GB/s of a large tensor copy (counted as read + write): the memory ceiling to compare kernels with."""
    device = torch.device(device)
    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 27)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, repeats=10, flush_l2=False)
    return gbs(2 * nbytes, ms)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment_line(device: torch.device | str) -> str:
    parts = [f"device: {device_name(device)}", f"torch {torch.__version__}"]
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("no triton")
    return ", ".join(parts)


def fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def bench_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats (the GPU check script's mode)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median reported)")
    return parser


def allow_recompiles(limit: int) -> None:
    """Raises dynamo's recompile limits to `limit`: a bench compiles one graph per shape/mode, and past the default
    limit dynamo would silently run eager code, so the "compile" column would lie."""
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, limit)
