"""Image grids for a person to look at: inputs beside what each head made of them, samples beside their controls.

One layout everywhere (`column_grid`): named columns of images [N, 3, H, W] in [-1, 1], row i holding image i of
every column; the reconstruction grid, the trainer's previews and TensorBoard's preview images all go through it.
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from layoutgen.models.datasets.synthetic import PALETTE
from layoutgen.utils.atomic import atomic_write_bytes


def to_uint8_image(x: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> [H, W, 3] uint8."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def colorize(segmentation_logits: torch.Tensor) -> np.ndarray:
    """[K, H, W] logits -> [H, W, 3] uint8 in the layout palette (classes beyond the palette wrap around)."""
    classes = segmentation_logits.argmax(dim=0).cpu().numpy()
    return PALETTE[classes % len(PALETTE)]


def uint8_to_tensor(image: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] float in [-1, 1] (the inverse of to_uint8_image)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0


def mask_to_image(mask: torch.Tensor) -> torch.Tensor:
    """A control image [N, C, H, W] in [0, 1] -> [N, 3, H, W] in [-1, 1]: one channel shown grey, three as RGB,
    other counts as their argmax in the layout palette (a one-hot segmentation)."""
    mask = mask.detach().float().cpu()
    if mask.shape[1] == 1:
        return mask.clamp(0, 1).expand(-1, 3, -1, -1) * 2 - 1
    if mask.shape[1] == 3:
        return mask.clamp(0, 1) * 2 - 1
    return torch.stack([uint8_to_tensor(colorize(m)) for m in mask])


def reconstruction_columns(inputs: torch.Tensor, outputs: Mapping[str, torch.Tensor],
                           heads: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """{"input", then every 3-channel RGB head, then every segmentation head as its palette colour map}."""
    columns = {"input": inputs.detach().float().cpu()}
    for head in heads:
        name = head["name"]
        if head["type"] == "RGBHead" and outputs[name].shape[1] == 3:
            columns[name] = outputs[name].detach().float().cpu()
        elif head["type"] == "SegmentationHead":
            columns[name] = torch.stack([uint8_to_tensor(colorize(x)) for x in outputs[name].detach().float()])
    return columns


def column_grid(columns: Mapping[str, torch.Tensor], max_rows: int | None = None, pad: int = 2) -> np.ndarray:
    """Named columns of images [N, 3, H, W] in [-1, 1] -> one [H', W', 3] uint8 grid, row i = image i of each.

    Tiles smaller than the largest one are enlarged (nearest neighbour) to its size, so a latent preview sits
    beside a full-size control; a column shorter than the others leaves its cells white.
    """
    if not columns:
        raise ValueError("column_grid: no columns to draw")
    for name, images in columns.items():
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or not len(images):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"column_grid: column {name!r} must be images [N, 3, H, W] with N >= 1, got {shape}")
    h = max(int(x.shape[2]) for x in columns.values())
    w = max(int(x.shape[3]) for x in columns.values())
    rows = max(len(x) for x in columns.values())
    rows = min(rows, max_rows) if max_rows is not None else rows
    grid = np.full((rows * (h + pad) + pad, len(columns) * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for c, images in enumerate(columns.values()):
        for r in range(min(rows, len(images))):
            tile = images[r].detach().float().cpu()
            if tuple(tile.shape[1:]) != (h, w):
                tile = torch.nn.functional.interpolate(tile[None], size=(h, w), mode="nearest-exact")[0]
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y:y + h, x:x + w] = to_uint8_image(tile)
    return grid


def save_png(path: str, image: np.ndarray) -> None:
    """[H, W, 3] uint8 -> a PNG file, written atomically."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def save_reconstruction_grid(path: str, inputs: torch.Tensor, outputs: Mapping[str, torch.Tensor],
                             heads: Sequence[Mapping[str, Any]], max_rows: int = 8, pad: int = 2) -> None:
    """One row per sample: the input, then every RGB head's output and every segmentation head's colour map."""
    n = min(max_rows, inputs.shape[0])
    columns = reconstruction_columns(inputs[:n], {k: v[:n] for k, v in outputs.items()}, heads)
    save_png(path, column_grid(columns, pad=pad))


def class_rows_grid(images: torch.Tensor, per_row: int, row_names: Sequence[str] | None = None,
                    pad: int = 2) -> np.ndarray:
    """Images [N, 3, H, W] in [-1, 1], `per_row` to a row, each row headed by its name (e.g. one layout type per
    row of class-conditional samples) -> one [H', W', 3] uint8 grid."""
    from PIL import ImageDraw

    if images.dim() != 4 or images.shape[1] != 3 or not len(images):
        raise ValueError(f"class_rows_grid: expected images [N, 3, H, W] with N >= 1, got {tuple(images.shape)}")
    if per_row < 1:
        raise ValueError(f"class_rows_grid: per_row must be >= 1, got {per_row}")
    n, _, h, w = images.shape
    rows = -(-n // per_row)
    label_width = 0
    if row_names:
        draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_width = max(int(draw.textlength(name)) for name in row_names) + 2 * pad
    grid = np.full((rows * (h + pad) + pad, label_width + per_row * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        y, x = pad + (i // per_row) * (h + pad), label_width + pad + (i % per_row) * (w + pad)
        grid[y:y + h, x:x + w] = to_uint8_image(images[i])
    if row_names:
        canvas = Image.fromarray(grid)
        draw = ImageDraw.Draw(canvas)
        for r, name in enumerate(row_names[:rows]):
            draw.text((pad, pad + r * (h + pad) + h // 2 - 5), name, fill=(0, 0, 0))
        grid = np.asarray(canvas).copy()
    return grid
