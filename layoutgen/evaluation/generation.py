"""Metrics for generated layouts (latent diffusion samples) and ControlNet samples. All return Python floats.

Image conventions (every function that takes ``images``):

- float tensors/arrays are the models' convention, channels-first [N, 3, H, W] in [-1, 1] (mapped to 0..255 by
  ``(x + 1) * 127.5`` and clipped to [0, 255], as they are when saved as images);
- integer (e.g. uint8) tensors/arrays are channels-last [N, H, W, 3] in 0..255 (as ``SyntheticLayout.rgb``).

If the preferred channel axis is not 3 the other one is tried. Segmentation is by nearest ``PALETTE`` colour (the
same rule as :func:`layoutgen.models.datasets.synthetic.rgb_to_segmentation`). Functions that only need classes
(rectangularity, control adherence) also take an integer class map [N, H, W] directly.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from layoutgen.evaluation.components import connected_components, region_stats
from layoutgen.metrics import accuracy
from layoutgen.models.datasets.synthetic import BACKGROUND, NUM_CLASSES, PALETTE, ROOM_CLASSES

__all__ = [
    "palette_fidelity",
    "room_rectangularity",
    "class_conditional_accuracy",
    "memorisation_distances",
    "control_adherence_iou",
    "evaluate_generation",
]

_PIXEL_CHUNK = 1 << 18


# ----------------------------------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------------------------------


def _as_tensor(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)


def _rgb255(images, name: str) -> torch.Tensor:
    """Images (see the module docstring) -> float32 [N, H, W, 3] in [0, 255]."""
    x = _as_tensor(images)
    if x.dim() != 4:
        raise ValueError(f"{name}: expected images [N, 3, H, W] (float in [-1, 1]) or [N, H, W, 3] (uint8), "
                         f"got shape {tuple(x.shape)}")
    floating = x.is_floating_point()
    if floating:
        channels_last = x.shape[1] != 3 and x.shape[-1] == 3
    else:
        channels_last = x.shape[-1] == 3 or x.shape[1] != 3
    if not channels_last:
        if x.shape[1] != 3:
            raise ValueError(f"{name}: images need 3 colour channels, got shape {tuple(x.shape)}")
        x = x.permute(0, 2, 3, 1)
    elif x.shape[-1] != 3:
        raise ValueError(f"{name}: images need 3 colour channels, got shape {tuple(x.shape)}")
    x = x.to(torch.float32)
    if floating:
        x = ((x + 1.0) * 127.5).clamp_(0.0, 255.0)
    return x


def _nearest_palette(rgb255: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, H, W, 3] in 0..255 -> (class index int64 [N, H, W], L2 distance to that palette colour float32 [N, H, W]).

    Squared distance ||x - p||^2 = ||x||^2 - 2 x.p + ||p||^2, in chunks of pixels to bound memory.
    """
    palette = torch.as_tensor(PALETTE, dtype=torch.float32, device=rgb255.device)
    pn = (palette * palette).sum(1)
    flat = rgb255.reshape(-1, 3)
    index = torch.empty(flat.shape[0], dtype=torch.int64, device=flat.device)
    dist = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    for s in range(0, flat.shape[0], _PIXEL_CHUNK):
        block = flat[s : s + _PIXEL_CHUNK]
        d2 = (block * block).sum(1, keepdim=True) - 2.0 * block @ palette.T + pn[None, :]
        best, arg = d2.min(dim=1)
        index[s : s + _PIXEL_CHUNK] = arg
        dist[s : s + _PIXEL_CHUNK] = best.clamp_min_(0.0).sqrt_()
    shape = rgb255.shape[:-1]
    return index.reshape(shape), dist.reshape(shape)


def _segmentation(images_or_segmentations, name: str) -> torch.Tensor:
    """Integer class map [N, H, W] passes through (checked against the palette size); images are segmented."""
    x = _as_tensor(images_or_segmentations)
    if x.dim() == 3 and not x.is_floating_point() and x.dtype != torch.bool:
        seg = x.to(torch.int64)
        if seg.numel() and (int(seg.min()) < 0 or int(seg.max()) >= NUM_CLASSES):
            raise ValueError(f"{name}: class indices must lie in [0, {NUM_CLASSES - 1}], "
                             f"got [{int(seg.min())}, {int(seg.max())}]")
        return seg
    if x.dim() != 4:
        raise ValueError(f"{name}: expected images [N, 3, H, W] / [N, H, W, 3] or an integer class map [N, H, W], "
                         f"got shape {tuple(x.shape)}")
    return _nearest_palette(_rgb255(x, name))[0]


# ----------------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------------


def palette_fidelity(images, tolerance: float = 24.0) -> float:
    """Share of pixels within ``tolerance`` of some palette colour.

    Definition: mean over all N*H*W pixels of ``[min_k ||rgb - PALETTE[k]||_2 <= tolerance]``, with rgb in 0..255.

    Args:
        images: float [N, 3, H, W] in [-1, 1] or uint8 [N, H, W, 3] (see the module docstring).
        tolerance: L2 distance in 0..255 RGB units (the palette's colours are > 85 apart).

    Returns:
        a float in [0, 1] (nan for an empty batch).
    """
    dist = _nearest_palette(_rgb255(images, "palette_fidelity"))[1]
    return _fidelity_from_distance(dist, tolerance)


def _fidelity_from_distance(dist: torch.Tensor, tolerance: float) -> float:
    if dist.numel() == 0:
        return math.nan
    return (dist <= float(tolerance)).double().mean().item()


def room_rectangularity(images_or_segmentations, min_area: int = 16) -> float:
    """Mean rectangularity of the room regions: how much each room fills its bounding box.

    Definition: segment by nearest palette colour; take every 4-connected region of one room class (``ROOM_CLASSES``:
    not background, not wall) with at least ``min_area`` pixels; its rectangularity is ``area / bbox_area`` (bounding
    box in pixels, inclusive). The result is the plain (unweighted) mean over all such regions of all images, so a
    small crooked room counts as much as a large straight one. Rectangles score exactly 1; an L of three unit squares
    in a 2x2 box scores 0.75.

    Args:
        images_or_segmentations: float [N, 3, H, W] in [-1, 1], uint8 [N, H, W, 3], or an integer class map [N, H, W].
        min_area: smaller regions (specks of noise, door gaps) are ignored.

    Returns:
        a float in (0, 1]; nan when no region reaches ``min_area``.
    """
    seg = _segmentation(images_or_segmentations, "room_rectangularity")
    return _rectangularity_from_segmentation(seg, min_area)


def _rectangularity_from_segmentation(seg: torch.Tensor, min_area: int) -> float:
    rooms = torch.as_tensor(ROOM_CLASSES, dtype=seg.dtype, device=seg.device)
    labels, count = connected_components(seg, mask=torch.isin(seg, rooms))
    if count == 0:
        return math.nan
    stats = region_stats(seg, labels, count)
    keep = stats.area >= int(min_area)
    if not bool(keep.any()):
        return math.nan
    return (stats.area[keep].double() / stats.bbox_area[keep].double()).mean().item()


def class_conditional_accuracy(
    classifier: Callable[[torch.Tensor], torch.Tensor], images, labels, batch_size: int | None = 64
) -> float:
    """Accuracy of a classifier on generated images against the labels they were generated for.

    Definition: mean over samples of ``[argmax classifier(images)[i] == labels[i]]``.

    Args:
        classifier: maps a batch of images to logits [B, K], e.g. ``lambda x: autoencoder(x)["classification"]``.
            Called under ``torch.no_grad()``; the model's train/eval mode is left to the caller.
        images: the generated images as the classifier takes them (float [N, 3, H, W] in [-1, 1] for the
            autoencoder); a numpy array is converted to a tensor.
        labels: int [N], the class each image was generated for.
        batch_size: images per classifier call (None: all at once).

    Returns:
        a float in [0, 1].
    """
    x = _as_tensor(images)
    y = _as_tensor(labels).to(torch.int64).reshape(-1)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"class_conditional_accuracy: {x.shape[0]} images but {y.shape[0]} labels")
    if x.shape[0] == 0:
        return math.nan
    step = x.shape[0] if not batch_size else int(batch_size)
    with torch.no_grad():
        logits = torch.cat([torch.as_tensor(classifier(x[s : s + step])) for s in range(0, x.shape[0], step)])
    if logits.dim() != 2 or logits.shape[0] != y.shape[0]:
        raise ValueError(f"class_conditional_accuracy: the classifier returned {tuple(logits.shape)}; "
                         f"expected logits [{y.shape[0]}, K]")
    return accuracy(logits, y.to(logits.device))


def _nearest(query: torch.Tensor, reference: torch.Tensor, batch: int, exclude_self: bool):
    """Per query row: (distance, index) of its nearest reference row, in chunks of ``batch`` x ``batch`` distances."""
    dist = torch.empty(query.shape[0], dtype=torch.float64, device=query.device)
    index = torch.empty(query.shape[0], dtype=torch.int64, device=query.device)
    for qs in range(0, query.shape[0], batch):
        q = query[qs : qs + batch]
        best = torch.full((q.shape[0],), math.inf, dtype=torch.float64, device=query.device)
        best_i = torch.zeros(q.shape[0], dtype=torch.int64, device=query.device)
        for rs in range(0, reference.shape[0], batch):
            d = torch.cdist(q, reference[rs : rs + batch], compute_mode="donot_use_mm_for_euclid_dist")
            if exclude_self:  # leave-one-out: a row is not its own neighbour
                rows = torch.arange(q.shape[0], device=query.device)
                cols = rows + qs - rs
                ok = (cols >= 0) & (cols < d.shape[1])
                d[rows[ok], cols[ok]] = math.inf
            m, i = d.min(dim=1)
            better = m < best
            best = torch.where(better, m, best)
            best_i = torch.where(better, i + rs, best_i)
        dist[qs : qs + batch] = best
        index[qs : qs + batch] = best_i
    return dist, index


def memorisation_distances(generated_latents, training_latents, batch: int = 1024) -> dict:
    """Nearest-neighbour distances of generated latents to the training latents: a memorisation check.

    Definition: latents are flattened to vectors (float64). For each generated ``g_i``,
    ``d_i = min_j ||g_i - t_j||_2`` over the training latents ``t_j``. The reference scale is the leave-one-out
    nearest-neighbour distance inside the training set, ``r_j = min_{k != j} ||t_j - t_k||_2``. The ratio
    ``mean(d) / mean(r)`` is ~1 (or above) for fresh samples from the training distribution and << 1 when samples
    copy training latents (0 for exact copies).

    Args:
        generated_latents: [N, ...] (e.g. [N, C, h, w]).
        training_latents: [M, ...] with the same per-sample shape; M >= 2.
        batch: rows per chunk of ``torch.cdist`` (memory is O(batch^2)).

    Returns:
        dict with ``nearest_distance`` (float64 [N]), ``nearest_index`` (int64 [N], into the training latents),
        ``training_nearest_distance`` (float64 [M], leave-one-out), and floats ``mean_nearest_distance``,
        ``mean_training_nearest_distance`` and ``ratio`` (inf when the training distances are all 0 and the
        generated are not, nan when both are 0).
    """
    g = _as_tensor(generated_latents)
    t = _as_tensor(training_latents).to(g.device)
    if g.dim() < 1 or t.dim() < 1 or g.shape[1:] != t.shape[1:]:
        raise ValueError(f"memorisation_distances: generated latents {tuple(g.shape)} and training latents "
                         f"{tuple(t.shape)} must be [N, ...] and [M, ...] with the same per-sample shape")
    if t.shape[0] < 2:
        raise ValueError(f"memorisation_distances: need at least 2 training latents, got {t.shape[0]}")
    if g.shape[0] == 0:
        raise ValueError("memorisation_distances: no generated latents")
    batch = max(1, int(batch))
    g = g.reshape(g.shape[0], -1).to(torch.float64)
    t = t.reshape(t.shape[0], -1).to(torch.float64)
    d, idx = _nearest(g, t, batch, exclude_self=False)
    r, _ = _nearest(t, t, batch, exclude_self=True)
    mean_d, mean_r = d.mean().item(), r.mean().item()
    if mean_r > 0:
        ratio = mean_d / mean_r
    else:
        ratio = math.nan if mean_d == 0 else math.inf
    return {
        "nearest_distance": d,
        "nearest_index": idx,
        "training_nearest_distance": r,
        "mean_nearest_distance": mean_d,
        "mean_training_nearest_distance": mean_r,
        "ratio": ratio,
    }


def _outline_mask(outlines, shape: tuple[int, int, int]) -> torch.Tensor:
    """Outline [N, 1, H, W] or [N, H, W] with values {0, 1} or {0, 255} -> bool [N, H, W] (value > 0.5 is inside)."""
    o = _as_tensor(outlines)
    if o.dim() == 4:
        if o.shape[1] != 1:
            raise ValueError(f"control_adherence_iou: outlines must be [N, 1, H, W] or [N, H, W], "
                             f"got {tuple(o.shape)}")
        o = o[:, 0]
    if o.dim() != 3 or tuple(o.shape) != tuple(shape):
        raise ValueError(f"control_adherence_iou: outlines {tuple(_as_tensor(outlines).shape)} do not match the "
                         f"images: expected [N, 1, H, W] or [N, H, W] with N, H, W = {tuple(shape)}")
    return o.to(torch.float32) > 0.5


def control_adherence_iou(images, outlines) -> float:
    """Adherence of ControlNet samples to their control: IoU of the generated footprint with the given outline.

    Definition: the footprint is every pixel whose nearest palette colour is not ``BACKGROUND`` (rooms and walls);
    per sample ``IoU = |footprint & outline| / |footprint | outline|`` (1 when both are empty); the result is the mean
    over samples.

    Args:
        images: float [N, 3, H, W] in [-1, 1], uint8 [N, H, W, 3], or an integer class map [N, H, W].
        outlines: [N, 1, H, W] or [N, H, W]; values {0, 1} (the dataset's ``control``) or {0, 255}
            (``SyntheticLayout.outline``); a value > 0.5 is inside.

    Returns:
        a float in [0, 1] (nan for an empty batch).
    """
    seg = _segmentation(images, "control_adherence_iou")
    return _iou_from_segmentation(seg, outlines)


def _iou_from_segmentation(seg: torch.Tensor, outlines) -> float:
    outline = _outline_mask(outlines, tuple(seg.shape)).to(seg.device)
    if seg.shape[0] == 0:
        return math.nan
    footprint = seg != BACKGROUND
    inter = (footprint & outline).flatten(1).sum(1).double()
    union = (footprint | outline).flatten(1).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return iou.mean().item()


def evaluate_generation(
    images,
    labels=None,
    classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
    outlines=None,
    generated_latents=None,
    training_latents=None,
    tolerance: float = 24.0,
    min_area: int = 16,
) -> dict[str, float]:
    """Every generation metric whose inputs are given, as a flat dict of floats.

    Always (from ``images``, float [N, 3, H, W] in [-1, 1] or uint8 [N, H, W, 3]): ``palette_fidelity`` and
    ``room_rectangularity``. With ``labels`` and ``classifier``: ``class_conditional_accuracy``. With ``outlines``:
    ``control_adherence_iou``. With ``generated_latents`` and ``training_latents``: ``memorisation_mean_distance``,
    ``memorisation_training_distance`` and ``memorisation_ratio``. Giving only one of a pair is an error.
    The palette segmentation is computed once and shared.
    """
    if (labels is None) != (classifier is None):
        raise ValueError("evaluate_generation: class-conditional accuracy needs both labels and classifier")
    if (generated_latents is None) != (training_latents is None):
        raise ValueError("evaluate_generation: the memorisation check needs both generated_latents and "
                         "training_latents")
    rgb = _rgb255(images, "evaluate_generation")
    seg, dist = _nearest_palette(rgb)
    out = {
        "palette_fidelity": _fidelity_from_distance(dist, tolerance),
        "room_rectangularity": _rectangularity_from_segmentation(seg, min_area),
    }
    if classifier is not None:
        out["class_conditional_accuracy"] = class_conditional_accuracy(classifier, images, labels)
    if outlines is not None:
        out["control_adherence_iou"] = _iou_from_segmentation(seg, outlines)
    if generated_latents is not None:
        mem = memorisation_distances(generated_latents, training_latents)
        out["memorisation_mean_distance"] = mem["mean_nearest_distance"]
        out["memorisation_training_distance"] = mem["mean_training_nearest_distance"]
        out["memorisation_ratio"] = mem["ratio"]
    return out
