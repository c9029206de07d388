"""Evaluation metrics for reconstructions and predictions (all return Python floats)."""
from __future__ import annotations

import math

import torch


def psnr(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over the whole batch; data_range 2 for images in [-1, 1]."""
    if prediction.shape != target.shape:
        raise ValueError(f"psnr: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    mse = torch.mean((prediction.double().clamp(-data_range, data_range) - target.double()) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def pixel_accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Share of pixels whose arg-max class equals the target. logits [N, K, H, W], target [N, H, W]."""
    return (logits.argmax(dim=1) == target).double().mean().item()


def mean_iou(logits: torch.Tensor, target: torch.Tensor, num_classes: int | None = None) -> float:
    """Mean intersection-over-union over the classes present in the prediction or the target."""
    num_classes = logits.shape[1] if num_classes is None else num_classes
    pred = logits.argmax(dim=1).reshape(-1)
    target = target.reshape(-1)
    ious = []
    for k in range(num_classes):
        p, t = pred == k, target == k
        union = (p | t).sum().item()
        if union:
            ious.append((p & t).sum().item() / union)
    return sum(ious) / len(ious) if ious else math.nan


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose arg-max class equals the label. logits [N, K], labels [N]."""
    return (logits.argmax(dim=1) == labels).double().mean().item()
