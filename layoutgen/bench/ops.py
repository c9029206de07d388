"""Per-op suites of `layoutgen bench`: GroupNorm+SiLU, attention, noise ops and data loading.

The op-specific parts (shapes, inputs, providers, analytic byte and FLOP counts) live in layoutgen.bench.suites, one
module per op and the one place each op's benchmark is defined (benchmarks/bench_<op>.py are command-line wrappers
around the same modules); this module runs them as one suite with one row format, from an installed package too.

Row format: op, shape, mode, dtype, provider, path (what ran), ms, GB/s (analytic bytes / median time), "% bw" (of
the copy bandwidth measured in the same run), "vs reference" and "vs compile" (speed-up over those providers, in the
same run), and for attention TFLOP/s. Data loading rows give samples/s instead.
"""
from __future__ import annotations

import tempfile

import torch

from layoutgen.bench.suites import attention as attn
from layoutgen.bench.suites import data
from layoutgen.bench.suites import group_norm_silu as gn
from layoutgen.bench.suites import noise_ops as nz
from layoutgen.bench.timing import allow_recompiles, gbs, time_interleaved

OP_SUITES = ("group_norm_silu", "attention", "noise_ops", "data")


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def group_norm_silu_path(device: torch.device) -> str:
    """What `group_norm_silu` runs on `device` under the default kernel backend ("auto")."""
    from layoutgen.kernels.backend import kernel_backend, use_triton

    with kernel_backend.use("auto", "layoutgen bench"):
        triton = use_triton(torch.empty(0, device=device))
    if triton:
        return "Triton kernels (backend auto)"
    return ("PyTorch reference (backend auto runs Triton on CUDA only; on a CPU Triton would run in its "
            "interpreter)")


def group_norm_silu_rows(device: torch.device, quick: bool, ceiling: float) -> list[dict]:
    from layoutgen.kernels import group_norm_silu, use_backend

    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    shapes = (gn.QUICK_GPU if quick else gn.AUTOENCODER + gn.UNET) if on_gpu else (gn.QUICK_CPU if quick else gn.CPU)
    modes = ("fwd", "fwd+bwd") if quick and not on_gpu else gn.MODES
    repeats = 20 if on_gpu else 15
    path = group_norm_silu_path(device)

    def ours(x, w, b):
        with use_backend("auto"):  # what the models call: the library's own choice on this device
            return group_norm_silu(x, gn.GROUPS, w, b)

    # On a GPU also the one-pass chunked kernels, side by side with the default they may replace.
    providers = ("eager", "compile", "ours") + (("ours-1pass",) if on_gpu else ())
    paths = {"eager": "F.group_norm + F.silu (eager)", "compile": "torch.compile of the reference", "ours": path,
             "ours-1pass": "Triton kernels, one-pass chunked kernels"}
    rows = []
    for shape in shapes:
        for mode in modes:
            fns = {}
            for provider in providers:
                x, w, b, dy = gn.inputs(shape, device, dtype, False, requires_grad=mode != "fwd")
                fn = ours if provider == "ours" else gn.make_fn(provider, shape[1], device, dtype, x)
                # "ours" here is the library's own choice (backend auto), so no kernel choice is imposed on it.
                fns[provider] = gn.runner(fn, mode, x, w, b, dy, None if provider == "ours" else provider)
            times = time_interleaved(fns, device, warmup=3 if not on_gpu else 10, repeats=repeats)
            nbytes = gn.analytic_bytes(shape, dtype, mode)
            for provider, ms in times.items():
                rate = gbs(nbytes, ms)
                rows.append({"op": "group_norm_silu", "shape": _shape(shape), "mode": mode, "dtype": _dtype_name(dtype),
                             "provider": "reference" if provider == "eager" else provider,
                             "path": paths[provider],
                             "ms": ms, "GB/s": rate, "% bw": 100 * rate / ceiling,
                             "vs reference": times["eager"] / ms, "vs compile": times["compile"] / ms})
    return rows


def attention_rows(device: torch.device, quick: bool, ceiling: float) -> list[dict]:
    from layoutgen.kernels import get_attention_backend

    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if on_gpu:
        shapes = attn.QUICK_GPU if quick else attn.GPU_SHAPES
    else:
        shapes = attn.QUICK_CPU if quick else attn.CPU_SHAPES
    modes = ("fwd",) if quick and not on_gpu else attn.MODES
    default = get_attention_backend()
    rows = []
    for shape in shapes:
        for mode in modes:
            fns = {}
            for backend in attn.backends(device):
                q, k, v, dy = attn.make_inputs(shape, device, dtype, requires_grad=mode != "fwd")
                fns[backend] = attn.runner(backend, mode, q, k, v, dy)
            times = time_interleaved(fns, device, warmup=2, repeats=20 if on_gpu else 7)
            # Minimal bytes: read q, k, v and write o (fwd); fwd+bwd also reads o, do and writes dq, dk, dv.
            element = torch.empty((), dtype=dtype).element_size()
            nbytes = (4 if mode == "fwd" else 9) * torch.Size(shape).numel() * element
            for backend, ms in times.items():
                rate = gbs(nbytes, ms)
                rows.append({"op": "attention", "shape": _shape(shape), "mode": mode, "dtype": _dtype_name(dtype),
                             "provider": "reference" if backend == "math" else backend,
                             "path": backend + (" (the default backend)" if backend == default else ""),
                             "ms": ms, "GB/s": rate, "% bw": 100 * rate / ceiling,
                             "TFLOP/s": attn.flops(shape, mode) / (ms * 1e-3) / 1e12,
                             "vs reference": times["math"] / ms})
    return rows


def noise_ops_rows(device: torch.device, quick: bool, ceiling: float) -> list[dict]:
    from layoutgen.kernels import noise_ops

    status = noise_ops.noise_ops_status()
    if not status.compiled or device.type not in status.devices:
        return [{"op": "noise_ops", "provider": "ours", "path": f"not measured: {status.reason}"}]
    on_gpu = device.type == "cuda"
    names = ["latents"] if quick and not on_gpu else list(nz.SHAPES)
    ops = ("add_noise",) if quick and not on_gpu else nz.OPS
    dtypes = [torch.float32] if not on_gpu else [torch.float32, torch.bfloat16]
    tables = nz.schedule(device)
    rows = []
    for dtype in dtypes:
        for op in ops:
            for name in names:
                shape = nz.SHAPES[name]
                fns = nz.make_fns(op, shape, device, dtype, tables)
                times = time_interleaved(fns, device, warmup=3, repeats=20 if on_gpu else 15)
                nbytes = nz.analytic_bytes(op, torch.Size(shape).numel(), dtype)
                for provider, ms in times.items():
                    rate = gbs(nbytes, ms)
                    rows.append({"op": op, "shape": f"{name} {_shape(shape)}", "mode": "fwd",
                                 "dtype": _dtype_name(dtype),
                                 "provider": "reference" if provider == "eager" else provider,
                                 "path": {"eager": "diffusers' chain (eager)", "compile": "torch.compile of it",
                                          "ours": f"torch.ops.layoutgen ({status.describe()})",
                                          "ours+checks": "public function, argument checks"}[provider],
                                 "ms": ms, "GB/s": rate, "% bw": 100 * rate / ceiling,
                                 "vs reference": times["eager"] / ms, "vs compile": times["compile"] / ms})
    return rows


def data_rows(device: torch.device, quick: bool, ceiling: float) -> list[dict]:
    from layoutgen.models.datasets import ManifestDataset, build_torch_loader, dali_available

    size, num = (128, 64) if quick else (512, 256)
    workers, batch_size, rounds = 2, 16, 2 if quick else 5
    with tempfile.TemporaryDirectory(prefix="layoutgen_bench_data_") as root:
        manifest = data.make_data(root, size, num)
        shape = f"{num} layouts {size}x{size}, batch {batch_size}"
        if dali_available():
            r = data.compare(manifest, workers, batch_size, rounds)
            rates = {"reference": (r["torch"], f"torch DataLoader, {workers} workers"),
                     "dali": (r["dali"], f"DALI CPU pipeline, {workers} threads")}
        else:
            loader = build_torch_loader(ManifestDataset(manifest, outputs=data.OUTPUTS), batch_size,
                                        num_workers=workers, persistent_workers=True)
            data.epoch_rate(loader)  # warm-up: starts the workers
            rate = sorted(data.epoch_rate(loader) for _ in range(rounds))[rounds // 2]
            rates = {"reference": (rate, f"torch DataLoader, {workers} workers (DALI not installed)")}
    reference = rates["reference"][0]
    return [{"op": "data loading", "shape": shape, "mode": "epoch", "dtype": "-", "provider": provider,
             "path": path, "samples/s": rate, "vs reference": rate / reference}
            for provider, (rate, path) in rates.items()]


SUITES = {"group_norm_silu": group_norm_silu_rows, "attention": attention_rows, "noise_ops": noise_ops_rows,
          "data": data_rows}


def run_op_suites(device: torch.device, quick: bool, ceiling: float, suites=OP_SUITES, log=print) -> list[dict]:
    """Every op suite's rows, each tagged suite="ops"."""
    allow_recompiles(4096)  # one graph per shape and mode: past dynamo's limit the compile column would run eager
    rows = []
    for name in suites:
        log(f"bench: ops/{name} ...")
        for row in SUITES[name](device, quick, ceiling):
            rows.append({"suite": "ops", **row})
    return rows
