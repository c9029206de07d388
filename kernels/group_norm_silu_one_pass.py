"""One-pass chunked GroupNorm (+ SiLU), forward and backward: every input read from memory once, with a per-group
barrier inside one launch.

Why: the chunked path of group_norm_silu_triton runs two kernels each way. The forward reads x twice (statistics,
then y), so at the autoencoder's shapes (16 x 8 groups of a million elements) it moves 3 bytes for every 2 a copy
moves and cannot pass about 67% of the copy bandwidth; the backward reads x and dy twice (partials, then dx): 5 bytes
for 3. Here each program keeps its chunk [CPG, CHUNK_S] of one group in registers:
1. it writes the chunk's partials (forward: mean and M2, exact over registers; backward: per-channel sums of dz and
   dz * xhat) and counts itself in at its group's arrival counter (acq_rel: its partials are released, the last
   arrival acquires everyone's);
2. the last of the group's K programs to arrive merges the K partials in a fixed order (deterministic: the forward
   with the two-pass path's Chan et al. merge into mean and rstd, the backward into the two group coefficients of dx)
   and raises the group's ready flag;
3. every program waits for that flag, then writes y (or dx) from the registers it still holds.
The forward moves what a copy moves; the backward reads x and dy once and writes dx. (On sm_90 the release atomics
compile to MEMBAR.ALL.GPU before the atomic and the acquire ones to CCTL.IVALL, an L1 invalidation, after it, so the
partials and statistics read after an acquire are never stale L1 lines; the waiters read them with .cg besides.
compile_check insists on the acquire / release PTX.)

Forward progress. A program only waits for the other K - 1 programs of its group. Each program takes its work item
from an atomic ticket counter, so work items start in ticket order whatever order the hardware starts blocks in, and
a group's K items are consecutive tickets. Suppose every resident program waits: the lowest waiting ticket a must be
its group's first (a lower ticket of the group could only have finished after the group's flag was raised, and then
a would pass too), every ticket below a has finished, so the resident programs are the tickets a, a+1, ...; with
K <= the number of SMs (every SM holds at least one program) the whole group of a is resident, arrives, and raises
its flag: a contradiction. `plan` keeps K at most the SM count. The wait is bounded all the same (MAX_SPINS, seconds):
a program that gives up writes NaN and counts a timeout in the sync buffer, so a broken assumption (another process
holding SMs indefinitely) shows as NaN in y, never as a hung GPU.

Under TRITON_INTERPRET=1 (CPU) programs run one after another, so a waiting program would never see the others
arrive: there each kernel is launched twice, PHASE 1 (partials, arrival, merge) then PHASE 2 (the wait, which then
succeeds at once, and y or dx, re-reading the inputs). That runs every line but the concurrency; the CUDA tests run
PHASE 0.

On CUDA the chunk size and warps are tuned per shape on first use (`configs`, `choose`: each candidate timed with
triton's do_bench, every launch with fresh sync and partial buffers), unless LAYOUTGEN_TRITON_AUTOTUNE=0 asks for
the heuristic config, as for the two-pass kernels' triton.autotune.

Chosen by backend.group_norm_chunked_path ("two-pass", the default until a GPU run has measured both side by side,
or "one-pass"; LAYOUTGEN_GN_CHUNKED in the environment); shapes `plan` refuses take the two-pass kernels.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from layoutgen.kernels.group_norm_silu_triton import (_affine_act, _grad_z, _group_coefficients, _load_params,
                                                      _merge_stats, _offsets)

MAX_TILE = 8192            # a chunk held in registers: 8192 fp32 = 32 per thread at 8 warps
MIN_CHUNK_S = 32           # spatial positions a chunk, at least (a wider group takes the two-pass path)
MAX_SPINS = 2 ** 22        # polls of the ready flag before a program gives up (each an L2 round trip: seconds)
CPU_MAX_CHUNKS = 64        # the interpreter has no SMs to count; its two launches need no co-residency anyway
SYNC_HEADER = 3            # sync buffer: [ticket (PHASE 0 / 1), ticket (PHASE 2), timeouts, arrivals[NG], ready[NG]]


@triton.jit
def _chunk_tile(Sync, G, CPG, S, CHUNK_S, K, PHASE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """This program's work item and tile: (group n * G + g, chunk k, sample n, channels ch and their mask, positions s,
    the tile's mask, the chunk's length). The work item comes from the ticket counter, not from program_id: tickets
    are handed out in the order programs really start (the forward-progress argument in the module docstring);
    PHASE 2 counts its own tickets."""
    if PHASE == 2:
        ticket = tl.atomic_add(Sync + 1, 1, sem="relaxed")   # orders no data: relaxed, no fence
    else:
        ticket = tl.atomic_add(Sync, 1, sem="relaxed")
    pid = ticket // K
    k = ticket % K
    n = pid // G
    g = pid % G
    s_begin = k * CHUNK_S
    s_end = tl.minimum(s_begin + CHUNK_S, S)
    c = tl.arange(0, BLOCK_C)
    s = s_begin + tl.arange(0, BLOCK_S)
    cmask = c < CPG
    mask = cmask[:, None] & (s < s_end)[None, :]
    return pid, k, n, g * CPG + c, cmask, s, mask, s_end - s_begin


@triton.jit
def _wait_ready(Sync, ready, MAX_SPINS: tl.constexpr):
    """Polls the group's ready flag (acquire: what the last arrival wrote before raising it is visible after); gives
    up after MAX_SPINS polls and counts a timeout. Returns the flag: 0 means the wait timed out."""
    flag = tl.atomic_add(ready, 0, sem="acquire")
    spins = 0
    while (flag == 0) & (spins < MAX_SPINS):
        flag = tl.atomic_add(ready, 0, sem="acquire")
        spins += 1
    if flag == 0:
        tl.atomic_add(Sync + 2, 1, sem="relaxed")
    return flag


@triton.jit
def _fwd_one_pass_kernel(X, Y, W, B, PMean, PM2, Mean, Rstd, Sync, G, NG, CPG, S, CHUNK_S, K,
                         sxn, sxc, sxs, syn, syc, sys, eps,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, INDEX_64: tl.constexpr,
                         PHASE: tl.constexpr, MAX_SPINS: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    pid, k, n, ch, cmask, s, mask, length = _chunk_tile(Sync, G, CPG, S, CHUNK_S, K, PHASE, BLOCK_C, BLOCK_S)
    n64 = n.to(tl.int64)
    x = tl.load(X + n64 * sxn + _offsets(ch, s, sxc, sxs, INDEX_64), mask=mask, other=0.0).to(tl.float32)
    arrivals = Sync + 3 + pid          # 3: SYNC_HEADER
    ready = Sync + 3 + NG + pid
    if PHASE != 2:
        count = CPG * 1.0 * length
        chunk_mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
        d = tl.where(mask, x - chunk_mean, 0.0)
        tl.store(PMean + pid * K + k, chunk_mean)
        tl.store(PM2 + pid * K + k, tl.sum(tl.sum(d * d, axis=1), axis=0))
        # acq_rel: releases this program's partials; the last arrival acquires everyone's.
        if tl.atomic_add(arrivals, 1, sem="acq_rel") == K - 1:
            mean, rstd = _merge_stats(PMean, PM2, pid, CPG, S, CHUNK_S, K, eps, BLOCK_K)
            tl.store(Mean + pid, mean)
            tl.store(Rstd + pid, rstd)
            tl.atomic_xchg(ready, 1, sem="release")
    if PHASE != 1:
        flag = _wait_ready(Sync, ready, MAX_SPINS)
        # .cg: read from L2, never from a line this SM's L1 may hold from before the flag was raised.
        mean = tl.where(flag != 0, tl.load(Mean + pid, cache_modifier=".cg"), float("nan"))
        rstd = tl.load(Rstd + pid, cache_modifier=".cg")
        w, b = _load_params(W, B, ch, cmask, HAS_W, HAS_B)
        y = _affine_act((x - mean) * rstd, w, b, HAS_W, HAS_B, SILU)
        tl.store(Y + n64 * syn + _offsets(ch, s, syc, sys, INDEX_64), y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_one_pass_kernel(DY, X, W, B, Mean, Rstd, DX, PA, PB, Coef, Sync, G, NG, C, CPG, S, CHUNK_S, K,
                         sdn, sdc, sds, sxn, sxc, sxs, sgn, sgc, sgs,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, INDEX_64: tl.constexpr,
                         PHASE: tl.constexpr, MAX_SPINS: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """The backward of the module docstring of group_norm_silu_triton, x and dy read once: the chunk's per-channel
    A / B partials, then (last arrival) the group's two coefficients into Coef[2 * pid], then dx from registers."""
    pid, k, n, ch, cmask, s, mask, length = _chunk_tile(Sync, G, CPG, S, CHUNK_S, K, PHASE, BLOCK_C, BLOCK_S)
    n64 = n.to(tl.int64)
    x = tl.load(X + n64 * sxn + _offsets(ch, s, sxc, sxs, INDEX_64), mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + n64 * sdn + _offsets(ch, s, sdc, sds, INDEX_64), mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(Mean + pid)   # the forward's statistics, written before this launch
    rstd = tl.load(Rstd + pid)
    w, b = _load_params(W, B, ch, cmask, HAS_W, HAS_B)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    dz = tl.where(mask, _grad_z(dy, xhat, w, b, HAS_W, HAS_B, SILU), 0.0)
    arrivals = Sync + 3 + pid          # 3: SYNC_HEADER
    ready = Sync + 3 + NG + pid
    if PHASE != 2:
        row = (n * K + k) * C + ch
        tl.store(PA + row, tl.sum(dz, axis=1), mask=cmask)
        tl.store(PB + row, tl.sum(dz * xhat, axis=1), mask=cmask)
        if tl.atomic_add(arrivals, 1, sem="acq_rel") == K - 1:
            c1, c2 = _group_coefficients(PA, PB, W, B, n, pid % G, C, CPG, S, K, HAS_W, HAS_B, BLOCK_C, BLOCK_K)
            tl.store(Coef + 2 * pid, c1)
            tl.store(Coef + 2 * pid + 1, c2)
            tl.atomic_xchg(ready, 1, sem="release")
    if PHASE != 1:
        flag = _wait_ready(Sync, ready, MAX_SPINS)
        c1 = tl.where(flag != 0, tl.load(Coef + 2 * pid, cache_modifier=".cg"), float("nan"))
        c2 = tl.load(Coef + 2 * pid + 1, cache_modifier=".cg")
        dx = rstd * (dz * w[:, None] - c1 - xhat * c2)
        tl.store(DX + n64 * sgn + _offsets(ch, s, sgc, sgs, INDEX_64), dx.to(DX.dtype.element_ty), mask=mask)


def plan(cpg: int, s: int, max_chunks: int, max_tile: int | None = None) -> tuple[int, int] | None:
    """(CHUNK_S, K) for a group of `cpg` channels and `s` positions in chunks of at most `max_tile` elements (default
    MAX_TILE), or None where the one-pass kernels do not apply: a chunk would hold fewer than MIN_CHUNK_S positions,
    or the group needs more than `max_chunks` chunks (the SM count on a GPU: the forward-progress argument)."""
    max_tile = MAX_TILE if max_tile is None else max_tile
    block_c = triton.next_power_of_2(cpg)
    if block_c * MIN_CHUNK_S > max_tile:
        return None
    chunk_s = min(max_tile // block_c, triton.next_power_of_2(s))
    chunks = math.ceil(s / chunk_s)
    return (chunk_s, chunks) if chunks <= max_chunks else None


# Tuning candidates per direction, (fraction of MAX_TILE a chunk may hold, warps); the first is the heuristic choice:
# a full tile is 32 fp32 values a thread at 8 warps (forward: x) or 2 x 16 at 16 warps (backward: x and dy).
CANDIDATES = {"forward": ((1, 8), (1, 16), (2, 4), (2, 8), (4, 4)),
              "backward": ((1, 16), (1, 8), (2, 8), (2, 4), (4, 4))}
_CHOSEN: dict[tuple, tuple[int, int, int]] = {}   # tuning key -> (CHUNK_S, K, warps)


def configs(direction: str, cpg: int, s: int, max_chunks: int) -> list[tuple[int, int, int]]:
    """The distinct (CHUNK_S, K, warps) candidates that apply to this group, the heuristic choice first (warps capped
    so that every thread holds at least 8 values of a smaller tile)."""
    found = []
    for fraction, warps in CANDIDATES[direction]:
        planned = plan(cpg, s, max_chunks, MAX_TILE // fraction)
        if planned is None:
            continue
        tile = triton.next_power_of_2(cpg) * planned[0]
        config = (*planned, max(1, min(warps, tile // 256)))
        if config not in found:
            found.append(config)
    return found


def choose(direction: str, key: tuple, candidates: list[tuple[int, int, int]], run, do_bench=None):
    """The config for `key`: the first candidate without a timer, else (once per key) the fastest by `do_bench`, each
    candidate timed through `run(config)` (which allocates fresh sync and partial buffers every launch, so repeated
    launches are safe)."""
    if do_bench is None or len(candidates) == 1:
        return candidates[0]
    key = (direction, *key)
    if key not in _CHOSEN:
        times = [do_bench(lambda config=config: run(config)) for config in candidates]
        _CHOSEN[key] = candidates[min(range(len(candidates)), key=times.__getitem__)]
    return _CHOSEN[key]


def sync_buffer(groups_total: int, device: torch.device) -> torch.Tensor:
    """The zeroed int32 tickets, timeout count, arrival counters and ready flags of one launch."""
    return torch.zeros(SYNC_HEADER + 2 * groups_total, dtype=torch.int32, device=device)


def timeouts(sync: torch.Tensor) -> int:
    """How many programs of the launch that used `sync` gave up waiting (and wrote NaN)."""
    return int(sync[2].item())


def _launch(kernel, grid: tuple[int], args: tuple, meta: dict, interpreted: bool) -> None:
    for phase in ((1, 2) if interpreted else (0,)):
        kernel[grid](*args, PHASE=phase, **meta)


def launch_forward(x3: torch.Tensor, y3: torch.Tensor, w_arg, b_arg, mean: torch.Tensor, rstd: torch.Tensor,
                   num_groups: int, eps: float, flags: dict, config: tuple[int, int, int],
                   interpreted: bool) -> torch.Tensor:
    """y3 = GroupNorm(+SiLU)(x3), x3 / y3 [N, C, S] views; mean / rstd [N, G] filled; config (CHUNK_S, K, warps).
    Returns the launch's sync buffer."""
    n, c, s = x3.shape
    chunk_s, chunks, warps = config
    groups_total = n * num_groups
    pmean = torch.empty((groups_total, chunks), dtype=torch.float32, device=x3.device)
    pm2 = torch.empty_like(pmean)
    sync = sync_buffer(groups_total, x3.device)
    args = (x3, y3, w_arg, b_arg, pmean, pm2, mean, rstd, sync, num_groups, groups_total, c // num_groups, s,
            chunk_s, chunks, *x3.stride(), *y3.stride(), eps)
    meta = dict(flags, MAX_SPINS=MAX_SPINS, BLOCK_C=triton.next_power_of_2(c // num_groups), BLOCK_S=chunk_s,
                BLOCK_K=triton.next_power_of_2(chunks), num_warps=warps)
    _launch(_fwd_one_pass_kernel, (groups_total * chunks,), args, meta, interpreted)
    return sync


def launch_backward(dy3: torch.Tensor, x3: torch.Tensor, dx3: torch.Tensor, w_arg, b_arg, mean: torch.Tensor,
                    rstd: torch.Tensor, partials: torch.Tensor, num_groups: int, flags: dict,
                    config: tuple[int, int, int], interpreted: bool) -> torch.Tensor:
    """dx3 from dy3 and x3 ([N, C, S] views) and the forward's mean / rstd; the per-chunk, per-channel partials of
    dbias / dweight into partials [2, N, K, C]; config (CHUNK_S, K, warps). Returns the launch's sync buffer."""
    n, c, s = x3.shape
    chunk_s, chunks, warps = config
    groups_total = n * num_groups
    coef = torch.empty((groups_total, 2), dtype=torch.float32, device=x3.device)
    sync = sync_buffer(groups_total, x3.device)
    args = (dy3, x3, w_arg, b_arg, mean, rstd, dx3, partials[0], partials[1], coef, sync, num_groups, groups_total,
            c, c // num_groups, s, chunk_s, chunks, *dy3.stride(), *x3.stride(), *dx3.stride())
    meta = dict(flags, MAX_SPINS=MAX_SPINS, BLOCK_C=triton.next_power_of_2(c // num_groups), BLOCK_S=chunk_s,
                BLOCK_K=min(triton.next_power_of_2(chunks), 32), num_warps=warps)
    _launch(_bwd_one_pass_kernel, (groups_total * chunks,), args, meta, interpreted)
    return sync


def forward(x3, y3, w_arg, b_arg, mean, rstd, num_groups: int, eps: float, flags: dict, max_chunks: int,
            interpreted: bool, do_bench=None) -> None:
    """launch_forward with the config `choose` picks (tuned by `do_bench` where given, e.g. on CUDA)."""
    n, c, s = x3.shape
    candidates = configs("forward", c // num_groups, s, max_chunks)
    key = (n * num_groups, c // num_groups, s, x3.dtype, x3.stride(), tuple(sorted(flags.items())))

    def run(config):
        return launch_forward(x3, y3, w_arg, b_arg, mean, rstd, num_groups, eps, flags, config, interpreted)

    run(choose("forward", key, candidates, run, do_bench))


def backward(dy3, x3, dx3, w_arg, b_arg, mean, rstd, num_groups: int, flags: dict, max_chunks: int,
             interpreted: bool, do_bench=None) -> torch.Tensor:
    """launch_backward with the config `choose` picks; returns the partials [2, N, K, C] (A; B)."""
    n, c, s = x3.shape
    candidates = configs("backward", c // num_groups, s, max_chunks)
    key = (n * num_groups, c // num_groups, s, x3.dtype, x3.stride(), dy3.stride(), tuple(sorted(flags.items())))

    def run(config):
        partials = torch.empty((2, n, config[1], c), dtype=torch.float32, device=x3.device)
        launch_backward(dy3, x3, dx3, w_arg, b_arg, mean, rstd, partials, num_groups, flags, config, interpreted)
        return partials

    return run(choose("backward", key, candidates, run, do_bench))
