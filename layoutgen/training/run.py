"""Diffusion and ControlNet experiments, and running any experiment kind (autoencoder too) through the Trainer.

    diffusion: {...}               # DiffusionConfig (or controlnet_diffusion: {...}, ControlNetDiffusionConfig)
    data: {num_samples: 512, image_size: 64}        # the built-in synthetic layouts (SyntheticDataConfig), or
    data: {manifest: data/lat/manifest.csv, ...}    # a manifest (ManifestDataConfig keys; split is set per loader;
                                                    #   loader: torch|dali for the training batches)
    training: {epochs: 10, batch_size: 16, ...}     # TrainerConfig

Synthetic layouts (and manifests without latent_path) give images under "rgb" that the model encodes on the fly
through its frozen autoencoder (`autoencoder_checkpoint`); a manifest with latent_path gives pre-embedded latents.
`run_experiment(kind, experiment, out_dir, resume=...)` trains and saves `<kind>.safetensors` in out_dir, beside
the trainer's checkpoints/ and metrics.csv (AutoencoderExperiment, in experiment.py, for kind "autoencoder").
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from layoutgen.config import Config, option
from layoutgen.models.controlnet_diffusion import ControlNetDiffusionConfig
from layoutgen.models.diffusion import DiffusionConfig
from layoutgen.models.losses.base_loss import build_loss
from layoutgen.training import distributed as dist_utils
from layoutgen.training.experiment import ManifestExperimentData, SyntheticDataConfig, check_data  # noqa: F401
from layoutgen.training.trainer import TrainerConfig
from layoutgen.utils.atomic import atomic_write_text

KINDS = {"autoencoder": "autoencoder", "diffusion": "diffusion", "controlnet_diffusion": "controlnet"}


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


def build_loaders(data: Config, training: TrainerConfig, kind: str) -> tuple[Any, DataLoader | None]:
    """Training and validation loaders of an experiment of `kind` ("autoencoder", "diffusion" or "controlnet").

    Synthetic data: DataLoaders over a seeded train/val split (the Trainer re-seeds the training order per epoch).
    A manifest: the training loader is build_torch_loader's, or the DALI loader with `data.loader: dali` (both
    shard themselves under torch.distributed and apply weighted_sampling); validation is a plain sequential
    DataLoader (the Trainer gives each rank its share of its batches). Autoencoders read the ManifestDataset's
    default outputs (rgb, plus segmentation and label where the manifest has them).
    """
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

    from layoutgen.models.datasets.collate import collate_dicts
    from layoutgen.models.datasets.datasets import ManifestDataset, build_torch_loader, read_manifest

    cfg = data.to_dict()
    loader_kind, dali_threads = cfg.pop("loader", "torch"), cfg.pop("dali_threads", 2)  # not ManifestDataset keys
    _check_file(cfg["manifest"], "data.manifest")
    if cfg.get("outputs") is None and kind != "autoencoder":
        columns = set(read_manifest(cfg["manifest"]).columns)
        outputs = ["latent" if "latent_path" in columns else "rgb"]
        if "type" in columns:
            outputs.append("label")
        if kind == "controlnet":
            outputs.append("control")
        cfg["outputs"] = outputs
    train_split = "train" if cfg["val_fraction"] > 0 else "all"
    if loader_kind == "dali":
        from layoutgen.models.datasets.dali import build_dali_loader
        from layoutgen.training.autoencoder import resolve_device

        device = resolve_device(training.device)
        train = build_dali_loader({**cfg, "split": train_split}, training.batch_size, shuffle=True,
                                  seed=training.seed, num_threads=dali_threads,
                                  device="gpu" if device.type == "cuda" else "cpu", device_id=device.index)
    else:
        train_set = ManifestDataset.from_config(cfg, split=train_split)
        train = build_torch_loader(train_set, training.batch_size, shuffle=True, num_workers=training.num_workers,
                                   seed=training.seed, weighted=data.weighted_sampling, power=data.sampling_power)
    val = None
    if cfg["val_fraction"] > 0:
        val_set = ManifestDataset.from_config(cfg, split="val")
        if len(val_set):
            val = DataLoader(val_set, shuffle=False, collate_fn=collate_dicts, **loader_args)
    return train, val


def _first_items(loader: Any, count: int) -> DataLoader:
    """A DataLoader over the first `count` items of `loader`'s dataset (metrics when there is no validation split)."""
    from layoutgen.models.datasets.collate import collate_dicts

    dataset = loader.dataset
    collate = loader.collate_fn if isinstance(loader, DataLoader) else collate_dicts
    return DataLoader(Subset(dataset, range(min(count, len(dataset)))), batch_size=count, collate_fn=collate)


def _build_model(kind: str, experiment: Config) -> tuple[Any, Any]:
    """(model, loss_fn or None) of an experiment, after checking the files it names."""
    if kind == "autoencoder":
        from layoutgen.models.autoencoder import Autoencoder
        return Autoencoder.from_config(experiment.autoencoder), build_loss(experiment.loss)
    from layoutgen.models.controlnet_diffusion import ControlNetDiffusion
    from layoutgen.models.diffusion import DiffusionModel

    section = "diffusion" if kind == "diffusion" else "controlnet_diffusion"
    model_cfg = getattr(experiment, section)
    _check_file(model_cfg.autoencoder_checkpoint, f"{section}.autoencoder_checkpoint")
    if kind == "controlnet":
        _check_file(model_cfg.base_checkpoint, "controlnet_diffusion.base_checkpoint")
    if isinstance(check_data(experiment.data), SyntheticDataConfig) and not model_cfg.autoencoder_checkpoint:
        raise ValueError(f"{section}.autoencoder_checkpoint: needed to encode the synthetic images (or train from a "
                         f"manifest with latent_path)")
    return (DiffusionModel(model_cfg) if kind == "diffusion" else ControlNetDiffusion(model_cfg)), None


def run_experiment(kind: str, experiment: Config, out_dir: str, resume: bool = False, progress: bool = True,
                   stop_at_step: int | None = None) -> dict[str, Any]:
    """Trains an experiment of `kind` ("autoencoder", "diffusion", "controlnet") with the Trainer.

    Writes config.yaml, checkpoints/, metrics.csv and `<kind>.safetensors` (the EMA weights when EMA is on) to
    out_dir; an autoencoder also gets reconstructions.png (input, reconstruction, segmentation of the first
    validation batch). Returns the trainer's summary plus "checkpoint"; for an autoencoder also the final metrics
    of the saved weights on the validation split (or the first training batch without one) under evaluate's keys
    ("rgb_psnr", "segmentation_mean_iou", ...). `stop_at_step` stops after that step as an interruption would
    (a checkpoint to resume from, no final files; "checkpoint" is then the latest training checkpoint).
    Under torchrun every rank calls it; rank 0 writes the files.
    """
    from layoutgen.training.trainer import Trainer

    if kind not in ("autoencoder", "diffusion", "controlnet"):
        raise ValueError(f"run_experiment: unknown kind {kind!r}; expected autoencoder, diffusion or controlnet")
    data = check_data(experiment.data)
    torch.manual_seed(experiment.training.seed)   # the initial weights depend on training.seed only
    model, loss_fn = _build_model(kind, experiment)
    train, val = build_loaders(data, experiment.training, kind)
    main = dist_utils.is_main()
    os.makedirs(out_dir, exist_ok=True)
    if main:
        atomic_write_text(os.path.join(out_dir, "config.yaml"), experiment.to_yaml())
    from layoutgen.training.previews import preview_fn_for   # previews/epoch_XXXX.png (training.preview_every)
    trainer = Trainer(model, loss_fn, train, val, config=experiment.training, out_dir=out_dir, resume=resume,
                      progress=progress, preview_fn=(preview_fn_for(model, train, val)
                                                     if experiment.training.preview_every else None))
    summary = trainer.fit(stop_at_step=stop_at_step)
    if summary.get("interrupted"):
        summary.update(checkpoint=trainer.checkpoints.latest(), latest=trainer.checkpoints.latest())
        return summary
    model = trainer.model
    checkpoint = os.path.join(out_dir, f"{kind}.safetensors")
    if kind == "autoencoder":
        # final metrics of the weights being saved (validate swaps in the EMA weights itself); collective under DDP
        final = trainer.validate(val if val is not None else _first_items(train, experiment.training.batch_size))
        summary.update(final)
        summary.update({k[len("val_"):]: v for k, v in final.items() if k != "val_loss"})
    if main:
        with trainer.ema.average_parameters(model) if trainer.ema is not None else contextlib.nullcontext():
            model.save_checkpoint(checkpoint, metadata={"steps": str(trainer.step)})
            if kind == "autoencoder":
                _save_reconstructions(trainer, val if val is not None else _first_items(train, 8), out_dir)
    dist_utils.barrier()   # every rank returns once the files exist
    summary.update(checkpoint=checkpoint, latest=trainer.checkpoints.latest())
    return summary


def _save_reconstructions(trainer: Any, loader: Any, out_dir: str) -> None:
    """reconstructions.png: input, reconstruction and predicted segmentation of the first batch of `loader`."""
    from layoutgen.training.autoencoder import autocast_context, to_device
    from layoutgen.training.images import save_reconstruction_grid

    model, cfg = trainer.model, trainer.cfg
    was_training = model.training
    model.eval()
    preview = next(iter(loader))
    with torch.no_grad(), autocast_context(cfg.amp, trainer.device):
        out = model(to_device(preview, trainer.device, cfg.channels_last)[cfg.input_key])
    model.train(was_training)
    save_reconstruction_grid(os.path.join(out_dir, "reconstructions.png"), preview[cfg.input_key].float().cpu(),
                             {k: v.float().cpu() for k, v in out.items()}, model.cfg.decoder.heads)


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
        raise ValueError("--checkpoint: a ControlNet checkpoint needs control images: give --control (from Python: "
                         "layoutgen.training.control_sampling.sample_with_control)")
    if not isinstance(model, DiffusionModel):
        raise ValueError(f"--checkpoint: holds a {type(model).__name__}, not a DiffusionModel")
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    return sample_in_batches(model, num, labels, steps, sampler, guidance, seed, device, batch_size)


def sample_in_batches(model: Any, num: int, labels: list[int] | None, steps: int | None, sampler: str | None,
                      guidance: float | None, seed: int, device: str, batch_size: int,
                      control: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The sampling loop behind `generate` and ControlNet sampling (`control`: one control image per sample):
    checks the steps and guidance, then draws `num` samples `batch_size` at a time from one seeded generator."""
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
        extra = {} if control is None else {"control": control[start:start + n].to(device)}
        z = model.sample(n, device, num_steps=steps, sampler=sampler, guidance_scale=guidance, labels=batch_labels,
                         generator=generator, **extra)
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
