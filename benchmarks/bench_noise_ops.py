"""The scheduler's noise ops: ours (the compiled C++/CUDA extension, torch.ops.layoutgen) against the eager reference
(the chain diffusers' DDPMScheduler.add_noise runs: gather, pow, mul, mul, add) and torch.compile of that reference.

    python benchmarks/bench_noise_ops.py [--quick] [--dtype bf16] [--device cuda]   # script mode: a markdown table
    pytest benchmarks/bench_noise_ops.py                                           # pytest-benchmark suite

Shapes: the seed's latents (N=64, 16x32x32), autoencoder-size tensors (N=16, 3x512x512) and a large batch of
latents (N=1024, 16x32x32). Rows:
- add_noise: x_t = sqrt(acp[t]) x0 + sqrt(1 - acp[t]) noise, per-sample t. GB/s counts the bytes the op must move at
  least: two reads (x0, noise) and one write (x_t) of the tensor's size.
- add_noise + noise draw: the noise drawn too; ours is the fused Philox op (writes noise and x_t in one pass: one
  read, two writes), eager and compile draw with torch.randn and then run the chain.
- ddim_step (epsilon, eta 0.5 with noise): x_prev and x0 from model_output, x_t and the noise: three reads, two
  writes; eager is the reference of kernels/noise_ops.py, compile its torch.compile.
"ours" calls the op itself (no argument checks, as eager and compile have none); "ours+checks" the public function
(which validates t: on a GPU that is one device-to-host sync per call). "% copy" relates ours' GB/s to a large device
copy measured in the same run. Targets: on a CPU, add_noise >= 2x eager on the large tensors; on a GPU >= 3x eager and
>= 85% of the copy bandwidth.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (allow_recompiles, bench_parser, copy_bandwidth_gbs, environment_line, gbs,  # noqa: E402
                    markdown_table, time_ms)

from layoutgen.kernels import noise_ops  # noqa: E402

try:
    import pytest
except ImportError:  # script mode needs no pytest
    pytest = None

SHAPES = {"latents": (64, 16, 32, 32), "autoencoder": (16, 3, 512, 512), "large batch": (1024, 16, 32, 32)}
QUICK_CPU = ("latents", "autoencoder")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NUM_STEPS = 1000
OPS = ("add_noise", "add_noise + noise draw", "ddim_step")


def schedule(device: torch.device) -> dict[str, torch.Tensor]:
    """A cosine schedule's tables (float64 alphas_cumprod, as the schedulers keep them)."""
    from layoutgen.models.components.scheduler import CosineScheduler

    s = CosineScheduler(num_steps=NUM_STEPS)
    return {"acp": s.alphas_cumprod.to(device), "sqrt_acp": s.sqrt_alphas_cumprod.to(device, torch.float32),
            "sqrt_1m_acp": s.sqrt_one_minus_alphas_cumprod.to(device, torch.float32)}


def diffusers_add_noise(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                        t: torch.Tensor) -> torch.Tensor:
    """diffusers' DDPMScheduler.add_noise, line for line (alphas_cumprod already in x0's dtype and device)."""
    sqrt_alpha_prod = alphas_cumprod[t] ** 0.5
    sqrt_alpha_prod = sqrt_alpha_prod.flatten()
    while len(sqrt_alpha_prod.shape) < len(x0.shape):
        sqrt_alpha_prod = sqrt_alpha_prod.unsqueeze(-1)
    sqrt_one_minus_alpha_prod = (1 - alphas_cumprod[t]) ** 0.5
    sqrt_one_minus_alpha_prod = sqrt_one_minus_alpha_prod.flatten()
    while len(sqrt_one_minus_alpha_prod.shape) < len(x0.shape):
        sqrt_one_minus_alpha_prod = sqrt_one_minus_alpha_prod.unsqueeze(-1)
    return sqrt_alpha_prod * x0 + sqrt_one_minus_alpha_prod * noise


def diffusers_add_noise_drawn(alphas_cumprod: torch.Tensor, x0: torch.Tensor, t: torch.Tensor):
    noise = torch.randn_like(x0)
    return diffusers_add_noise(alphas_cumprod, x0, noise, t), noise


def analytic_bytes(op: str, numel: int, dtype: torch.dtype) -> int:
    size = numel * torch.tensor([], dtype=dtype).element_size()
    return {"add_noise": 3, "add_noise + noise draw": 3, "ddim_step": 5}[op] * size


def make_fns(op: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, tables) -> dict:
    """provider -> zero-argument callable, on fixed random inputs."""
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(shape, generator=g, device=device, dtype=dtype)
    noise = torch.randn(shape, generator=g, device=device, dtype=dtype)
    t = torch.randint(0, NUM_STEPS, (shape[0],), generator=g, device=device)
    acp_data = tables["acp"].to(dtype)
    a, b = tables["sqrt_acp"], tables["sqrt_1m_acp"]
    ops = torch.ops.layoutgen
    if op == "add_noise":
        compiled = torch.compile(diffusers_add_noise, dynamic=False)
        return {"eager": lambda: diffusers_add_noise(acp_data, x0, noise, t),
                "compile": lambda: compiled(acp_data, x0, noise, t),
                "ours": lambda: ops.add_noise(x0, noise, t, a, b),
                "ours+checks": lambda: noise_ops.add_noise(x0, noise, t, a, b)}
    if op == "add_noise + noise draw":
        compiled = torch.compile(diffusers_add_noise_drawn, dynamic=False)
        return {"eager": lambda: diffusers_add_noise_drawn(acp_data, x0, t),
                "compile": lambda: compiled(acp_data, x0, t),
                "ours": lambda: ops.add_noise_philox(x0, t, a, b, 1234, 0),
                "ours+checks": lambda: noise_ops.add_noise_philox(x0, t, a, b, 1234, 0)}
    prev_t = (t - NUM_STEPS // 50).clamp(min=-1)
    acp = tables["acp"]
    args = (noise, x0, t, prev_t, acp, 0.5, "epsilon", False, 1.0, noise, 1.0)
    compiled = torch.compile(noise_ops.ddim_step_ref, dynamic=False)
    return {"eager": lambda: noise_ops.ddim_step_ref(*args), "compile": lambda: compiled(*args),
            "ours": lambda: ops.ddim_step(*args), "ours+checks": lambda: noise_ops.ddim_step(*args)}



def main(argv=None) -> None:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 (and bf16 on a GPU)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    allow_recompiles(256)  # one graph per op and shape
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    status = noise_ops.noise_ops_status()
    if not status.compiled or device.type not in status.devices:
        raise SystemExit(f"bench_noise_ops: no compiled noise ops on {device}: {status.reason}")
    dtypes = [DTYPES[args.dtype]] if args.dtype else ([torch.float32, torch.bfloat16] if on_gpu else [torch.float32])
    names = list(SHAPES) if (on_gpu or not args.quick) else list(QUICK_CPU)
    ops = OPS if not args.quick or on_gpu else ("add_noise", "add_noise + noise draw")
    repeats = args.repeats or (10 if args.quick else 30) if on_gpu else (args.repeats or (5 if args.quick else 10))
    tables = schedule(device)
    copy = copy_bandwidth_gbs(device)
    rows = []
    for dtype in dtypes:
        for op in ops:
            for name in names:
                shape = SHAPES[name]
                fns = make_fns(op, shape, device, dtype, tables)
                times = {p: time_ms(fn, device, warmup=3, repeats=repeats) for p, fn in fns.items()}
                nbytes = analytic_bytes(op, torch.Size(shape).numel(), dtype)
                ours = times["ours"]
                rows.append({"op": op, "shape": f"{name} {'x'.join(map(str, shape))}", "dtype": str(dtype)[6:],
                             "eager ms": times["eager"], "compile ms": times["compile"], "ours ms": ours,
                             "ours+checks ms": times["ours+checks"], "ours GB/s": gbs(nbytes, ours),
                             "% copy": 100 * gbs(nbytes, ours) / copy, "vs eager": times["eager"] / ours,
                             "vs compile": times["compile"] / ours})
                del fns
    columns = ["op", "shape", "dtype", "eager ms", "compile ms", "ours ms", "ours+checks ms", "ours GB/s", "% copy",
               "vs eager", "vs compile"]
    lines = [f"# noise ops ({environment_line(device)})", "",
             f"noise-op extension: {status.describe()}; copy bandwidth (read + write): {copy:.1f} GB/s; median of "
             f"{repeats} runs", "", markdown_table(rows, columns), "",
             "vs eager / vs compile: speed-up of ours over that provider (higher is faster). GB/s from analytic bytes "
             "(add_noise: 2 reads + 1 write; with the noise draw: 1 read + 2 writes; ddim_step: 3 reads + 2 writes)."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# pytest-benchmark suite: pytest benchmarks/bench_noise_ops.py [--benchmark-only]
# ---------------------------------------------------------------------------------------------------------------------

if pytest is not None:
    _DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _SUITE_SHAPES = ["latents", "autoencoder"]

    @pytest.mark.parametrize("provider", ["eager", "compile", "ours"])
    @pytest.mark.parametrize("op", OPS)
    @pytest.mark.parametrize("name", _SUITE_SHAPES)
    def test_noise_ops(benchmark, name, op, provider):
        allow_recompiles(256)  # one graph per op and shape
        if not noise_ops.noise_ops_status().compiled:
            pytest.skip("no compiled noise ops")
        fn = make_fns(op, SHAPES[name], _DEVICE, torch.float32, schedule(_DEVICE))[provider]

        def synced():
            fn()
            if _DEVICE.type == "cuda":
                torch.cuda.synchronize()

        synced()
        benchmark.extra_info["GB"] = analytic_bytes(op, torch.Size(SHAPES[name]).numel(), torch.float32) / 1e9
        benchmark(synced)


if __name__ == "__main__":
    main()
