"""Diffusion and ControlNet experiments, and running any experiment kind through the Trainer.

    diffusion: {...}               # DiffusionConfig (or controlnet_diffusion: {...}, ControlNetDiffusionConfig)
    data: {num_samples: 512, image_size: 64}        # the built-in synthetic layouts (SyntheticDataConfig), or
    data: {manifest: data/lat/manifest.csv, ...}    # a manifest (ManifestDataConfig keys; split is set per loader)
    training: {epochs: 10, batch_size: 16, ...}     # TrainerConfig

Synthetic layouts (and manifests without latent_path) give images under "rgb" that the model encodes on the fly
through its frozen autoencoder (`autoencoder_checkpoint`); a manifest with latent_path gives pre-embedded latents.
`run_experiment(kind, experiment, out_dir, resume=...)` trains and saves `<kind>.safetensors` in out_dir, beside
the trainer's checkpoints/ and metrics.csv.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from layoutgen.config import Config, option
from layoutgen.models.controlnet_diffusion import ControlNetDiffusionConfig
from layoutgen.models.datasets.datasets import ManifestDataConfig
from layoutgen.models.diffusion import DiffusionConfig
from layoutgen.training.experiment import SyntheticDataConfig
from layoutgen.training.trainer import TrainerConfig
from layoutgen.utils.atomic import atomic_write_text

KINDS = {"autoencoder": "autoencoder", "diffusion": "diffusion", "controlnet_diffusion": "controlnet"}


def check_data(data: dict[str, Any]) -> Config:
    """The data section: a ManifestDataConfig when it names a manifest, else a SyntheticDataConfig."""
    if isinstance(data, dict) and "manifest" in data:
        if "split" in data:
            raise ValueError("data.split: set per loader (train/val); leave this key out")
        return ManifestDataConfig.from_dict(data, where="data")
    return SyntheticDataConfig.from_dict(data, where="data")


@dataclass
class DiffusionExperiment(Config):
    diffusion: DiffusionConfig = option(DiffusionConfig)
    data: dict[str, Any] = option({}, doc="synthetic options, or {manifest: path, ...ManifestDataConfig keys}")
    training: TrainerConfig = option(TrainerConfig)

    def validate(self, where: str) -> None:
        check_data(self.data)


@dataclass
class ControlNetExperiment(Config):
    controlnet_diffusion: ControlNetDiffusionConfig = option(ControlNetDiffusionConfig)
    data: dict[str, Any] = option({}, doc="synthetic options, or {manifest: path, ...ManifestDataConfig keys}")
    training: TrainerConfig = option(TrainerConfig)

    def validate(self, where: str) -> None:
        check_data(self.data)
        if not self.controlnet_diffusion.base_checkpoint:
            raise ValueError("controlnet_diffusion.base_checkpoint: missing required key (the base diffusion model)")


def _check_file(path: str | None, key: str) -> None:
    if path and not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: file not found: {path}")


def build_loaders(data: Config, training: TrainerConfig, kind: str) -> tuple[DataLoader, DataLoader | None]:
    """Training and validation loaders for a diffusion or ControlNet experiment."""
    loader_args = dict(batch_size=training.batch_size, num_workers=training.num_workers)
    if isinstance(data, SyntheticDataConfig):
        from layoutgen.models.datasets.synthetic import SyntheticLayoutDataset
        from layoutgen.training.autoencoder import split_indices

        dataset = SyntheticLayoutDataset(data.num_samples, size=data.image_size, seed=data.seed,
                                         empty_prob=data.empty_prob)
        train_idx, val_idx = split_indices(len(dataset), data.val_fraction, data.seed)
        train = DataLoader(Subset(dataset, train_idx), shuffle=True,
                           drop_last=len(train_idx) > training.batch_size,
                           generator=torch.Generator().manual_seed(training.seed), **loader_args)
        val = DataLoader(Subset(dataset, val_idx), **loader_args) if val_idx else None
        return train, val

    from layoutgen.models.datasets.datasets import ManifestDataset, build_torch_loader, read_manifest

    cfg = data.to_dict()
    _check_file(cfg["manifest"], "data.manifest")
    if cfg.get("outputs") is None:
        columns = set(read_manifest(cfg["manifest"]).columns)
        outputs = ["latent" if "latent_path" in columns else "rgb"]
        if "type" in columns:
            outputs.append("label")
        if kind == "controlnet":
            outputs.append("control")
        cfg["outputs"] = outputs
    train_set = ManifestDataset.from_config(cfg, split="train" if cfg["val_fraction"] > 0 else "all")
    train = build_torch_loader(train_set, training.batch_size, shuffle=True, num_workers=training.num_workers,
                               seed=training.seed, weighted=data.weighted_sampling, power=data.sampling_power)
    val = None
    if cfg["val_fraction"] > 0:
        val_set = ManifestDataset.from_config(cfg, split="val")
        if len(val_set):
            val = build_torch_loader(val_set, training.batch_size, shuffle=False, num_workers=training.num_workers)
    return train, val


def run_experiment(kind: str, experiment: Config, out_dir: str, resume: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Trains a diffusion or ControlNet experiment with the Trainer; returns the trainer's summary + "checkpoint"."""
    from layoutgen.models.controlnet_diffusion import ControlNetDiffusion
    from layoutgen.models.diffusion import DiffusionModel
    from layoutgen.training.trainer import Trainer

    if kind == "diffusion":
        model_cfg = experiment.diffusion
        _check_file(model_cfg.autoencoder_checkpoint, "diffusion.autoencoder_checkpoint")
    elif kind == "controlnet":
        model_cfg = experiment.controlnet_diffusion
        _check_file(model_cfg.autoencoder_checkpoint, "controlnet_diffusion.autoencoder_checkpoint")
        _check_file(model_cfg.base_checkpoint, "controlnet_diffusion.base_checkpoint")
    else:
        raise ValueError(f"run_experiment: unknown kind {kind!r}")
    data = check_data(experiment.data)
    if isinstance(data, SyntheticDataConfig) and not model_cfg.autoencoder_checkpoint:
        raise ValueError(f"{'diffusion' if kind == 'diffusion' else 'controlnet_diffusion'}.autoencoder_checkpoint: "
                         f"needed to encode the synthetic images (or train from a manifest with latent_path)")
    torch.manual_seed(experiment.training.seed)
    model = DiffusionModel(model_cfg) if kind == "diffusion" else ControlNetDiffusion(model_cfg)
    train, val = build_loaders(data, experiment.training, kind)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "config.yaml"), experiment.to_yaml())
    trainer = Trainer(model, None, train, val, config=experiment.training, out_dir=out_dir, resume=resume,
                      progress=progress)
    summary = trainer.fit()
    checkpoint = os.path.join(out_dir, f"{kind}.safetensors")
    model = trainer.model
    if trainer.ema is not None:
        with trainer.ema.average_parameters(model):
            model.save_checkpoint(checkpoint, metadata={"steps": str(trainer.step)})
    else:
        model.save_checkpoint(checkpoint, metadata={"steps": str(trainer.step)})
    summary.update(checkpoint=checkpoint, latest=trainer.checkpoints.latest())
    return summary



# ---------------------------------------------------------------------------------------------------- sample, eval
def load_model(path: str) -> Any:
    """Whichever layoutgen model a checkpoint holds; a missing file is a FileNotFoundError naming it."""
    from layoutgen.models.components.base_model import BaseModel

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return BaseModel.from_checkpoint(path)


def save_image_grid(path: str, images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> tuple[int, int]:
    """Images [N, 3, H, W] in [-1, 1] -> one PNG, `nrow` per row (default ceil(sqrt(N))); returns (width, height)."""
    import io
    import math

    import numpy as np
    from PIL import Image

    from layoutgen.training.images import to_uint8_image
    from layoutgen.utils.atomic import atomic_write_bytes

    n, _, h, w = images.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        y, x = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[y:y + h, x:x + w] = to_uint8_image(images[i])
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return grid.shape[1], grid.shape[0]


def sample_labels(model: Any, num: int, labels: list[int] | None) -> torch.Tensor | None:
    """The labels of `num` samples: `labels` cycled, or every class in turn; None for an unconditional model."""
    num_classes = model.cfg.unet.num_classes or 0
    if not num_classes:
        if labels:
            raise ValueError("--labels: this diffusion model is unconditional (unet.num_classes is 0)")
        return None
    labels = labels or list(range(num_classes))
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise ValueError(f"--labels: {bad} out of range; the model has classes 0..{num_classes - 1}")
    return torch.tensor([labels[i % len(labels)] for i in range(num)], dtype=torch.long)


def generate(model: Any, num: int, labels: list[int] | None = None, steps: int | None = None,
             sampler: str | None = None, guidance: float | None = None, seed: int = 0,
             device: str = "cpu", batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(latents, images or None without an autoencoder, labels) for `num` samples of a DiffusionModel."""
    from layoutgen.models.controlnet_diffusion import ControlNetDiffusion
    from layoutgen.models.diffusion import DiffusionModel

    if isinstance(model, ControlNetDiffusion):
        raise ValueError("--checkpoint: ControlNet checkpoints need control images; sampling them from the command "
                         "line is not supported yet (use the base diffusion checkpoint)")
    if not isinstance(model, DiffusionModel):
        raise ValueError(f"--checkpoint: holds a {type(model).__name__}, not a DiffusionModel")
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    label_tensor = sample_labels(model, num, labels)
    if guidance is not None and guidance != 1.0 and label_tensor is None:
        raise ValueError("--guidance: classifier-free guidance needs a class-conditional model")
    if label_tensor is None and guidance is None and model.cfg.guidance_scale != 1.0:
        guidance = 1.0
    model = model.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    latents, images = [], []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        batch_labels = None if label_tensor is None else label_tensor[start:start + n]
        z = model.sample(n, device, num_steps=steps, sampler=sampler, guidance_scale=guidance, labels=batch_labels,
                         generator=generator)
        latents.append(z.cpu())
        if model.autoencoder is not None:
            images.append(model.decode_to_image(z).float().cpu())
    return torch.cat(latents), (torch.cat(images) if images else None), label_tensor


def latents_preview(latents: torch.Tensor) -> torch.Tensor:
    """The first three latent channels, each normalised to [-1, 1]: a picture when there is no decoder."""
    z = latents[:, :3]
    if z.shape[1] < 3:
        z = torch.cat([z, z[:, :1].expand(-1, 3 - z.shape[1], -1, -1)], dim=1)
    low = z.amin(dim=(0, 2, 3), keepdim=True)
    high = z.amax(dim=(0, 2, 3), keepdim=True)
    return (z - low) / (high - low).clamp_min(1e-8) * 2 - 1


def classifier_of(autoencoder: Any) -> Any:
    """images -> class logits through the autoencoder's ClassificationHead, or None when it has none."""
    if autoencoder is None:
        return None
    names = [h["name"] for h in autoencoder.cfg.decoder.heads if h["type"] == "ClassificationHead"]
    if not names:
        return None

    @torch.no_grad()
    def classify(images: torch.Tensor) -> torch.Tensor:
        return autoencoder(images.to(next(autoencoder.parameters()).device))[names[0]].float().cpu()
    return classify
