"""Connected-component labelling of class maps, in pure torch (no scipy), batched over images.

Two pixels belong to the same component when they are 4-neighbours (up, down, left, right), carry the same class and
are both selected by the mask. Components never cross image borders, nor the boundary between two images of a batch.

Algorithm (a vectorised union-find with min-label hooking and pointer jumping, as in Shiloach-Vishkin):
every selected pixel starts as its own root, labelled with its flat index ``i``; invariant ``parent[i] <= i`` and
``parent[i]`` lies in the component of ``i``. Each round (1) hooks, for every edge (a, b) whose roots differ, the
larger root to the smaller one (a ``scatter_reduce`` with ``amin``), then (2) jumps pointers (``parent =
parent[parent]``) until every pixel points at a root. Each round strictly lowers the sum of root labels, so it ends;
in practice it takes a handful of rounds (about log of the component diameter), not one per pixel as plain label
propagation would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["connected_components", "RegionStats", "region_stats"]


def _flat_edges(segmentation: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat pixel indices (a, b) of every 4-neighbour pair inside ``mask`` with equal class."""
    n, h, w = segmentation.shape
    index = torch.arange(n * h * w, dtype=torch.int64, device=segmentation.device).reshape(n, h, w)
    horizontal = (segmentation[:, :, 1:] == segmentation[:, :, :-1]) & mask[:, :, 1:] & mask[:, :, :-1]
    vertical = (segmentation[:, 1:, :] == segmentation[:, :-1, :]) & mask[:, 1:, :] & mask[:, :-1, :]
    a = torch.cat([index[:, :, :-1][horizontal], index[:, :-1, :][vertical]])
    b = torch.cat([index[:, :, 1:][horizontal], index[:, 1:, :][vertical]])
    return a, b


def connected_components(segmentation: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Label the 4-connected regions of equal class.

    Args:
        segmentation: integer class map [N, H, W] (or [H, W], treated as N = 1); a numpy array is accepted.
        mask: optional bool [N, H, W] (or [H, W]): only these pixels are labelled (e.g. the room classes). Default:
            every pixel.

    Returns:
        (labels, count): ``labels`` int64 with the shape of ``segmentation``; 0 outside the mask, ``1 .. count``
        for the components (numbered over the whole batch, in raster order of each component's first pixel).
    """
    seg = torch.as_tensor(segmentation)
    squeeze = seg.dim() == 2
    if squeeze:
        seg = seg[None]
    if seg.dim() != 3:
        raise ValueError(f"connected_components: expected a class map [N, H, W] or [H, W], got {tuple(seg.shape)}")
    if mask is None:
        mask_t = torch.ones(seg.shape, dtype=torch.bool, device=seg.device)
    else:
        mask_t = torch.as_tensor(mask, device=seg.device).to(torch.bool)
        if squeeze and mask_t.dim() == 2:
            mask_t = mask_t[None]
        if mask_t.shape != seg.shape:
            raise ValueError(f"connected_components: mask {tuple(mask_t.shape)} does not match the class map "
                             f"{tuple(seg.shape)}")

    total = seg.numel()
    parent = torch.arange(total, dtype=torch.int64, device=seg.device)
    a, b = _flat_edges(seg, mask_t)
    while a.numel():
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not bool(differ.any()):
            break
        a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]  # edges already joined never split again
        parent.scatter_reduce_(0, torch.cat([ra, rb]), torch.cat([rb, ra]), reduce="amin")
        while True:  # pointer jumping until every pixel points at a root
            jumped = parent[parent]
            if torch.equal(jumped, parent):
                break
            parent = jumped

    flat_mask = mask_t.reshape(-1)
    labels = torch.zeros(total, dtype=torch.int64, device=seg.device)
    roots = parent[flat_mask]
    count = 0
    if roots.numel():
        unique, inverse = torch.unique(roots, return_inverse=True)  # sorted root = first pixel in raster order
        labels[flat_mask] = inverse + 1
        count = int(unique.numel())
    labels = labels.reshape(seg.shape)
    return (labels[0] if squeeze else labels), count


@dataclass
class RegionStats:
    """Per-component statistics, each a tensor of length ``count`` (component ``k`` is label ``k + 1``).

    Attributes:
        image: int64 index of the image the component lies in.
        cls: int64 class of the component.
        area: int64 number of pixels.
        bbox_area: int64 area of the axis-aligned bounding box, (y_max - y_min + 1) * (x_max - x_min + 1).
    """

    image: torch.Tensor
    cls: torch.Tensor
    area: torch.Tensor
    bbox_area: torch.Tensor


def region_stats(segmentation: torch.Tensor, labels: torch.Tensor, count: int) -> RegionStats:
    """Image, class, area and bounding-box area of every component of ``connected_components`` ([N, H, W] inputs)."""
    seg = torch.as_tensor(segmentation)
    n, h, w = labels.shape
    device = labels.device
    selected = labels > 0
    ids = labels[selected] - 1
    grid_n, grid_y, grid_x = torch.meshgrid(
        torch.arange(n, device=device), torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    area = torch.bincount(ids, minlength=count)

    def reduce(values: torch.Tensor, how: str, init: int) -> torch.Tensor:
        out = torch.full((count,), init, dtype=torch.int64, device=device)
        return out.scatter_reduce_(0, ids, values[selected].to(torch.int64), reduce=how)

    big = max(h, w, n) + 1
    y0, y1 = reduce(grid_y, "amin", big), reduce(grid_y, "amax", -1)
    x0, x1 = reduce(grid_x, "amin", big), reduce(grid_x, "amax", -1)
    image = reduce(grid_n, "amin", big)
    cls = reduce(seg.to(device), "amin", 1 << 30)
    return RegionStats(image=image, cls=cls, area=area, bbox_area=(y1 - y0 + 1) * (x1 - x0 + 1))
