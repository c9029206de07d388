"""Image grids for a person to look at: inputs beside what each head made of them."""
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


def save_reconstruction_grid(path: str, inputs: torch.Tensor, outputs: Mapping[str, torch.Tensor],
                             heads: Sequence[Mapping[str, Any]], max_rows: int = 8, pad: int = 2) -> None:
    """One row per sample: the input, then every RGB head's output and every segmentation head's colour map."""
    columns = []
    for head in heads:
        if head["type"] == "RGBHead" and outputs[head["name"]].shape[1] == 3:
            columns.append(("rgb", head["name"]))
        elif head["type"] == "SegmentationHead":
            columns.append(("seg", head["name"]))
    rows = []
    for i in range(min(max_rows, inputs.shape[0])):
        tiles = [to_uint8_image(inputs[i])]
        for kind, name in columns:
            tiles.append(to_uint8_image(outputs[name][i]) if kind == "rgb" else colorize(outputs[name][i]))
        rows.append(tiles)
    h, w = rows[0][0].shape[:2]
    grid = np.full((len(rows) * (h + pad) + pad, len(rows[0]) * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y:y + h, x:x + w] = tile
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
