"""Evaluation metrics for reconstructions and predictions (all return Python floats)."""
from __future__ import annotations

import math

import torch


def psnr(prediction: torch.Tensor, target: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """Peak signal-to-noise ratio in dB over the whole batch, for images in `value_range`.

    Predictions are clipped to the value range first, as they are when saved as images.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"psnr: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    low, high = value_range
    data_range = high - low
    mse = torch.mean((prediction.double().clamp(low, high) - target.double()) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def _check_logits(name: str, logits: torch.Tensor, target: torch.Tensor) -> None:
    """logits [N, K, ...] and target [N, ...] must line up (else == would broadcast silently)."""
    if logits.dim() != target.dim() + 1 or logits.shape[:1] + logits.shape[2:] != target.shape:
        raise ValueError(f"{name}: logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match; "
                         f"expected logits [N, K, ...] and target [N, ...]")


def pixel_accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Share of pixels whose arg-max class equals the target. logits [N, K, H, W], target [N, H, W]."""
    _check_logits("pixel_accuracy", logits, target)
    return (logits.argmax(dim=1) == target).double().mean().item()


def mean_iou(logits: torch.Tensor, target: torch.Tensor, num_classes: int | None = None) -> float:
    """Mean intersection-over-union over the classes present in the prediction or the target."""
    _check_logits("mean_iou", logits, target)
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
    _check_logits("accuracy", logits, labels)
    return (logits.argmax(dim=1) == labels).double().mean().item()
