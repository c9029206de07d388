"""ControlNet diffusion: a frozen diffusion model guided by a control image (Zhang et al., 2023).

    base = DiffusionModel.from_checkpoint("diffusion.safetensors")
    model = ControlNetDiffusion.from_base(base, base_checkpoint="diffusion.safetensors",
                                          control_channels=1, downsampling_factor=4, fusion="add")
    loss, logs = model.training_loss(batch)        # batch["control"]: [N, control_channels, H, W] images
    latents = model.sample(4, control=outlines)   # e.g. generate the rooms inside given outlines

Only the adapter (`model.controlnet`) trains: the base UNet is frozen, and at initialisation the model's output
equals the base model's exactly, whatever the fusion mode, because every path from the adapter into the UNet starts
at zero. A checkpoint holds the adapter and the config; the base UNet is reloaded from `base_checkpoint`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from layoutgen.config import option
from layoutgen.models.autoencoder import Autoencoder
from layoutgen.models.components.controlnet import ControlNet
from layoutgen.models.components.codec import describe_tensor
from layoutgen.models.diffusion import DiffusionConfig, DiffusionModel
from layoutgen.utils.checkpoint import CheckpointError, load_checkpoint_file


@dataclass
class ControlNetDiffusionConfig(DiffusionConfig):
    section = "controlnet_diffusion"

    base_checkpoint: str | None = option(None, doc="the frozen base DiffusionModel's checkpoint")
    controlnet: dict[str, Any] = option({}, doc="ControlNet options: control_channels, downsampling_factor, "
                                                "hint_channels, fusion, conditioning_scale, fusion_heads")
    control_key: str = option("control", doc="batch key of the control images")

    def validate(self, where: str) -> None:
        super().validate(where)
        if "unet" in self.controlnet:
            raise ValueError(f"{where + '.' if where else ''}controlnet.unet: the adapter always copies the base "
                             f"UNet; leave this key out")


class ControlNetDiffusion(DiffusionModel):
    config_class = ControlNetDiffusionConfig
    # The frozen UNet comes from base_checkpoint and the autoencoder from autoencoder_checkpoint.
    checkpoint_exclude = ("autoencoder.", "unet.")

    def __init__(self, config: dict | ControlNetDiffusionConfig | None = None,
                 autoencoder: Autoencoder | None = None, base: DiffusionModel | None = None, **overrides) -> None:
        if autoencoder is None and base is not None:
            autoencoder = base.autoencoder
        super().__init__(config, autoencoder=autoencoder, **overrides)
        cfg: ControlNetDiffusionConfig = self.cfg
        if base is not None:
            self.unet.load_state(base.unet.state_dict(), source="base model")
            if torch.isnan(self.latent_scale):
                self.latent_scale.copy_(base.latent_scale)
        elif cfg.base_checkpoint:
            self._load_base(cfg.base_checkpoint)
        self.unet.freeze()
        self.controlnet = ControlNet.from_unet(self.unet, **cfg.controlnet)

    @classmethod
    def from_base(cls, base: DiffusionModel, base_checkpoint: str | None = None,
                  control_key: str = "control", **controlnet_options: Any) -> ControlNetDiffusion:
        """A ControlNet over `base` (its UNet, scheduler, latent scale and autoencoder), adapter freshly copied."""
        config = {k: v for k, v in base.config.items() if k in DiffusionConfig.__dataclass_fields__}
        if not torch.isnan(base.latent_scale):
            config["latent_scale"] = float(base.latent_scale)
        config.update(base_checkpoint=None if base_checkpoint is None else os.fspath(base_checkpoint),
                      controlnet=controlnet_options, control_key=control_key)
        return cls(config, base=base)

    def _load_base(self, path: str) -> None:
        tensors, meta = load_checkpoint_file(path)
        if meta.get("model_class") != "DiffusionModel":
            raise CheckpointError(f"{path}: base_checkpoint must hold a DiffusionModel, "
                                  f"found {meta.get('model_class')!r}")
        unet = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
        self.unet.load_state(unet, source=f"{path} (base UNet)")
        if torch.isnan(self.latent_scale) and "latent_scale" in tensors:
            self.latent_scale.copy_(tensors["latent_scale"])

    def save_checkpoint(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
        if not self.cfg.base_checkpoint:
            raise ValueError("ControlNetDiffusion.save_checkpoint: set base_checkpoint (the base model's checkpoint "
                             "path) so the saved adapter can be loaded again")
        super().save_checkpoint(path, metadata)

    def batch_control(self, batch: Mapping[str, Any]) -> torch.Tensor:
        key = self.cfg.control_key
        if key not in batch:
            raise ValueError(f"ControlNetDiffusion: the batch has no control images under {key!r} "
                             f"(keys: {sorted(batch)})")
        return batch[key]

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, labels: torch.Tensor | None,
                control: torch.Tensor | None = None) -> torch.Tensor:
        if control is None:
            raise ValueError("ControlNetDiffusion: needs control images [N, "
                             f"{self.controlnet.cfg.control_channels}, H, W]")
        if control.shape[0] != x.shape[0]:
            raise ValueError(f"ControlNetDiffusion: {x.shape[0]} latents but control {describe_tensor(control)}")
        return self.controlnet.controlled_unet_forward(self.unet, x, t, control.to(x.dtype), cond=cond, labels=labels)

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, control: torch.Tensor,
                cond: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The controlled UNet's prediction for scaled noisy latents at `timestep`."""
        return self.denoise(latent, timestep, cond, labels, control)
