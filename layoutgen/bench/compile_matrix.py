"""`layoutgen bench --compile-matrix`: {eager, compile default, compile max-autotune} x {reference ops, fused ops}
x {fp32, bf16} for the autoencoder and the UNet training steps of layoutgen.bench.models.

Per cell: compile time (the wall time of the first step, which traces and compiles; for eager the first step's
time, as a baseline), the median step time after warm-up, samples/s, the speed-up over eager with the same ops and
dtype, and the graph breaks of the model's forward under those ops (torch._dynamo.explain), which must be 0 for
every project model (tests/test_compile_graph_breaks.py keeps it there).

"fused ops" is the kernel backend "auto" (the library's default): on a GPU the Triton GroupNorm+SiLU kernels, on a
CPU the PyTorch reference (Triton would run in its interpreter), so on a CPU the fused cells are the reference cells
and are not measured twice. --quick on a CPU also leaves out max-autotune (its benchmarking of candidate kernels
takes many minutes on 2 cores); both are said in the output.
"""
from __future__ import annotations

import time

import torch

from layoutgen.bench.models import autoencoder_workload, training_step, unet_workload
from layoutgen.bench.timing import allow_recompiles, synchronize, time_ms

MODES = ("eager", "default", "max-autotune")
OPS = {"reference": "reference", "fused": "auto"}
DTYPES = {"fp32": "none", "bf16": "bf16"}
WORKLOADS = {"autoencoder": autoencoder_workload, "unet": unet_workload}


def forward_call(work) -> tuple[torch.nn.Module, tuple, dict]:
    """The model's forward and its inputs: Autoencoder(rgb), UNet(latents, timesteps, labels=...)."""
    if work.name == "autoencoder":
        return work.model, (work.batch["rgb"],), {}
    z, labels = work.batch["latent"], work.batch["label"]
    t = torch.randint(0, work.model.scheduler.num_steps, (z.shape[0],), device=z.device)
    return work.model.unet, (z, t), {"labels": labels}


def graph_breaks(module: torch.nn.Module, args: tuple, kwargs: dict, backend: str) -> tuple[int, list[str]]:
    """(graph_break_count, reasons) of torch._dynamo.explain over module(*args, **kwargs) under kernel `backend`."""
    from layoutgen.kernels import use_backend

    torch._dynamo.reset()
    with use_backend(backend):
        explanation = torch._dynamo.explain(module)(*args, **kwargs)
    return explanation.graph_break_count, [str(r.reason) for r in explanation.break_reasons]


def plan(device: torch.device, quick: bool) -> tuple[list[str], list[str], list[str]]:
    """(modes, ops, notes) for this device and mode."""
    on_gpu = device.type == "cuda"
    modes = list(MODES) if on_gpu or not quick else ["eager", "default"]
    ops = list(OPS) if on_gpu else ["reference"]
    notes = []
    if "max-autotune" not in modes:
        notes.append("compile max-autotune skipped: --quick on a CPU (its kernel autotuning takes many minutes on "
                     "2 cores); run without --quick for it")
    if "fused" not in ops:
        notes.append("fused ops = the reference on a CPU (kernel backend auto runs Triton on CUDA only): the fused "
                     "cells are the reference cells, not measured twice")
    return modes, ops, notes


def matrix_rows(device: torch.device, quick: bool, models=tuple(WORKLOADS), modes=None, log=print
                ) -> tuple[list[dict], list[str]]:
    planned_modes, ops_names, notes = plan(device, quick)
    modes = list(modes or planned_modes)
    allow_recompiles(4096)
    on_gpu = device.type == "cuda"
    rows = []
    for name in models:
        base = WORKLOADS[name](device, quick)
        breaks = {}
        for ops in ops_names:
            module, args, kwargs = forward_call(base)
            breaks[ops] = graph_breaks(module, args, kwargs, OPS[ops])
            if breaks[ops][0]:
                notes.append(f"{name} with {ops} ops: {breaks[ops][0]} graph breaks: {breaks[ops][1]}")
        for dtype, amp in DTYPES.items():
            for ops in ops_names:
                eager_ms = None
                for mode in modes:
                    log(f"compile matrix: {name} {mode} {ops} {dtype} ...")
                    work = WORKLOADS[name](device, quick, amp=amp)
                    if mode != "eager":
                        torch._dynamo.reset()
                        # in place, so the training loss's call of the model (or of its UNet) goes through dynamo
                        (work.model.unet if name == "unet" else work.model).compile(mode=mode)
                    step = training_step(work.model, work.loss, work.batch, OPS[ops], device)
                    synchronize(device)
                    start = time.perf_counter()
                    step()
                    synchronize(device)
                    first_s = time.perf_counter() - start
                    ms = time_ms(step, device, warmup=2 if on_gpu else 1, repeats=10 if on_gpu else 3,
                                 flush_l2=False)
                    eager_ms = ms if mode == "eager" else eager_ms
                    rows.append({"suite": "compile_matrix", "model": name, "mode": mode, "ops": ops, "dtype": dtype,
                                 "compile s": first_s, "ms": ms, "samples/s": work.batch_size / (ms * 1e-3),
                                 "vs eager": eager_ms / ms if eager_ms else None,
                                 "graph breaks": breaks[ops][0],
                                 "note": "first step (no compile)" if mode == "eager" else "first step incl. compile"})
                    del step, work
    return rows, notes
