"""Timing and peak memory of a callable: warm-up, repeats, the median.

- `time_ms(fn, device)`: median milliseconds of `fn()` after warm-up; CUDA events on a GPU (with the L2 cache
  flushed before each call, so small tensors are not timed from cache), perf_counter on a CPU.
- `peak_memory(run, device)`: peak memory while run() executes. On a GPU, torch.cuda.max_memory_allocated above
  memory_allocated before the call: what the run itself needed (for a training step from its first call:
  activations, gradients, optimizer state; not the weights, nor anything else already resident). On a CPU
  tracemalloc does not see torch's allocator, so the figure is how far the process's peak resident set (ru_maxrss)
  rose above its resident set before; when an earlier, higher peak hides it (ru_maxrss did not grow) it is None,
  reported as "n/a", rather than a number that would mean nothing.
- `time_interleaved(fns, device)`: the same for several providers, timed round-robin (fair on a shared machine).
- `gbs(nbytes, ms)`: achieved GB/s (1e9 bytes) from an analytic byte count.
- `allow_recompiles(limit)`: raises dynamo's recompile limits (see its docstring).
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

_L2_FLUSH_BYTES = 256 * 2 ** 20
_flush_buffers: dict[str, torch.Tensor] = {}


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def synced(run: Callable[[], object], device: torch.device | str) -> Callable[[], None]:
    """`run` followed by a device synchronize: what a wall-clock timer such as pytest-benchmark must time, since a
    CUDA launch returns before the kernel has run."""
    def call() -> None:
        run()
        synchronize(device)
    return call


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


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device | str, warmup: int = 3,
                     repeats: int = 20, flush_l2: bool = True) -> dict[str, float]:
    """Median milliseconds of each fn, timed round-robin (one call of each per round) after warming each up.

    Interleaving is what makes a ratio fair on a shared machine: a burst of load from another process slows one
    round of every provider instead of all the runs of one of them.
    """
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_ms(fn, device, warmup=0, repeats=1, flush_l2=flush_l2))
    return {name: statistics.median(values) for name, values in times.items()}


def _max_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kilobytes


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


CPU_MEMORY_METHOD = "CPU: peak RSS (ru_maxrss) above the RSS before; n/a when an earlier, higher peak hid it"
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated above what was allocated before (weights not counted)"


def peak_memory(run: Callable[[], object], device: torch.device | str) -> tuple[int | None, str]:
    """(peak bytes while run() executes, or None where it cannot be told; the method used)."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, CUDA_MEMORY_METHOD
    rss_before, peak_before = _rss_bytes(), _max_rss_bytes()
    run()
    peak_after = _max_rss_bytes()
    if None in (rss_before, peak_before, peak_after) or peak_after <= peak_before or peak_after <= rss_before:
        return None, CPU_MEMORY_METHOD
    return peak_after - rss_before, CPU_MEMORY_METHOD


def gbs(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def allow_recompiles(limit: int) -> None:
    """Raises dynamo's recompile limits to `limit`: a bench compiles one graph per shape/mode, and past the default
    limit dynamo would silently run eager code, so the "compile" column would lie."""
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, limit)
