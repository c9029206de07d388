"""Triton kernels and launchers of GroupNorm (+ SiLU): forward and backward, one (sample, group) or chunk per program.

Notation: x is viewed as [N, C, S] (S = the product of the spatial sizes) through its strides, so NCHW (stride_s 1)
and channels_last (stride_c 1) run without a layout copy; G groups of CPG = C / G channels; M = CPG * S elements per
(sample, group). Statistics and every accumulation are float32 whatever the input dtype (fp32, fp16, bf16).

Forward, y = act(xhat * w + b) with xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps) (Wu & He, 2018):
- "single" path: when a whole group fits in registers (next_pow2(CPG) * next_pow2(S) <= SINGLE_MAX_ELEMS), one
  program per (n, g) loads it once, computes mean and variance exactly (two passes over registers) and writes y:
  one read and one write of memory;
- "chunked" path: otherwise, or when N * G programs alone would leave most of the GPU idle (the autoencoder at
  512x512 has N * G = 128 groups of a million elements each), the spatial axis is split into K chunks. The stats
  kernel writes each chunk's (mean, M2) with shifted sums (shift = the chunk's first element, which keeps
  sum-of-squares cancellation at the scale of the variance); the apply kernel merges the K partials of its group
  with Chan et al.'s pairwise formula (the same fixed order in every program, so deterministic), then writes y.
  group_norm_silu_one_pass.py holds an opt-in alternative for this path (one launch each way, inputs read once).

Backward (saves x, mean, rstd, never y; recomputes xhat and the SiLU derivative):
  dz = dy * silu'(z), silu'(z) = s (1 + z (1 - s)), s = sigmoid(z), z = xhat * w + b       (dz = dy without SiLU)
  A[n, c] = sum_s dz,  B[n, c] = sum_s dz * xhat       (per sample and channel; dbias = sum_n A, dweight = sum_n B)
  dx = rstd * (w dz - mean_group(w dz) - xhat * mean_group(w dz xhat)),
  mean_group(w dz) = sum_{c in g} w_c A[n, c] / M,  mean_group(w dz xhat) = sum_{c in g} w_c B[n, c] / M.
The per-(sample, chunk, channel) partials of A and B land in a float32 buffer and are summed in a fixed order (by the
dx kernel for its group, by one torch.sum for dweight / dbias): no atomics, so the gradients are bitwise
deterministic. "single" does it all in one kernel; "chunked" runs a partials kernel and then a dx kernel.

Indexing: the sample offset is always 64-bit; offsets inside a sample switch to 64-bit (INDEX_64) when C * S
reaches 2**31. On CUDA, block sizes and warps are autotuned per shape (set LAYOUTGEN_TRITON_AUTOTUNE=0 for the
heuristic configs); under TRITON_INTERPRET=1 (CPU) the heuristic configs are used.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from layoutgen.kernels import triton_interpreter
from layoutgen.kernels.backend import group_norm_chunked_path

SINGLE_MAX_ELEMS = 8192       # a group held in registers: 8192 fp32 = 32 per thread at 8 warps
TARGET_PROGRAMS_PER_SM = 8    # chunked path: aim for at least this many programs per SM
MAX_CHUNKS = 256
MIN_CHUNK_ELEMS = 2048        # a chunk smaller than this is not worth a program
CPU_TARGET_PROGRAMS = 8       # interpreter: few programs (each runs as Python)


# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _offsets(ch, s, stride_c, stride_s, INDEX_64: tl.constexpr):
    """[BLOCK_C, BLOCK_S] element offsets inside one sample (one return: a compiled jit function has one type)."""
    if INDEX_64:
        ch = ch.to(tl.int64)
        s = s.to(tl.int64)
    return ch[:, None] * stride_c + s[None, :] * stride_s


@triton.jit
def _affine_act(xhat, w, b, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr):
    z = xhat
    if HAS_W:
        z = z * w[:, None]
    if HAS_B:
        z = z + b[:, None]
    if SILU:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _grad_z(dy, xhat, w, b, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr):
    """dL/dz from dL/dy, where y = silu(z) (or y = z), z = xhat * w + b."""
    dz = dy
    if SILU:
        z = xhat
        if HAS_W:
            z = z * w[:, None]
        if HAS_B:
            z = z + b[:, None]
        sig = tl.sigmoid(z)
        dz = dy * sig * (1.0 + z * (1.0 - sig))
    return dz


@triton.jit
def _load_params(W, B, ch, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    if HAS_W:
        w = tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.full(ch.shape, 1.0, tl.float32)
    if HAS_B:
        b = tl.load(B + ch, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros(ch.shape, tl.float32)
    return w, b


@triton.jit
def _fwd_single_kernel(X, Y, W, B, Mean, Rstd, G, CPG, S, sxn, sxc, sxs, syn, syc, sys, eps,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, INDEX_64: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)           # n * G + g
    n = pid // G
    g = pid % G
    c = tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    cmask = c < CPG
    mask = cmask[:, None] & (s < S)[None, :]
    ch = g * CPG + c
    n64 = n.to(tl.int64)
    x = tl.load(X + n64 * sxn + _offsets(ch, s, sxc, sxs, INDEX_64), mask=mask, other=0.0).to(tl.float32)
    count = CPG * 1.0 * S   # float: CPG * S may not fit in int32
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
    d = tl.where(mask, x - mean, 0.0)
    var = tl.sum(tl.sum(d * d, axis=1), axis=0) / count
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Mean + pid, mean)
    tl.store(Rstd + pid, rstd)
    w, b = _load_params(W, B, ch, cmask, HAS_W, HAS_B)
    y = _affine_act(d * rstd, w, b, HAS_W, HAS_B, SILU)
    tl.store(Y + n64 * syn + _offsets(ch, s, syc, sys, INDEX_64), y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_stats_kernel(X, PMean, PM2, G, CPG, S, CHUNK_S, K, sxn, sxc, sxs,
                      INDEX_64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Chunk `k` of group (n, g): its mean and M2 (sum of squared deviations) into PMean/PM2[(n * G + g) * K + k]."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    n = pid // G
    g = pid % G
    s_begin = k * CHUNK_S
    s_end = tl.minimum(s_begin + CHUNK_S, S)
    base = X + n.to(tl.int64) * sxn
    # Shifted sums: sum(x - shift) and sum((x - shift)^2) with shift = the chunk's first element.
    shift = tl.load(base + (g * CPG).to(tl.int64) * sxc + s_begin.to(tl.int64) * sxs).to(tl.float32)
    acc1 = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
    acc2 = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < CPG
        for s0 in range(s_begin, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < s_end)[None, :]
            x = tl.load(base + _offsets(g * CPG + c, s, sxc, sxs, INDEX_64), mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x - shift, 0.0)
            acc1 += d
            acc2 += d * d
    count = CPG * 1.0 * (s_end - s_begin)
    sum1 = tl.sum(tl.sum(acc1, axis=1), axis=0)
    sum2 = tl.sum(tl.sum(acc2, axis=1), axis=0)
    mean_shifted = sum1 / count
    m2 = tl.maximum(sum2 - sum1 * mean_shifted, 0.0)
    tl.store(PMean + pid * K + k, shift + mean_shifted)
    tl.store(PM2 + pid * K + k, m2)


@triton.jit
def _merge_stats(PMean, PM2, pid, CPG, S, CHUNK_S, K, eps, BLOCK_K: tl.constexpr):
    """Merges the K chunk statistics of group `pid` (Chan, Golub & LeVeque 1979): mean and rstd."""
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < K
    pmean = tl.load(PMean + pid * K + kk, mask=kmask, other=0.0)
    pm2 = tl.load(PM2 + pid * K + kk, mask=kmask, other=0.0)
    length = tl.minimum((kk + 1) * CHUNK_S, S) - kk * CHUNK_S
    cnt = tl.where(kmask, length.to(tl.float32) * CPG, 0.0)
    total = CPG * 1.0 * S
    mean = tl.sum(cnt * pmean, axis=0) / total
    dm = tl.where(kmask, pmean - mean, 0.0)
    m2 = tl.sum(pm2 + cnt * dm * dm, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)
    return mean, rstd


@triton.jit
def _fwd_apply_kernel(X, Y, W, B, PMean, PM2, Mean, Rstd, G, CPG, S, CHUNK_S, K, sxn, sxc, sxs, syn, syc, sys, eps,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, INDEX_64: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    # Reverse launch order relative to the stats kernel: the chunks it read last are likelier to be still in L2.
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    k = tl.num_programs(1) - 1 - tl.program_id(1)
    n = pid // G
    g = pid % G
    mean, rstd = _merge_stats(PMean, PM2, pid, CPG, S, CHUNK_S, K, eps, BLOCK_K)
    if k == 0:
        tl.store(Mean + pid, mean)
        tl.store(Rstd + pid, rstd)
    s_begin = k * CHUNK_S
    s_end = tl.minimum(s_begin + CHUNK_S, S)
    n64 = n.to(tl.int64)
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < CPG
        ch = g * CPG + c
        w, b = _load_params(W, B, ch, cmask, HAS_W, HAS_B)
        for s0 in range(s_begin, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < s_end)[None, :]
            x = tl.load(X + n64 * sxn + _offsets(ch, s, sxc, sxs, INDEX_64), mask=mask, other=0.0).to(tl.float32)
            y = _affine_act((x - mean) * rstd, w, b, HAS_W, HAS_B, SILU)
            tl.store(Y + n64 * syn + _offsets(ch, s, syc, sys, INDEX_64), y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_single_kernel(DY, X, W, B, Mean, Rstd, DX, PA, PB, G, C, CPG, S,
                       sdn, sdc, sds, sxn, sxc, sxs, sgn, sgc, sgs,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, INDEX_64: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Whole group in registers: dx, and A / B per channel into PA / PB[n, c] (K = 1)."""
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    c = tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    cmask = c < CPG
    mask = cmask[:, None] & (s < S)[None, :]
    ch = g * CPG + c
    n64 = n.to(tl.int64)
    x = tl.load(X + n64 * sxn + _offsets(ch, s, sxc, sxs, INDEX_64), mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + n64 * sdn + _offsets(ch, s, sdc, sds, INDEX_64), mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(Mean + pid)
    rstd = tl.load(Rstd + pid)
    w, b = _load_params(W, B, ch, cmask, HAS_W, HAS_B)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    dz = tl.where(mask, _grad_z(dy, xhat, w, b, HAS_W, HAS_B, SILU), 0.0)
    a = tl.sum(dz, axis=1)
    bb = tl.sum(dz * xhat, axis=1)
    tl.store(PA + n * C + ch, a, mask=cmask)
    tl.store(PB + n * C + ch, bb, mask=cmask)
    count = CPG * 1.0 * S   # float: CPG * S may not fit in int32
    c1 = tl.sum(w * a, axis=0) / count
    c2 = tl.sum(w * bb, axis=0) / count
    dx = rstd * (dz * w[:, None] - c1 - xhat * c2)
    tl.store(DX + n64 * sgn + _offsets(ch, s, sgc, sgs, INDEX_64), dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_partials_kernel(DY, X, W, B, Mean, Rstd, PA, PB, G, C, CPG, S, CHUNK_S, K,
                         sdn, sdc, sds, sxn, sxc, sxs,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, INDEX_64: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """A and B of chunk k for the channels of group (n, g) into PA / PB[(n * K + k) * C + c]."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    n = pid // G
    g = pid % G
    s_begin = k * CHUNK_S
    s_end = tl.minimum(s_begin + CHUNK_S, S)
    mean = tl.load(Mean + pid)
    rstd = tl.load(Rstd + pid)
    n64 = n.to(tl.int64)
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < CPG
        ch = g * CPG + c
        w, b = _load_params(W, B, ch, cmask, HAS_W, HAS_B)
        acc_a = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
        acc_b = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
        for s0 in range(s_begin, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < s_end)[None, :]
            x = tl.load(X + n64 * sxn + _offsets(ch, s, sxc, sxs, INDEX_64), mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + n64 * sdn + _offsets(ch, s, sdc, sds, INDEX_64), mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            dz = tl.where(mask, _grad_z(dy, xhat, w, b, HAS_W, HAS_B, SILU), 0.0)
            acc_a += dz
            acc_b += dz * xhat
        row = (n * K + k) * C + ch
        tl.store(PA + row, tl.sum(acc_a, axis=1), mask=cmask)
        tl.store(PB + row, tl.sum(acc_b, axis=1), mask=cmask)


@triton.jit
def _group_coefficients(PA, PB, W, B, n, g, C, CPG, S, K, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """mean_group(w dz) and mean_group(w dz xhat) of group (n, g) from the partials PA / PB[(n * K + k) * C + c]:
    each channel's A / B summed over the K chunks, then over the channels, in a fixed order (deterministic)."""
    acc1 = tl.zeros((BLOCK_C,), tl.float32)
    acc2 = tl.zeros((BLOCK_C,), tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < CPG
        ch = g * CPG + c
        w, b = _load_params(W, B, ch, cmask, HAS_W, HAS_B)
        a = tl.zeros((BLOCK_C,), tl.float32)
        bb = tl.zeros((BLOCK_C,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            m = (kk < K)[:, None] & cmask[None, :]
            rows = (n * K + kk)[:, None] * C + ch[None, :]
            a += tl.sum(tl.load(PA + rows, mask=m, other=0.0), axis=0)
            bb += tl.sum(tl.load(PB + rows, mask=m, other=0.0), axis=0)
        acc1 += w * a
        acc2 += w * bb
    count = CPG * 1.0 * S   # float: CPG * S may not fit in int32
    return tl.sum(acc1, axis=0) / count, tl.sum(acc2, axis=0) / count


@triton.jit
def _bwd_dx_kernel(DY, X, W, B, Mean, Rstd, DX, PA, PB, G, C, CPG, S, CHUNK_S, K,
                   sdn, sdc, sds, sxn, sxc, sxs, sgn, sgc, sgs,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, INDEX_64: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.num_programs(0) - 1 - tl.program_id(0)   # reverse order: L2 reuse of the partials kernel's last reads
    k = tl.num_programs(1) - 1 - tl.program_id(1)
    n = pid // G
    g = pid % G
    mean = tl.load(Mean + pid)
    rstd = tl.load(Rstd + pid)
    c1, c2 = _group_coefficients(PA, PB, W, B, n, g, C, CPG, S, K, HAS_W, HAS_B, BLOCK_C, BLOCK_K)
    s_begin = k * CHUNK_S
    s_end = tl.minimum(s_begin + CHUNK_S, S)
    n64 = n.to(tl.int64)
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < CPG
        ch = g * CPG + c
        w, b = _load_params(W, B, ch, cmask, HAS_W, HAS_B)
        for s0 in range(s_begin, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < s_end)[None, :]
            x = tl.load(X + n64 * sxn + _offsets(ch, s, sxc, sxs, INDEX_64), mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + n64 * sdn + _offsets(ch, s, sdc, sds, INDEX_64), mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean) * rstd
            dz = _grad_z(dy, xhat, w, b, HAS_W, HAS_B, SILU)
            dx = rstd * (dz * w[:, None] - c1 - xhat * c2)
            tl.store(DX + n64 * sgn + _offsets(ch, s, sgc, sgs, INDEX_64), dx.to(DX.dtype.element_ty), mask=mask)


# Decided by triton when the kernels above were decorated (at this module's import): with TRITON_INTERPRET=1 they are
# interpreted functions, which run on CPU tensors; otherwise JIT functions compiled for a GPU.
INTERPRETED = type(_fwd_single_kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------------------------------------------------------------
# Autotuning (CUDA only) and heuristic configs
# ---------------------------------------------------------------------------------------------------------------------

def _single_configs() -> list[triton.Config]:
    return [triton.Config({}, num_warps=w) for w in (1, 2, 4, 8, 16)]


def _prune_single(configs, named_args, **kwargs):
    tile = named_args["BLOCK_C"] * named_args["BLOCK_S"] if "BLOCK_C" in named_args else kwargs["BLOCK_C"] * kwargs[
        "BLOCK_S"]
    # 4 to 64 fp32 values per thread.
    kept = [c for c in configs if 4 * 32 * c.num_warps <= max(tile, 128) and tile <= 64 * 32 * c.num_warps]
    return kept or configs[:1]


def _chunk_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_S": bs}, num_warps=w) for bs in (32, 64, 128, 256, 512, 1024) for w in (2, 4, 8)]


def _prune_chunk(configs, named_args, **kwargs):
    block_c = kwargs.get("BLOCK_C", named_args.get("BLOCK_C"))
    chunk_s = named_args["CHUNK_S"]
    kept = []
    for cfg in configs:
        tile = block_c * cfg.kwargs["BLOCK_S"]
        if cfg.kwargs["BLOCK_S"] > max(32, triton.next_power_of_2(chunk_s)):
            continue
        if 512 <= tile <= 8192 and 4 * 32 * cfg.num_warps <= tile <= 32 * 32 * cfg.num_warps:
            kept.append(cfg)
    return kept or [triton.Config({"BLOCK_S": max(32, min(1024, 4096 // block_c))}, num_warps=4)]


_SINGLE_KEY = ["BLOCK_C", "BLOCK_S", "sxc", "HAS_W", "SILU"]
_CHUNK_KEY = ["CPG", "S", "CHUNK_S", "sxc", "BLOCK_C"]


def build_autotuned(do_bench=None) -> dict[str, triton.runtime.Autotuner]:
    """Each kernel wrapped in triton.autotune with its configs, key and pruning. Built at import for a GPU; the tests
    build it over the interpreted kernels too, with a stand-in `do_bench` (triton's timer needs a GPU), to run the
    autotuned launch path on a CPU."""
    def tuned(kernel, configs, key, prune):
        return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune},
                               do_bench=do_bench)(kernel)
    chunk_flags = _CHUNK_KEY + ["HAS_W", "SILU"]
    return {
        "fwd_single": tuned(_fwd_single_kernel, _single_configs(), _SINGLE_KEY, _prune_single),
        "bwd_single": tuned(_bwd_single_kernel, _single_configs(), _SINGLE_KEY, _prune_single),
        "fwd_stats": tuned(_fwd_stats_kernel, _chunk_configs(), _CHUNK_KEY, _prune_chunk),
        "fwd_apply": tuned(_fwd_apply_kernel, _chunk_configs(), chunk_flags, _prune_chunk),
        "bwd_partials": tuned(_bwd_partials_kernel, _chunk_configs(), chunk_flags, _prune_chunk),
        "bwd_dx": tuned(_bwd_dx_kernel, _chunk_configs(), chunk_flags, _prune_chunk),
    }


_TUNED = build_autotuned() if not INTERPRETED else {}
_PLAIN = {"fwd_single": _fwd_single_kernel, "bwd_single": _bwd_single_kernel, "fwd_stats": _fwd_stats_kernel,
          "fwd_apply": _fwd_apply_kernel, "bwd_partials": _bwd_partials_kernel, "bwd_dx": _bwd_dx_kernel}


def _autotune_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and not INTERPRETED and os.environ.get("LAYOUTGEN_TRITON_AUTOTUNE", "1") != "0"


def _launch(name: str, grid: tuple[int, ...], args: tuple, meta: dict, tuned_meta: tuple[str, ...],
            device: torch.device) -> None:
    """Runs kernel `name`: autotuned (its `tuned_meta` keys then come from the chosen config), or with `meta`."""
    if _autotune_enabled(device):
        _TUNED[name][grid](*args, **{k: v for k, v in meta.items() if k not in tuned_meta and k != "num_warps"})
    else:
        _PLAIN[name][grid](*args, **meta)


def _single_warps(tile: int) -> int:
    return max(1, min(16, tile // 512))


def _chunk_block_s(block_c: int, chunk_s: int) -> int:
    return max(32, min(1024, 4096 // block_c, triton.next_power_of_2(chunk_s)))


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------

def check_runnable(x: torch.Tensor) -> None:
    """Refuses CPU tensors unless the kernels were built by Triton's interpreter (TRITON_INTERPRET=1) and that
    interpreter works with the installed NumPy."""
    if x.device.type != "cpu":
        return
    if not INTERPRETED:
        raise RuntimeError(
            "layoutgen.kernels: the 'triton' backend got a CPU tensor, but layoutgen's Triton kernels were compiled "
            "for a GPU because TRITON_INTERPRET was not '1' when they were loaded. On a CPU, set TRITON_INTERPRET=1 "
            "in the environment before the process first uses them (Triton's interpreter runs them, slowly), or use "
            "the 'auto' or 'reference' backend (layoutgen.kernels.set_backend / LAYOUTGEN_KERNEL_BACKEND).")
    problem = triton_interpreter.interpreter_problem()
    if problem:
        raise RuntimeError(f"layoutgen.kernels: the 'triton' backend cannot run on the CPU here: {problem}; or use "
                           f"the 'auto' or 'reference' backend.")


def _view_ncs(t: torch.Tensor) -> torch.Tensor:
    """t [N, C, *spatial] as a [N, C, S] view when its strides allow it (NCHW, channels_last), else a copy."""
    n, c = t.shape[:2]
    try:
        return t.view(n, c, -1)
    except RuntimeError:
        return t.contiguous().view(n, c, -1)


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def _plan(n: int, groups: int, cpg: int, s: int, device: torch.device) -> tuple[str, int, int]:
    """('single', 0, 1) or ('chunked', CHUNK_S, K): how to split each group's S spatial positions."""
    tile = triton.next_power_of_2(cpg) * triton.next_power_of_2(s)
    if tile <= SINGLE_MAX_ELEMS:
        return "single", s, 1
    if device.type == "cuda":
        target = TARGET_PROGRAMS_PER_SM * _sm_count(device)
    else:
        target = CPU_TARGET_PROGRAMS
    chunks = max(1, min(MAX_CHUNKS, math.ceil(target / max(1, n * groups)),
                        (cpg * s) // MIN_CHUNK_ELEMS if cpg * s >= MIN_CHUNK_ELEMS else 1))
    chunk_s = math.ceil(s / chunks)
    if chunk_s > 32:
        chunk_s = math.ceil(chunk_s / 32) * 32   # whole 32-wide blocks
    return "chunked", chunk_s, math.ceil(s / chunk_s)


def _one_pass():
    # Imported when first used: it imports this module's kernel helpers.
    from layoutgen.kernels import group_norm_silu_one_pass
    return group_norm_silu_one_pass


def _one_pass_max_chunks(cpg: int, s: int, device: torch.device) -> int | None:
    """Where the one-pass chunked kernels are selected and apply to this group: the most chunks a group may have (the
    SM count on CUDA); else None (the two-pass kernels run)."""
    if group_norm_chunked_path.get() != "one-pass":
        return None
    one_pass = _one_pass()
    max_chunks = _sm_count(device) if device.type == "cuda" else one_pass.CPU_MAX_CHUNKS
    return max_chunks if one_pass.plan(cpg, s, max_chunks) is not None else None


def _one_pass_timer(device: torch.device):
    """The timer the one-pass kernels tune their chunk size and warps with (None: the heuristic config), like the
    two-pass kernels' triton.autotune."""
    if not _autotune_enabled(device):
        return None
    import triton.testing
    return triton.testing.do_bench


def _flags(weight, bias, silu, c, s) -> dict:
    return dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, INDEX_64=c * s >= 2 ** 31)


def forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int, eps: float,
            silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [N, C, *spatial] (fp32 / fp16 / bf16) -> (y like x, mean [N, G] fp32, rstd [N, G] fp32)."""
    check_runnable(x)
    n, c = x.shape[:2]
    s = math.prod(x.shape[2:])
    y = torch.empty_like(x)
    mean = torch.empty((n, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean.zero_(), rstd.fill_(1.0 / math.sqrt(eps))
    x3, y3 = _view_ncs(x), y.view(n, c, -1)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    w_arg = weight if weight is not None else x3   # an unused pointer when absent (HAS_W / HAS_B are False)
    b_arg = bias if bias is not None else x3
    cpg = c // num_groups
    flags = _flags(weight, bias, silu, c, s)
    path, chunk_s, k = _plan(n, num_groups, cpg, s, x.device)
    if path == "single":
        block_c, block_s = triton.next_power_of_2(cpg), triton.next_power_of_2(s)
        meta = dict(flags, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=_single_warps(block_c * block_s))
        _launch("fwd_single", (n * num_groups,),
                (x3, y3, w_arg, b_arg, mean, rstd, num_groups, cpg, s, *x3.stride(), *y3.stride(), eps),
                meta, (), x.device)
        return y, mean, rstd
    max_chunks = _one_pass_max_chunks(cpg, s, x.device)   # path is "chunked" here
    if max_chunks is not None:
        _one_pass().forward(x3, y3, w_arg, b_arg, mean, rstd, num_groups, eps, flags, max_chunks, INTERPRETED,
                            _one_pass_timer(x.device))
        return y, mean, rstd
    block_c = min(triton.next_power_of_2(cpg), 128)
    pmean = torch.empty((n * num_groups, k), dtype=torch.float32, device=x.device)
    pm2 = torch.empty_like(pmean)
    block_s = _chunk_block_s(block_c, chunk_s)
    grid = (n * num_groups, k)
    _launch("fwd_stats", grid, (x3, pmean, pm2, num_groups, cpg, s, chunk_s, k, *x3.stride()),
            dict(INDEX_64=flags["INDEX_64"], BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4), ("BLOCK_S",), x.device)
    _launch("fwd_apply", grid, (x3, y3, w_arg, b_arg, pmean, pm2, mean, rstd, num_groups, cpg, s, chunk_s, k,
                                *x3.stride(), *y3.stride(), eps),
            dict(flags, BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_K=triton.next_power_of_2(k), num_warps=4),
            ("BLOCK_S",), x.device)
    return y, mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
             mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, silu: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx like x, dweight [C] or [0], dbias [C] or [0]; [0] where weight / bias is None)."""
    check_runnable(x)
    n, c = x.shape[:2]
    s = math.prod(x.shape[2:])
    dx = torch.empty_like(x)

    def param_grads(pa_pb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # Fixed-order sums over samples and chunks (torch.sum is deterministic): no atomics anywhere.
        # (Two separate sums: outputs of a custom op may not alias each other.)
        def total(i: int, like: torch.Tensor | None) -> torch.Tensor:
            if like is None:
                return x.new_empty(0)
            if pa_pb is None:
                return torch.zeros_like(like)
            return pa_pb[i].sum(dim=(0, 1)).to(like.dtype)
        return total(1, weight), total(0, bias)

    if x.numel() == 0:
        return dx, *param_grads(None)
    x3, dx3, dy3 = _view_ncs(x), dx.view(n, c, -1), _view_ncs(dy)
    weight_c = weight.contiguous() if weight is not None else None
    bias_c = bias.contiguous() if bias is not None else None
    w_arg = weight_c if weight_c is not None else x3
    b_arg = bias_c if bias_c is not None else x3
    cpg = c // num_groups
    flags = _flags(weight, bias, silu, c, s)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    path, chunk_s, k = _plan(n, num_groups, cpg, s, x.device)
    max_chunks = _one_pass_max_chunks(cpg, s, x.device) if path == "chunked" else None
    if max_chunks is not None:
        partials = _one_pass().backward(dy3, x3, dx3, w_arg, b_arg, mean, rstd, num_groups, flags, max_chunks,
                                        INTERPRETED, _one_pass_timer(x.device))
        return dx, *param_grads(partials)
    partials = torch.empty((2, n, k, c), dtype=torch.float32, device=x.device)   # [A; B]
    pa, pb = partials[0], partials[1]
    if path == "single":
        block_c, block_s = triton.next_power_of_2(cpg), triton.next_power_of_2(s)
        meta = dict(flags, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=_single_warps(2 * block_c * block_s))
        _launch("bwd_single", (n * num_groups,),
                (dy3, x3, w_arg, b_arg, mean, rstd, dx3, pa, pb, num_groups, c, cpg, s,
                 *dy3.stride(), *x3.stride(), *dx3.stride()), meta, (), x.device)
        return dx, *param_grads(partials)
    block_c = min(triton.next_power_of_2(cpg), 128)
    block_s = _chunk_block_s(block_c, chunk_s)
    grid = (n * num_groups, k)
    _launch("bwd_partials", grid, (dy3, x3, w_arg, b_arg, mean, rstd, pa, pb, num_groups, c, cpg, s, chunk_s, k,
                                   *dy3.stride(), *x3.stride()),
            dict(flags, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4), ("BLOCK_S",), x.device)
    _launch("bwd_dx", grid, (dy3, x3, w_arg, b_arg, mean, rstd, dx3, pa, pb, num_groups, c, cpg, s, chunk_s, k,
                             *dy3.stride(), *x3.stride(), *dx3.stride()),
            dict(flags, BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_K=min(triton.next_power_of_2(k), 32), num_warps=4),
            ("BLOCK_S",), x.device)
    return dx, *param_grads(partials)


# ---------------------------------------------------------------------------------------------------------------------
# Compile check without a GPU: python -m layoutgen.kernels.group_norm_silu_triton
# ---------------------------------------------------------------------------------------------------------------------

def _signature(fn, values: dict) -> tuple[dict, dict, dict]:
    """Triton's launch-time signature for these argument values, as its launcher builds it: pointers given as type
    strings ('*bf16'), ints equal to 1 specialised to constants, and the divisibility-by-16 attribute on pointers
    (assumed 16-byte aligned, as torch's allocations are) and on ints that are multiples of 16. Without that
    attribute the compiler cannot prove alignment and emits scalar loads and stores."""
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr or (type(v) is int and v == 1):
            sig[p.name], consts[p.name] = "constexpr", v
            continue
        if isinstance(v, str):
            sig[p.name] = v
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i64" if abs(v) >= 2 ** 31 else "i32"
        if isinstance(v, str) or (type(v) is int and v % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_check(arch: int = 90) -> int:
    """Compiles every kernel for sm_`arch` in representative specialisations (layouts, flags, 64-bit offsets, the
    size-1 corner cases, a stride-0 gradient) without a GPU; returns how many. Triton's interpreter, which runs the
    tests on a CPU, accepts code the compiler refuses, so CI runs this too. In the aligned bf16 NCHW case every
    kernel must load and store x / y / dy / dx with 16-byte vector instructions (a scalar 2-byte access would cost
    the bandwidth these kernels exist for); a kernel that does not is an error naming it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if INTERPRETED:
        raise RuntimeError("compile_check needs the compiled kernels: run it without TRITON_INTERPRET=1")
    target = GPUTarget("cuda", arch, 32)
    count = 0

    def build(fn, num_warps=4, **values):
        nonlocal count
        vectors_expected = values.pop("vectors_expected", False)
        sig, consts, attrs = _signature(fn, values)
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target,
                                options={"num_warps": num_warps})
        count += 1
        ptx = kernel.asm["ptx"]
        if vectors_expected and "ld.global.v4" not in ptx:
            raise RuntimeError(f"compile_check: {fn.__name__} reads aligned bf16 NCHW data without 16-byte vector "
                               f"loads (scalar accesses)")
        # The one-pass kernels' barrier: release on arrival and on the ready flag, acquire when polling it.
        if "one_pass" in fn.__name__ and not all(f".{sem}." in ptx for sem in ("acq_rel", "release", "acquire")):
            raise RuntimeError(f"compile_check: {fn.__name__} lost the acquire / release ordering of its barrier")

    for dtype, layout, flags, index_64 in [("*bf16", "nchw", (True, True, True), False),
                                           ("*bf16", "nhwc", (True, True, True), True),
                                           ("*fp32", "nchw", (False, False, False), True),
                                           ("*fp16", "nhwc", (True, False, False), False)]:
        cpg, s, groups = 4, 4096, 8
        c = cpg * groups
        xs = (c * s, s, 1) if layout == "nchw" else (c * s, 1, c)
        f = dict(HAS_W=flags[0], HAS_B=flags[1], SILU=flags[2], INDEX_64=index_64)
        x = dict(X=dtype, sxn=xs[0], sxc=xs[1], sxs=xs[2])
        y = dict(Y=dtype, syn=xs[0], syc=xs[1], sys=xs[2])
        g = dict(DY=dtype, DX=dtype, sdn=xs[0], sdc=xs[1], sds=xs[2], sgn=xs[0], sgc=xs[1], sgs=xs[2])
        params = dict(W="*fp32", B="*fp32", Mean="*fp32", Rstd="*fp32", G=groups, CPG=cpg, S=s)
        chunk = dict(CHUNK_S=512, K=8, BLOCK_C=4, BLOCK_S=256)
        x["vectors_expected"] = dtype == "*bf16" and layout == "nchw"
        build(_fwd_single_kernel, 8, **x, **y, **params, **f, eps=1e-5, BLOCK_C=4, BLOCK_S=1024)
        build(_fwd_stats_kernel, **x, PMean="*fp32", PM2="*fp32", G=groups, CPG=cpg, S=s, **chunk,
              INDEX_64=index_64)
        build(_fwd_apply_kernel, **x, **y, **params, PMean="*fp32", PM2="*fp32", **chunk, eps=1e-5, BLOCK_K=8, **f)
        build(_bwd_single_kernel, 16, **x, **g, **params, PA="*fp32", PB="*fp32", C=c, BLOCK_C=4, BLOCK_S=1024, **f)
        build(_bwd_partials_kernel, **x, **g, **params, PA="*fp32", PB="*fp32", C=c, **chunk, **f)
        build(_bwd_dx_kernel, **x, **g, **params, PA="*fp32", PB="*fp32", C=c, **chunk, BLOCK_K=8, **f)
        one_pass = dict(Sync="*i32", NG=2 * groups, CHUNK_S=2048, K=2, PHASE=0, MAX_SPINS=2 ** 22, BLOCK_C=4,
                        BLOCK_S=2048, BLOCK_K=2)
        build(_one_pass()._fwd_one_pass_kernel, 8, **x, **y, **params, PMean="*fp32", PM2="*fp32", eps=1e-5,
              **one_pass, **f)
        build(_one_pass()._bwd_one_pass_kernel, 16, **x, **g, **params, PA="*fp32", PB="*fp32", Coef="*fp32", C=c,
              **one_pass, **f)
    # Size-1 corners (CPG, S, G, CHUNK_S equal to 1 become constants) and an all-stride-0 (expanded) gradient.
    corner = dict(W="*fp32", B="*fp32", Mean="*fp32", Rstd="*fp32", HAS_W=True, HAS_B=False, SILU=True,
                  INDEX_64=False)
    build(_fwd_single_kernel, 1, X="*bf16", Y="*bf16", G=8, CPG=1, S=1, sxn=8, sxc=1, sxs=1, syn=8, syc=1, sys=1,
          eps=1e-5, BLOCK_C=1, BLOCK_S=1, **corner)
    build(_fwd_apply_kernel, X="*bf16", Y="*bf16", PMean="*fp32", PM2="*fp32", G=1, CPG=1, S=2, CHUNK_S=1, K=2,
          sxn=2, sxc=2, sxs=1, syn=2, syc=2, sys=1, eps=1e-5, BLOCK_C=1, BLOCK_S=32, BLOCK_K=2, **corner)
    build(_fwd_stats_kernel, X="*bf16", PMean="*fp32", PM2="*fp32", G=1, CPG=1, S=2, CHUNK_S=1, K=2, sxn=2, sxc=2,
          sxs=1, INDEX_64=False, BLOCK_C=1, BLOCK_S=32)
    build(_bwd_single_kernel, 2, DY="*bf16", X="*bf16", DX="*bf16", PA="*fp32", PB="*fp32", G=8, C=64, CPG=8, S=63,
          sdn=0, sdc=0, sds=0, sxn=4032, sxc=63, sxs=1, sgn=4032, sgc=63, sgs=1, BLOCK_C=8, BLOCK_S=64, **corner)
    return count


if __name__ == "__main__":
    print(f"compiled {compile_check()} GroupNorm+SiLU kernels for sm_90 with triton {triton.__version__}")
