"""Sampling a ControlNetDiffusion checkpoint from the command line: `layoutgen sample/eval --control SOURCE`.

SOURCE is a folder of control images (every .png/.jpg/.jpeg/.bmp/.tif/.tiff/.webp in name order), a manifest.csv
with a `control_path` column (paths relative to the manifest's folder, as `layoutgen data synth` writes them), or
the word `synthetic`: outlines of the built-in procedural layouts, rendered exactly as ControlNet training gets them
(`SyntheticLayoutDataset(...)[i]["control"]`, the building footprint in {0, 1}), without empty canvases.

Control images are read as training reads a manifest's `control_path` (mode L values / 255, or RGB / 255 for a
three-channel ControlNet) and must already have the size the ControlNet takes: `downsampling_factor` x the latent
size. One sample is drawn per control image, at most `--num`.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from layoutgen.training.images import mask_to_image

__all__ = ["IMAGE_EXTENSIONS", "control_grid", "control_iou_outlines", "control_size", "load_controls",
           "sample_with_control"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def control_size(model: Any) -> tuple[int, int]:
    """(H, W) of the control images the model takes: downsampling_factor x its latent size."""
    factor = model.controlnet.cfg.downsampling_factor
    height, width = model.cfg.latent_size
    return height * factor, width * factor


def _read_control(path: str, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """[channels, H, W] float in [0, 1]; errors name the file (and its shape when it has the wrong size)."""
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--control: image not found: {path}")
    try:
        with Image.open(path) as im:
            array = np.array(im.convert("RGB" if channels == 3 else "L"))
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError ... for broken files
        raise ValueError(f"--control: cannot read image {path}: {type(err).__name__}: {err}") from None
    if tuple(array.shape[:2]) != size:
        raise ValueError(f"--control: {path} is {array.shape[1]}x{array.shape[0]} (shape {tuple(array.shape)}); "
                         f"this ControlNet takes {size[1]}x{size[0]} control images (downsampling_factor x the "
                         f"latent size)")
    tensor = torch.from_numpy(array).float() / 255.0
    return tensor.permute(2, 0, 1) if tensor.dim() == 3 else tensor[None]


def _listed_paths(source: str) -> list[str]:
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if n.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise ValueError(f"--control: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder {source}")
        return [os.path.join(source, n) for n in names]
    from layoutgen.models.datasets.datasets import read_manifest

    frame = read_manifest(source)
    if "control_path" not in frame.columns:
        raise ValueError(f"--control: the manifest {source} has no control_path column (columns: "
                         f"{', '.join(map(str, frame.columns))})")
    root = os.path.dirname(os.path.abspath(source))
    paths = []
    for value in frame["control_path"].tolist():
        if isinstance(value, str) and value.strip():
            path = os.path.expanduser(value.strip())
            paths.append(path if os.path.isabs(path) else os.path.normpath(os.path.join(root, path)))
    if not paths:
        raise ValueError(f"--control: the manifest {source} lists no control_path")
    return paths


def load_controls(source: str, model: Any, num: int, seed: int = 0) -> torch.Tensor:
    """Control images [n, control_channels, H, W] in [0, 1] for `model`, n = min(num, available)."""
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    channels = model.controlnet.cfg.control_channels
    size = control_size(model)
    if source == "synthetic":
        if channels != 1:
            raise ValueError(f"--control synthetic: draws one-channel outlines; this ControlNet takes {channels} "
                             f"channels (give a folder or a manifest)")
        if size[0] != size[1]:
            raise ValueError(f"--control synthetic: draws square outlines; this ControlNet takes {size[1]}x{size[0]}")
        from layoutgen.models.datasets.synthetic import SyntheticLayoutDataset

        dataset = SyntheticLayoutDataset(num, size=size[0], seed=seed, empty_prob=0.0)
        return torch.stack([dataset[i]["control"] for i in range(num)])
    if not os.path.exists(source):
        raise FileNotFoundError(f"--control: no such folder or manifest: {source} (or give 'synthetic')")
    return torch.stack([_read_control(path, channels, size) for path in _listed_paths(source)[:num]])


def sample_with_control(model: Any, control: torch.Tensor, labels: list[int] | None = None,
                        steps: int | None = None, sampler: str | None = None, guidance: float | None = None,
                        seed: int = 0, device: str = "cpu",
                        batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(latents, images or None without an autoencoder, labels): one sample of a ControlNetDiffusion per control."""
    from layoutgen.models.controlnet_diffusion import ControlNetDiffusion
    from layoutgen.training.run import sample_in_batches

    if not isinstance(model, ControlNetDiffusion):
        raise ValueError(f"--control: the checkpoint holds a {type(model).__name__}, not a ControlNetDiffusion; "
                         f"leave --control out")
    return sample_in_batches(model, control.shape[0], labels, steps, sampler, guidance, seed, device, batch_size,
                             control=control)


def control_grid(control: torch.Tensor, images: torch.Tensor, nrow: int | None = None) -> tuple[torch.Tensor, int]:
    """(images for save_image_grid, its nrow): each control beside its sample, `nrow` pairs per row."""
    import math

    images = images.float().cpu()
    if tuple(images.shape[-2:]) != tuple(control.shape[-2:]):   # a latent preview: enlarge it beside its control
        images = torch.nn.functional.interpolate(images, size=tuple(control.shape[-2:]), mode="nearest-exact")
    pairs = torch.stack([mask_to_image(control), images], dim=1).flatten(0, 1)
    return pairs, 2 * (nrow or math.ceil(math.sqrt(control.shape[0])))


def control_iou_outlines(control: torch.Tensor, images: torch.Tensor) -> torch.Tensor | None:
    """One-channel controls at the images' size (nearest), for control_adherence_iou; None for other controls."""
    if control.shape[1] != 1:
        return None
    if tuple(control.shape[-2:]) != tuple(images.shape[-2:]):
        control = torch.nn.functional.interpolate(control.float(), size=tuple(images.shape[-2:]), mode="nearest-exact")
    return control
