"""Model-level suites of `layoutgen bench`: one training step (forward, loss, backward, AdamW) of the seed's models.

- autoencoder: experiments/autoencoder_layout512.yaml (512x512 RGB, batch 16, base_channels 32, a 32x32x16 latent,
  its three heads and four losses; bf16 autocast and channels_last on a GPU, as the config trains);
- unet: the diffusion model of experiments/diffusion_layout512.yaml (UNet base_channels 64, depth 4, attention at
  the two lowest levels, 10 classes + null) on random 16x32x32 latents, batch 64, its own training loss (cosine
  schedule, the noise op, min-SNR weights);
- `--quick`: the same models scaled down (64x64 images or 16x8x8 latents, batch 2, base_channels 8).

Providers, measured side by side in one run from the same initial weights: "ours" (kernel backend auto: the
fused kernels where they run natively), on a GPU for the autoencoder "ours-1pass" (the same with GroupNorm's one-pass
chunked kernels), "reference" (backend "reference": eager PyTorch), "compile" (torch.compile
of the reference model) and, for the UNet, "diffusers" (UNet2DModel of matching size: same channels, blocks per
level, attention levels and head size, groups and class embedding, trained on the same epsilon objective).
Figures: median step time, samples/s, peak memory (see layoutgen.bench.timing for the method per device), and
the speed-up over the reference.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from layoutgen.bench.timing import CUDA_MEMORY_METHOD, peak_memory, time_interleaved

# Several providers share one process here, and the CPU allocator reuses what an earlier one freed, so a rise of the
# process's peak RSS cannot be put down to one provider (measured: 14 MiB for the first, 0 or less for the next).
CPU_MEMORY_NOTE = "n/a on a CPU: providers share one process, whose RSS cannot be split between them"

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
AUTOENCODER_CONFIG = "autoencoder_layout512.yaml"
DIFFUSION_CONFIG = "diffusion_layout512.yaml"
MODEL_SUITES = ("autoencoder", "unet")

QUICK_AUTOENCODER = ["autoencoder.encoder.base_channels=8", "autoencoder.decoder.base_channels=8",
                     "data.image_size=64", "training.batch_size=2"]
QUICK_UNET = ["diffusion.unet.base_channels=8", "diffusion.latent_size=[8,8]", "training.batch_size=2"]
# The bench draws random latents: no autoencoder to load, and a fixed latent scale (no measuring pass).
# The benchmark's UNet workload trains at batch 64, the top of the seed's 32..64 (the YAML trains at 32).
UNET_BATCH = 64
UNET_FIXED = ["diffusion.autoencoder_checkpoint=null", "diffusion.latent_scale=1.0"]


def experiment_path(name: str) -> str:
    path = EXPERIMENTS / name
    if not path.is_file():
        raise FileNotFoundError(f"layoutgen bench: {path} not found; the model suites read the seed's workloads "
                                f"from the source checkout's experiments/ folder")
    return str(path)


@dataclass
class Workload:
    """One model's training step, ready to be built for each provider."""
    name: str
    model: torch.nn.Module
    batch: dict
    batch_size: int
    amp: str                                   # "bf16" or "none"
    channels_last: bool
    loss: Callable[[torch.nn.Module, dict], torch.Tensor]
    description: str


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def autoencoder_workload(device: torch.device, quick: bool, amp: str | None = None) -> Workload:
    from layoutgen.models.autoencoder import Autoencoder
    from layoutgen.models.datasets.synthetic import SyntheticLayoutDataset
    from layoutgen.models.losses.base_loss import build_loss
    from layoutgen.training.autoencoder import to_device
    from layoutgen.training.experiment import load_any_experiment

    _, exp = load_any_experiment(experiment_path(AUTOENCODER_CONFIG), QUICK_AUTOENCODER if quick else [])
    on_gpu = device.type == "cuda"
    size, n = exp.data.image_size, exp.training.batch_size
    dataset = SyntheticLayoutDataset(n, size=size, seed=0)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(n)])
    channels_last = exp.training.channels_last and on_gpu
    batch = to_device(batch, device, channels_last)
    torch.manual_seed(0)
    model = Autoencoder.from_config(exp.autoencoder).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(exp.loss).to(device)
    amp = amp or (exp.training.amp if on_gpu else "none")

    def loss(m, b):
        with autocast(amp, device):
            out = m(b["rgb"])
        return loss_fn(out, b)[0]  # the losses run outside autocast, as in training

    enc = exp.autoencoder.encoder
    latent = size >> enc.downsampling_steps
    return Workload("autoencoder", model, batch, n, amp, channels_last, loss,
                    f"{size}x{size} RGB, batch {n}, base_channels {enc.base_channels}, "
                    f"{latent}x{latent}x{enc.latent_channels} latent")


def unet_experiment(quick: bool):
    from layoutgen.training.experiment import load_any_experiment

    return load_any_experiment(experiment_path(DIFFUSION_CONFIG), (QUICK_UNET if quick else []) + UNET_FIXED)[1]


def unet_workload(device: torch.device, quick: bool, amp: str | None = None) -> Workload:
    from layoutgen.models.diffusion import DiffusionModel

    exp = unet_experiment(quick)
    cfg = exp.diffusion
    on_gpu = device.type == "cuda"
    n = exp.training.batch_size if quick else UNET_BATCH
    h, w = cfg.latent_size
    g = torch.Generator().manual_seed(0)
    batch = {"latent": torch.randn(n, cfg.unet.in_channels, h, w, generator=g).to(device),
             "label": torch.randint(0, cfg.unet.num_classes, (n,), generator=g).to(device)}
    torch.manual_seed(0)
    model = DiffusionModel(cfg).to(device)
    amp = amp or (exp.training.amp if on_gpu else "none")
    generator = torch.Generator(device=device)

    def loss(m, b):
        generator.manual_seed(0)  # the same timesteps and noise every step
        with autocast(amp, device):
            return m.training_loss(b, generator)[0]

    u = cfg.unet
    return Workload("unet", model, batch, n, amp, False, loss,
                    f"{u.in_channels}x{h}x{w} latents, batch {n}, base_channels {u.base_channels}, depth {u.depth}")


def diffusers_unet(unet_cfg, latent_size) -> torch.nn.Module | None:
    """diffusers' UNet2DModel of the same size as our UNet (None when diffusers is not importable)."""
    try:
        from diffusers import UNet2DModel
    except Exception:  # noqa: BLE001 - ImportError, or a diffusers that fails to import against this torch
        return None
    channels = unet_cfg.level_channels()
    attention = set(unet_cfg.resolved_attention_levels())
    heads_dim = channels[max(attention)] // unet_cfg.num_heads if attention else 8
    down = tuple("AttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(unet_cfg.depth))
    up = tuple("AttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(range(unet_cfg.depth)))
    return UNet2DModel(sample_size=tuple(latent_size), in_channels=unet_cfg.in_channels,
                       out_channels=unet_cfg.out_channels or unet_cfg.in_channels, block_out_channels=tuple(channels),
                       layers_per_block=unet_cfg.num_res_blocks, down_block_types=down, up_block_types=up,
                       norm_num_groups=unet_cfg.norm_groups, attention_head_dim=heads_dim,
                       dropout=unet_cfg.dropout, num_class_embeds=unet_cfg.num_classes + 1)


def diffusers_loss(model: torch.nn.Module, device: torch.device, amp: str) -> Callable:
    """The epsilon objective for a diffusers UNet: our scheduler's add_noise (the same noise op), plain MSE."""
    scheduler = model.scheduler
    generator = torch.Generator(device=device)

    def loss(m, b):
        generator.manual_seed(0)
        z = b["latent"]
        t = torch.randint(0, scheduler.num_steps, (z.shape[0],), device=device, generator=generator)
        x_t, noise = scheduler.add_noise(z, t, generator=generator)
        with autocast(amp, device):
            prediction = m(x_t, t, class_labels=b["label"]).sample
        return ((prediction.float() - noise.float()) ** 2).mean()

    return loss


def kernel_choice(backend: str | None) -> contextlib.AbstractContextManager:
    """The kernel choice a training step runs under: a kernel backend name ("auto", "reference", ...), optionally with
    GroupNorm's chunked path after a "+" ("auto+one-pass"); None keeps the process's own choice."""
    from layoutgen.kernels.backend import use_kernel_choice

    name, _, chunked = (backend or "").partition("+")
    return use_kernel_choice(name or None, chunked or None)


def training_step(model: torch.nn.Module, loss: Callable, batch: dict, backend: str | None,
                  device: torch.device) -> Callable[[], None]:
    """A zero-argument training step: forward and loss, backward (both under kernel_choice(backend): the backward
    reads the choice too), AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    def step():
        with kernel_choice(backend):
            value = loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
        optimizer.step()

    return step


def provider_models(work: Workload, device: torch.device, quick: bool
                    ) -> dict[str, tuple[torch.nn.Module | None, Callable | None, str | None, str]]:
    """provider -> (model copy or None when not measured, loss, kernel backend, what runs or why not)."""
    from layoutgen.bench.ops import group_norm_silu_path

    ours = group_norm_silu_path(device)
    providers = {
        "ours": (copy.deepcopy(work.model), work.loss, "auto", f"layoutgen kernels: GroupNorm+SiLU {ours}"),
        "reference": (copy.deepcopy(work.model), work.loss, "reference", "eager PyTorch references"),
    }
    if device.type == "cuda" and work.name == "autoencoder":
        # The autoencoder's 512x512 GroupNorms are where the one-pass chunked kernels apply: the whole step with them.
        providers["ours-1pass"] = (copy.deepcopy(work.model), work.loss, "auto+one-pass",
                                   f"layoutgen kernels: GroupNorm+SiLU {ours}, one-pass chunked kernels")
    if quick and device.type == "cpu":
        # Measured here: inductor's C++ build of the tiny autoencoder's training step took about 150 s on this
        # 2-core machine, more than the whole --quick budget.
        providers["compile"] = (None, None, None, "not measured in --quick on a CPU: inductor's C++ build of a "
                                "training step takes minutes on 2 cores; see --compile-matrix")
    else:
        compiled = copy.deepcopy(work.model)
        # in place, so the training loss's call of the model (or of its UNet) goes through dynamo
        (compiled.unet if work.name == "unet" else compiled).compile()
        providers["compile"] = (compiled, work.loss, "reference", "torch.compile (inductor) of the reference model")
    if work.name == "unet":
        hf = diffusers_unet(work.model.cfg.unet, work.model.cfg.latent_size)
        if hf is None:
            providers["diffusers"] = (None, None, None, "not measured: diffusers is not importable")
        else:
            torch.manual_seed(0)
            providers["diffusers"] = (hf.to(device), diffusers_loss(work.model, device, work.amp), None,
                                      "diffusers UNet2DModel of matching size (eager)")
    return providers


def model_rows(name: str, device: torch.device, quick: bool, log=print) -> list[dict]:
    work = (autoencoder_workload if name == "autoencoder" else unet_workload)(device, quick)
    on_gpu = device.type == "cuda"
    warmup, repeats = (3, 10) if on_gpu else (1, 3)
    steps, rows = {}, []
    for provider, (model, loss, backend, path) in provider_models(work, device, quick).items():
        if model is None:  # not measured here; `path` says why
            rows.append({"suite": "models", "op": f"{name} training step", "shape": work.description,
                         "provider": provider, "path": path})
            continue
        model.train()
        steps[provider] = training_step(model, loss, work.batch, backend, device)
        log(f"bench: models/{name}/{provider} warm-up ...")
        # the warm-up calls (the first one compiles, for "compile") are where the peak memory is taken
        def warm_up():
            for _ in range(warmup):
                steps[provider]()
        if on_gpu:
            peak, _ = peak_memory(warm_up, device)
        else:
            warm_up()
            peak = None  # see CPU_MEMORY_NOTE
        rows.append({"suite": "models", "op": f"{name} training step", "shape": work.description, "mode": "train",
                     "dtype": "bf16 autocast" if work.amp == "bf16" else "fp32", "provider": provider, "path": path,
                     "peak MiB": None if peak is None else peak / 2 ** 20})
    log(f"bench: models/{name}: timing {list(steps)} round-robin ...")
    times = time_interleaved(steps, device, warmup=0, repeats=repeats, flush_l2=False)
    for row in rows:
        if row["provider"] in times:
            row["ms"] = ms = times[row["provider"]]
            row["samples/s"] = work.batch_size / (ms * 1e-3)
            row["memory method"] = CUDA_MEMORY_METHOD if on_gpu else CPU_MEMORY_NOTE
    for row in [r for r in rows if r["provider"] in times]:
        row["vs reference"] = times["reference"] / row["ms"]
        if "compile" in times:
            row["vs compile"] = times["compile"] / row["ms"]
    return rows


def run_model_suites(device: torch.device, quick: bool, suites=MODEL_SUITES, log=print) -> list[dict]:
    rows = []
    for name in suites:
        rows.extend(model_rows(name, device, quick, log))
    return rows
