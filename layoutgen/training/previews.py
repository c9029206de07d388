"""Preview grids during training: what the model makes of fixed inputs, every `training.preview_every` epochs.

A preview function is `preview_fn(model, epoch) -> {column name: images [N, 3, H, W] in [-1, 1]}` (or a PIL
image); the Trainer calls it on rank 0 under torch.no_grad, in eval mode, with the EMA weights when EMA is on, and
writes `previews/epoch_XXXX.png` (see `preview_image` for the layout). Each function here draws the same inputs and
the same noise every epoch, so successive grids show the model changing, not the draw:

- `autoencoder_preview(images)`: input | every RGB head | every segmentation head's colour map, one row per image;
- `diffusion_preview()`: a few samples per class (a column per class), fixed seed, a few DDIM steps, decoded
  through the model's autoencoder (without one, the first three latent channels: `latents_preview`);
- `controlnet_preview(control)`: control | sample, one row per control image.

`preview_fn_for(model, train_loader, val_loader)` picks the one that fits the model, taking the fixed inputs from
the first items of the validation set (else the training set) without iterating either loader, so the training
order and the random state are untouched.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from layoutgen.training.images import column_grid, mask_to_image, reconstruction_columns

PreviewFn = Callable[[Any, int], Any]

__all__ = ["PreviewFn", "autoencoder_preview", "controlnet_preview", "diffusion_preview", "fixed_batch",
           "preview_fn_for", "preview_image"]


def preview_image(preview: Any) -> np.ndarray:
    """A preview function's result -> [H, W, 3] uint8: a dict becomes a `column_grid`, a PIL image is converted."""
    from PIL import Image

    if isinstance(preview, Image.Image):
        return np.array(preview.convert("RGB"))
    if isinstance(preview, Mapping):
        return column_grid(preview)
    raise TypeError(f"preview_fn: must return a dict of images [N, 3, H, W] in [-1, 1] or a PIL image, "
                    f"got {type(preview).__name__}")


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autoencoder_preview(images: torch.Tensor, max_rows: int = 8) -> PreviewFn:
    """Input | reconstructions | segmentation colour maps of `images` [N, 3, H, W] in [-1, 1]."""
    images = images[:max_rows].detach().cpu()

    def preview(model: Any, epoch: int) -> dict[str, torch.Tensor]:
        outputs = model(images.to(_device_of(model)))
        return reconstruction_columns(images, {k: v.float().cpu() for k, v in outputs.items()},
                                      model.cfg.decoder.heads)
    return preview


def _decoded(model: Any, latents: torch.Tensor) -> torch.Tensor:
    if model.autoencoder is not None:
        return model.decode_to_image(latents).float().cpu()
    from layoutgen.training.run import latents_preview
    return latents_preview(latents.float().cpu())


def diffusion_preview(per_class: int = 2, steps: int = 4, seed: int = 0) -> PreviewFn:
    """`per_class` samples of every class (a column per class; one "samples" column for an unconditional model)."""
    def preview(model: Any, epoch: int) -> dict[str, torch.Tensor]:
        device = _device_of(model)
        num_classes = model.cfg.unet.num_classes or 0
        labels = (torch.arange(num_classes).repeat_interleave(per_class) if num_classes else None)
        n = per_class * max(1, num_classes)
        generator = torch.Generator(device=device).manual_seed(seed)
        latents = model.sample(n, device, num_steps=steps, sampler="ddim", labels=labels, generator=generator,
                               guidance_scale=None if num_classes else 1.0)
        images = _decoded(model, latents)
        if not num_classes:
            return {"samples": images}
        return {f"class {c}": images[c * per_class:(c + 1) * per_class] for c in range(num_classes)}
    return preview


def controlnet_preview(control: torch.Tensor, labels: torch.Tensor | None = None, steps: int = 4,
                       seed: int = 0) -> PreviewFn:
    """Control | sample for each control image [N, C, H, W] in [0, 1] (with its label for a conditional model)."""
    control = control.detach().float().cpu()

    def preview(model: Any, epoch: int) -> dict[str, torch.Tensor]:
        device = _device_of(model)
        use = labels if model.cfg.unet.num_classes else None
        generator = torch.Generator(device=device).manual_seed(seed)
        latents = model.sample(len(control), device, num_steps=steps, sampler="ddim", labels=use,
                               generator=generator, control=control.to(device),
                               guidance_scale=None if use is not None else 1.0)
        return {"control": mask_to_image(control), "sample": _decoded(model, latents)}
    return preview


def fixed_batch(loader: Any, num: int) -> dict[str, Any]:
    """The first `num` items of the loader's dataset, collated as the loader would; the loader is not iterated."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
        raise ValueError(f"preview: cannot take preview inputs from a {type(loader).__name__} without a dataset")
    from torch.utils.data import default_collate

    collate = getattr(loader, "collate_fn", None) or default_collate
    items = [dataset[i] for i in range(min(num, len(dataset)))]
    items = [item for item in items if item is not None]   # a manifest may skip unreadable rows as None
    if not items:
        raise ValueError("preview: the first items of the data set are all unreadable")
    return collate(items)


def preview_fn_for(model: Any, train_loader: Any, val_loader: Any = None, num: int = 4) -> PreviewFn:
    """The preview that fits `model`: ControlNet, diffusion, or an autoencoder (anything with decoder heads)."""
    from layoutgen.models.controlnet_diffusion import ControlNetDiffusion
    from layoutgen.models.diffusion import DiffusionModel

    if isinstance(model, DiffusionModel) and not isinstance(model, ControlNetDiffusion):
        return diffusion_preview()
    batch = fixed_batch(val_loader if val_loader is not None else train_loader, num)
    if isinstance(model, ControlNetDiffusion):
        control = batch.get(model.cfg.control_key)
        if not isinstance(control, torch.Tensor):
            raise ValueError(f"preview: the data has no control images under {model.cfg.control_key!r} "
                             f"(keys: {sorted(batch)})")
        labels = batch.get(model.cfg.label_key)
        return controlnet_preview(control, labels if isinstance(labels, torch.Tensor) else None)
    if hasattr(getattr(model, "cfg", None), "decoder"):
        if "rgb" not in batch:
            raise ValueError(f"preview: the data has no images under 'rgb' (keys: {sorted(batch)})")
        return autoencoder_preview(batch["rgb"])
    raise ValueError(f"preview: no preview for a {type(model).__name__}; pass preview_fn=None or your own")
