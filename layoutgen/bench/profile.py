"""`layoutgen profile --config X --steps N`: torch.profiler over N training steps of an experiment.

The model and a batch come from the experiment's config: synthetic layouts for an autoencoder; for a diffusion or
ControlNet experiment, synthetic layouts through the frozen autoencoder when its checkpoint exists, else random
latents of the configured latent shape (and, for ControlNet, the synthetic outline masks as control images), said
in the output. One step runs first, untimed (allocations, lazy initialisation, the latent scale); then N steps
are timed without the profiler (samples/s; the peak memory is taken from the first step on), then N steps are
profiled (CPU activities, plus CUDA where
present) into:
- trace.json: the Chrome trace (chrome://tracing or https://ui.perfetto.dev);
- top_ops.txt: torch.profiler's table of the top ops and kernels by self time;
- profile.json: samples/s, peak memory, the top ops, and the achieved bandwidth of the project's own kernels.

Project kernels are found by their profiler events: the torch.library ops (layoutgen::*) and the eager autograd
Function of the fused GroupNorm+SiLU (_EagerGroupNormSiLU and its Backward). Their bytes are analytic (the least a
fused kernel must move: see BYTE_PASSES) from the recorded input shapes and dtypes; the time is the events' device
time on a GPU, CPU time on a CPU. Their GB/s is set against the device's copy bandwidth, measured in the same run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable

import torch

from layoutgen.bench.machine import machine_info
from layoutgen.bench.tables import markdown_table
from layoutgen.bench.timing import peak_memory, synchronize
from layoutgen.utils.atomic import atomic_write_text

# event name -> passes over the first input's size: reads + writes of tensors of that size.
BYTE_PASSES = {
    "layoutgen::group_norm_silu_fwd": 2, "_EagerGroupNormSiLU": 2,            # read x, write y
    "layoutgen::group_norm_silu_bwd": 3, "_EagerGroupNormSiLUBackward": 3,    # read dy, x, write dx
    "layoutgen::add_noise": 3, "layoutgen::velocity": 3,                      # read x0, noise, write x_t
    "layoutgen::add_noise_philox": 3,                                         # read x0, write noise, x_t
    "layoutgen::ddim_step": 5,                                                # read out, x_t, noise, write 2
    "layoutgen::ddpm_step": 5,                                                # the same, with variance noise
}
DTYPE_BYTES = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "Half": 2, "BFloat16": 2}


def _autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    from layoutgen.bench.models import autocast
    return autocast(amp, device)


def build_workload(kind: str, exp, device: torch.device) -> tuple[torch.nn.Module, dict, Callable, int, list[str]]:
    """(model, batch, loss(model, batch), batch size, notes) for one experiment."""
    from layoutgen.models.datasets.synthetic import SyntheticLayoutDataset
    from layoutgen.training.autoencoder import to_device

    notes: list[str] = []
    n = exp.training.batch_size
    on_gpu = device.type == "cuda"
    amp = exp.training.amp if on_gpu else "none"
    if exp.training.amp != "none" and not on_gpu:
        notes.append(f"training.amp={exp.training.amp} is for CUDA; profiled in fp32 on the CPU")
    channels_last = exp.training.channels_last and on_gpu

    def synthetic(size: int) -> dict:
        dataset = SyntheticLayoutDataset(n, size=size, seed=0)
        return torch.utils.data.default_collate([dataset[i] for i in range(n)])

    if kind == "autoencoder":
        from layoutgen.models.autoencoder import Autoencoder
        from layoutgen.models.losses.base_loss import build_loss

        model = Autoencoder.from_config(exp.autoencoder).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        loss_fn = build_loss(exp.loss).to(device)
        batch = to_device(synthetic(exp.data.image_size), device, channels_last)

        def loss(m, b):
            with _autocast(amp, device):
                out = m(b["rgb"])
            return loss_fn(out, b)[0]
        return model, batch, loss, n, notes

    from layoutgen.models.controlnet_diffusion import ControlNetDiffusion
    from layoutgen.models.diffusion import DiffusionModel

    cfg = exp.diffusion if kind == "diffusion" else exp.controlnet_diffusion
    changes = {}
    if cfg.autoencoder_checkpoint and not os.path.isfile(cfg.autoencoder_checkpoint):
        notes.append(f"autoencoder_checkpoint {cfg.autoencoder_checkpoint} does not exist: profiled on random "
                     f"latents of the configured shape {cfg.unet.in_channels}x{cfg.latent_size[0]}x"
                     f"{cfg.latent_size[1]}")
        changes["autoencoder_checkpoint"] = None
    if kind == "controlnet" and cfg.base_checkpoint and not os.path.isfile(cfg.base_checkpoint):
        notes.append(f"base_checkpoint {cfg.base_checkpoint} does not exist: the frozen base UNet is randomly "
                     f"initialised (the same work per step)")
        changes["base_checkpoint"] = None
    if changes:
        cfg = type(cfg).from_dict({**cfg.to_dict(), **changes})
    model = (DiffusionModel(cfg) if kind == "diffusion" else ControlNetDiffusion(cfg)).to(device)
    h, w = cfg.latent_size
    g = torch.Generator().manual_seed(0)
    if model.autoencoder is not None:
        factor = model.autoencoder.downsampling_factor
        batch = {"rgb": synthetic(h * factor)["rgb"]}
    else:
        batch = {"latent": torch.randn(n, cfg.unet.in_channels, h, w, generator=g)}
    if cfg.unet.num_classes:
        batch["label"] = torch.randint(0, cfg.unet.num_classes, (n,), generator=g)
    if kind == "controlnet":
        factor = model.controlnet.cfg.downsampling_factor
        batch[cfg.control_key] = synthetic(h * factor)["control"]
    batch = to_device(batch, device, False)
    generator = torch.Generator(device=device)

    def loss(m, b):
        generator.manual_seed(0)
        with _autocast(amp, device):
            return m.training_loss(b, generator)[0]
    return model, batch, loss, n, notes


def _element_bytes(dtype_name: str) -> int | None:
    return DTYPE_BYTES.get(dtype_name)


def _kineto_input_dtypes(prof) -> dict[int, list[str]]:
    """Event id -> input dtypes of the project ops, from the profiler's raw (Kineto) results. For torch versions whose
    FunctionEvent has no `input_dtypes` (2.11 has not; 2.13 has): FunctionEvent.id is the Kineto correlation id."""
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:
        return {}
    return {e.correlation_id(): list(e.dtypes()) for e in results.events() if e.name() in BYTE_PASSES}


def project_kernel_bandwidth(events, on_gpu: bool, ceiling: float,
                             dtypes: dict[int, list[str]] | None = None) -> list[dict]:
    """Per project op: calls, time, analytic bytes, GB/s and share of the measured copy bandwidth. `dtypes` (event id
    -> input dtypes) stands in where the events carry no input_dtypes (older torch)."""
    totals: dict[str, dict] = {}
    for event in events:
        passes = BYTE_PASSES.get(event.name)
        if passes is None or not event.input_shapes or not event.input_shapes[0]:
            continue
        input_dtypes = getattr(event, "input_dtypes", None)
        if input_dtypes is None and dtypes:
            input_dtypes = dtypes.get(getattr(event, "id", None))
        size = _element_bytes(input_dtypes[0]) if input_dtypes else None
        if size is None:
            continue
        us = event.device_time_total if on_gpu else event.cpu_time_total
        entry = totals.setdefault(event.name, {"op": event.name, "calls": 0, "us": 0.0, "bytes": 0})
        entry["calls"] += 1
        entry["us"] += us
        entry["bytes"] += passes * math.prod(event.input_shapes[0]) * size
    rows = []
    for entry in totals.values():
        rate = entry["bytes"] / (entry["us"] * 1e-6) / 1e9 if entry["us"] > 0 else None  # no time recorded
        rows.append({"op": entry["op"], "calls": entry["calls"], "ms": entry["us"] / 1e3,
                     "MB moved": entry["bytes"] / 1e6, "GB/s": rate,
                     "% bw": None if rate is None else 100 * rate / ceiling})
    return sorted(rows, key=lambda r: -r["ms"])


def profile_experiment(config: str, steps: int, out: str | None = None, device: str = "auto",
                       overrides: list[str] | None = None, top: int = 25, threads: int | None = None,
                       log=print) -> dict:
    """Profiles `steps` training steps of the experiment in `config`; writes trace.json, top_ops.txt and
    profile.json into `out` (default runs/profile/<config name>); returns the summary. threads: CPU intra-op
    threads for the run (default: torch's setting)."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _profile(config, steps, out, device, overrides, top, log)
    finally:
        torch.set_num_threads(previous)


def _profile(config, steps, out, device, overrides, top, log) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    from layoutgen.bench.models import training_step
    from layoutgen.bench.ops import group_norm_silu_path
    from layoutgen.bench.run import resolve_device
    from layoutgen.kernels import get_backend
    from layoutgen.training.experiment import load_any_experiment

    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    kind, exp = load_any_experiment(config, overrides or [])
    dev = resolve_device(device)
    on_gpu = dev.type == "cuda"
    out = out or os.path.join("runs", "profile", os.path.splitext(os.path.basename(config))[0])
    os.makedirs(out, exist_ok=True)
    machine = machine_info(dev)
    torch.manual_seed(exp.training.seed)
    model, batch, loss, batch_size, notes = build_workload(kind, exp, dev)
    model.train()
    step = training_step(model, loss, batch, None, dev)
    log(f"profile: {config} ({kind}) on {machine['card']}, batch {batch_size}, {steps} steps")
    timing: dict[str, float] = {}

    def first_and_timed():
        step()  # untimed: first-call work (allocations, lazy init, the latent scale) stays out of samples/s
        synchronize(dev)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(dev)
        timing["seconds"] = time.perf_counter() - start
    # One workload in this process: the peak (from the first step on, above what the built model and batch hold)
    # is this training's own, on the CPU too.
    peak, memory_method = peak_memory(first_and_timed, dev)
    seconds = timing["seconds"]

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for i in range(steps):
            with record_function(f"training_step_{i}"):
                step()
        synchronize(dev)
    trace = os.path.join(out, "trace.json")
    prof.export_chrome_trace(trace)
    sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=top)
    atomic_write_text(os.path.join(out, "top_ops.txt"), table + "\n")
    averages = sorted(prof.key_averages(), key=lambda e: -(e.self_device_time_total if on_gpu
                                                           else e.self_cpu_time_total))[:top]
    top_ops = [{"name": e.key, "calls": e.count, "self ms": (e.self_device_time_total if on_gpu
                                                               else e.self_cpu_time_total) / 1e3,
                "total ms": (e.device_time_total if on_gpu else e.cpu_time_total) / 1e3} for e in averages]
    events = prof.events()
    # Only where the events carry no input dtypes (torch 2.11) are they read from the Kineto results.
    dtypes = _kineto_input_dtypes(prof) if events and not hasattr(events[0], "input_dtypes") else None
    kernels = project_kernel_bandwidth(events, on_gpu, machine["copy_bandwidth_gbs"], dtypes)
    if not kernels:
        notes.append(f"no project kernel ran: kernel backend {get_backend()!r}, GroupNorm+SiLU on {dev.type}: "
                     f"{group_norm_silu_path(dev)}")
    summary = {"config": config, "kind": kind, "steps": steps, "batch_size": batch_size, "machine": machine,
               "samples_per_s": steps * batch_size / seconds, "step_ms": 1e3 * seconds / steps,
               "peak_memory_mib": None if peak is None else peak / 2 ** 20, "memory_method": memory_method,
               "kernel_backend": get_backend(), "project_kernels": kernels, "top_ops": top_ops, "notes": notes,
               "files": {"trace": trace, "table": os.path.join(out, "top_ops.txt"),
                         "json": os.path.join(out, "profile.json")}}
    atomic_write_text(summary["files"]["json"], json.dumps(summary, indent=2, default=str) + "\n")
    print(table)
    print(f"samples/s {summary['samples_per_s']:.2f} (step {summary['step_ms']:.1f} ms, without the profiler); "
          f"peak memory {'n/a' if peak is None else f'{peak / 2 ** 20:.1f} MiB'} ({memory_method})")
    if kernels:
        print(f"project kernels (copy bandwidth {machine['copy_bandwidth_gbs']:.1f} GB/s):")
        print(markdown_table(kernels, ["op", "calls", "ms", "MB moved", "GB/s", "% bw"]))
    for note in notes:
        print(f"note: {note}")
    print(f"trace -> {trace}; table -> {summary['files']['table']}; summary -> {summary['files']['json']}")
    return summary
