"""Training helpers shared by the Trainer and the experiments: device and AMP choice, the LR schedule, the train/val
split, batches to the device, metrics.csv, and the autoencoder's validation metrics (`evaluate`, built on sums
that add up over batches and DDP ranks).

Autoencoder experiments train through `layoutgen.training.run.run_experiment("autoencoder", ...)` (the Trainer).
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from layoutgen.config import Config, option
from layoutgen.models.autoencoder import Autoencoder
from layoutgen.utils.atomic import atomic_write_text

CHECKPOINT_NAME = "autoencoder.safetensors"


@dataclass
class TrainingConfig(Config):
    """The options every training run has (TrainerConfig in trainer.py adds the trainer's own)."""
    section = "training"

    epochs: int = option(10, min=1)
    max_steps: int | None = option(None, min=1, doc="stop after this many optimizer steps")
    batch_size: int = option(16, min=1)
    lr: float = option(2e-3, min=0.0)
    weight_decay: float = option(0.0, min=0.0)
    warmup_steps: int = option(20, min=0)
    grad_clip: float | None = option(1.0, min=0.0, doc="max gradient norm; null disables clipping")
    amp: str = option("none", choices=("none", "bf16", "fp16"), doc="fp16 needs CUDA (it uses a GradScaler)")
    channels_last: bool = option(False)
    seed: int = option(0, min=0)
    num_workers: int = option(0, min=0)
    device: str = option("auto", doc="auto (CUDA when present), cpu, cuda, cuda:N")
    log_every: int = option(10, min=1)


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


HEAD_TARGETS = {"RGBHead": "rgb", "SegmentationHead": "segmentation", "ClassificationHead": "label"}


def head_kinds(model: Any) -> dict[str, str] | None:
    """{head name: head type} of a model with decoder heads (an Autoencoder), else None."""
    decoder = getattr(getattr(model, "cfg", None), "decoder", None)
    return None if decoder is None else {h["name"]: h["type"] for h in decoder.heads}


def metric_sizes(model: Any) -> dict[str, int]:
    """{head name: length of its `metric_sums` vector}, from the model's config (so known without a batch)."""
    return {h["name"]: 2 + 2 * int(h["num_classes"]) if h["type"] == "SegmentationHead" else 2
            for h in model.cfg.decoder.heads}


def metric_sums(heads: Mapping[str, str], outputs: Mapping[str, torch.Tensor],
                batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """One batch's float64 sums behind the metrics of `evaluate`, per head (added up over batches and ranks).

    Sums, not per-batch metrics, so that any split of the data (batches, DDP ranks) gives the metrics of the whole:
    rgb: [squared error, values]; segmentation: [correct, pixels, intersection per class..., union per class...];
    classification: [correct, samples].
    """
    sums: dict[str, torch.Tensor] = {}
    for name, kind in heads.items():
        target = batch.get(HEAD_TARGETS[kind])
        if target is None:
            continue
        pred = outputs[name].detach()
        if kind == "RGBHead":
            error = ((pred.double().clamp(-1.0, 1.0) - target.double()) ** 2).sum()   # clamped as metrics.psnr
            sums[name] = torch.stack([error, error.new_tensor(float(target.numel()))])
        elif kind == "SegmentationHead":
            num_classes = pred.shape[1]
            predicted, target = pred.argmax(dim=1).reshape(-1), target.reshape(-1).to(pred.device)
            hit = predicted == target
            correct = hit.sum().double()
            # per class k: |pred == k|, |target == k| and |both|; targets outside 0..K-1 only count as misses
            in_range = (target >= 0) & (target < num_classes)
            predicted_count = torch.bincount(predicted, minlength=num_classes).double()
            target_count = torch.bincount(target[in_range], minlength=num_classes)[:num_classes].double()
            intersection = torch.bincount(predicted[hit], minlength=num_classes).double()
            union = predicted_count + target_count - intersection
            sums[name] = torch.cat([torch.stack([correct, correct.new_tensor(float(target.numel()))]),
                                    intersection, union])
        else:
            correct = (pred.argmax(dim=1) == target.to(pred.device)).sum().double()
            sums[name] = torch.stack([correct, correct.new_tensor(float(target.numel()))])
    return sums


def add_sums(total: dict[str, torch.Tensor], sums: Mapping[str, torch.Tensor]) -> None:
    for name, value in sums.items():
        total[name] = total[name] + value if name in total else value.clone()


def metrics_from_sums(heads: Mapping[str, str], sums: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The metrics (rgb PSNR, segmentation accuracy and mIoU, class accuracy) of the summed `metric_sums`."""
    results: dict[str, float] = {}
    for name, kind in heads.items():
        if name not in sums:
            continue
        values = sums[name].double().cpu()
        if kind == "RGBHead":
            mse = (values[0] / values[1]).item() if values[1] > 0 else math.nan
            results[f"{name}_psnr"] = math.inf if mse == 0 else 10.0 * math.log10(2.0 ** 2 / mse)  # range [-1, 1]
        elif kind == "SegmentationHead":
            results[f"{name}_pixel_accuracy"] = (values[0] / values[1]).item() if values[1] > 0 else math.nan
            k = (len(values) - 2) // 2
            intersection, union = values[2:2 + k], values[2 + k:]
            present = union > 0   # classes in the prediction or the target, as metrics.mean_iou
            results[f"{name}_mean_iou"] = ((intersection[present] / union[present]).mean().item()
                                           if present.any() else math.nan)
        else:
            results[f"{name}_accuracy"] = (values[0] / values[1]).item() if values[1] > 0 else math.nan
    return results


@torch.no_grad()
def evaluate(model: Autoencoder, loader: DataLoader, device: torch.device, amp: str = "none",
             channels_last: bool = False) -> dict[str, float]:
    """Validation metrics of every head the model has: rgb PSNR, segmentation accuracy and mIoU, class accuracy."""
    was_training = model.training
    model.eval()
    heads = head_kinds(model)
    total: dict[str, torch.Tensor] = {}
    for batch in loader:
        batch = to_device(batch, device, channels_last)
        with autocast_context(amp, device):
            out = model(batch["rgb"])
        add_sums(total, metric_sums(heads, {k: v.float() for k, v in out.items()}, batch))
    model.train(was_training)
    return metrics_from_sums(heads, total)


def write_history(path: str, history: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())
