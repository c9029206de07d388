"""Trains the autoencoder on the built-in synthetic layouts, then evaluates and saves it.

The loop: AdamW, linear warmup then cosine decay, gradient clipping, optional AMP (bf16, or fp16 with a GradScaler
on CUDA) and channels_last. A non-finite loss skips its step instead of corrupting the weights. Everything written
to the output folder (checkpoint, metrics, config, image grid) is written atomically.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from layoutgen import metrics
from layoutgen.models.autoencoder import Autoencoder
from layoutgen.models.datasets.synthetic import SyntheticLayoutDataset
from layoutgen.models.losses.base_loss import build_loss
from layoutgen.training.experiment import AutoencoderExperiment
from layoutgen.training.images import save_reconstruction_grid
from layoutgen.utils.atomic import atomic_write_text

CHECKPOINT_NAME = "autoencoder.safetensors"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"training.device: {name!r} was asked for but CUDA is not available")
    return device


def autocast_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("training.amp: fp16 needs a CUDA device; use bf16 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at total_steps (Loshchilov & Hutter, 2017)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A deterministic shuffle of range(n) cut into (train, validation); n >= 2 keeps one item in train."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if n >= 2:
        n_val = min(n_val, n - 1)  # keep at least one training item (e.g. n=3, val_fraction=0.9)
    return order[n_val:], order[:n_val]


def to_device(batch: Mapping[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if channels_last and value.dim() == 4:
                value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


@torch.no_grad()
def evaluate(model: Autoencoder, loader: DataLoader, device: torch.device, amp: str = "none",
             channels_last: bool = False) -> dict[str, float]:
    """Validation metrics of every head the model has: rgb PSNR, segmentation accuracy and mIoU, class accuracy."""
    was_training = model.training
    model.eval()
    outputs: dict[str, list[torch.Tensor]] = {}
    targets: dict[str, list[torch.Tensor]] = {}
    heads = {h["name"]: h["type"] for h in model.cfg.decoder.heads}
    for batch in loader:
        batch = to_device(batch, device, channels_last)
        with autocast_context(amp, device):
            out = model(batch["rgb"])
        for name, kind in heads.items():
            target_key = {"RGBHead": "rgb", "SegmentationHead": "segmentation", "ClassificationHead": "label"}[kind]
            if target_key in batch:
                outputs.setdefault(name, []).append(out[name].float().cpu())
                targets.setdefault(name, []).append(batch[target_key].cpu())
    model.train(was_training)
    results: dict[str, float] = {}
    for name, kind in heads.items():
        if name not in outputs:
            continue
        pred, target = torch.cat(outputs[name]), torch.cat(targets[name])
        if kind == "RGBHead":
            results[f"{name}_psnr"] = metrics.psnr(pred, target.float())
        elif kind == "SegmentationHead":
            results[f"{name}_pixel_accuracy"] = metrics.pixel_accuracy(pred, target)
            results[f"{name}_mean_iou"] = metrics.mean_iou(pred, target)
        else:
            results[f"{name}_accuracy"] = metrics.accuracy(pred, target)
    return results


def train_autoencoder(experiment: AutoencoderExperiment | Mapping[str, Any], out_dir: str,
                      progress: bool = True) -> dict[str, Any]:
    """Runs one experiment; writes checkpoint, metrics.csv, config.yaml and reconstructions.png to out_dir.

    Returns the final validation metrics plus "steps", "skipped_steps", "seconds" and "checkpoint".
    """
    exp = AutoencoderExperiment.from_dict(experiment)
    train_cfg, data_cfg = exp.training, exp.data
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "config.yaml"), exp.to_yaml())
    torch.manual_seed(train_cfg.seed)
    device = resolve_device(train_cfg.device)

    dataset = SyntheticLayoutDataset(data_cfg.num_samples, size=data_cfg.image_size, seed=data_cfg.seed,
                                     empty_prob=data_cfg.empty_prob)
    train_idx, val_idx = split_indices(len(dataset), data_cfg.val_fraction, data_cfg.seed)
    loader_args = dict(batch_size=train_cfg.batch_size, num_workers=train_cfg.num_workers,
                       pin_memory=device.type == "cuda")
    train_loader = DataLoader(Subset(dataset, train_idx), shuffle=True, drop_last=len(train_idx) > train_cfg.batch_size,
                              generator=torch.Generator().manual_seed(train_cfg.seed), **loader_args)
    val_loader = DataLoader(Subset(dataset, val_idx or train_idx[: train_cfg.batch_size]), **loader_args)

    model = Autoencoder.from_config(exp.autoencoder).to(device)
    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(exp.loss).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                                  fused=device.type == "cuda")
    total_steps = train_cfg.epochs * len(train_loader)
    if train_cfg.max_steps is not None:
        total_steps = min(total_steps, train_cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(train_cfg.warmup_steps, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=train_cfg.amp == "fp16")

    history: list[dict[str, Any]] = []
    step, skipped, samples = 0, 0, 0
    start = time.perf_counter()
    bar = tqdm(total=total_steps, desc="autoencoder", disable=not progress, dynamic_ncols=True)
    model.train()
    while step < total_steps:
        for batch in train_loader:
            if step >= total_steps:
                break
            batch = to_device(batch, device, train_cfg.channels_last)
            with autocast_context(train_cfg.amp, device):
                out = model(batch["rgb"])
            loss, logs = loss_fn(out, batch)
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                # A non-finite loss would poison the weights and the optimizer state: skip the step.
                skipped += 1
                step += 1
                bar.update(1)
                continue
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip or math.inf)
            if not scaler.is_enabled() and not torch.isfinite(grad_norm):
                # A finite loss can still give non-finite gradients; skip them too. (With fp16 the GradScaler
                # skips such steps itself and lowers its scale.)
                skipped += 1
                step += 1
                bar.update(1)
                continue
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            samples += batch["rgb"].shape[0]
            elapsed = time.perf_counter() - start
            if step % train_cfg.log_every == 0 or step == total_steps:
                row = {"step": step, "lr": scheduler.get_last_lr()[0], "samples_per_s": samples / elapsed,
                       **{k: float(v) for k, v in logs.items()}}
                history.append(row)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", sps=f"{row['samples_per_s']:.1f}")
            bar.update(1)
    bar.close()

    results: dict[str, Any] = evaluate(model, val_loader, device, train_cfg.amp, train_cfg.channels_last)
    checkpoint = os.path.join(out_dir, CHECKPOINT_NAME)
    model.save_checkpoint(checkpoint, metadata={"steps": str(step)})
    write_history(os.path.join(out_dir, "metrics.csv"), history)
    model.eval()
    preview = next(iter(val_loader))
    with torch.no_grad(), autocast_context(train_cfg.amp, device):
        out = model(to_device(preview, device, train_cfg.channels_last)["rgb"])
    save_reconstruction_grid(os.path.join(out_dir, "reconstructions.png"), preview["rgb"],
                             {k: v.float().cpu() for k, v in out.items()}, model.cfg.decoder.heads)
    results.update(steps=step, skipped_steps=skipped, seconds=time.perf_counter() - start, checkpoint=checkpoint)
    return results


def write_history(path: str, history: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())
