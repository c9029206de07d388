"""Latent diffusion: a UNet that predicts noise (or v, or x0) on autoencoder latents (Rombach et al., 2022).

    model = DiffusionModel.from_config(config)          # the "diffusion" section, or a whole experiment dict
    pred_noise = model(latent, timestep)                 # UNet prediction at timestep t
    loss, logs = model.training_loss(batch)              # batch["latent"] (pre-embedded) or batch["rgb"]
    generated_latent = model.sample(batch_size, device)  # DDPM or DDIM sampling, optional guidance
    image = model.decode_to_image(generated_latent)      # through the frozen autoencoder's decoder

Latents are multiplied by `latent_scale` before diffusion so they have unit variance (latent-diffusion's
scale_by_std: 1 / std of the training latents, measured from the first batch unless set in the config or with
`fit_latent_scale`); `sample` divides it out again, so its output is a latent the autoencoder decodes directly.
The frozen autoencoder is loaded from `autoencoder_checkpoint`; it never trains, stays in eval mode, and is not
stored in this model's checkpoint.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from layoutgen.config import Config, option
from layoutgen.models.autoencoder import Autoencoder
from layoutgen.models.components.base_model import BaseModel
from layoutgen.models.components.codec import describe_tensor
from layoutgen.models.components.scheduler import build_scheduler
from layoutgen.models.components.unet import UNet, UNetConfig

SAMPLERS = ("ddpm", "ddim")
DEFAULT_SCHEDULER = {"type": "CosineScheduler", "num_steps": 500}


@dataclass
class DiffusionConfig(Config):
    section = "diffusion"

    unet: UNetConfig = option(UNetConfig)
    scheduler: dict[str, Any] = option(DEFAULT_SCHEDULER, doc="{type: CosineScheduler, num_steps: 500, ...}")
    latent_size: list[int] = option([32, 32], min=1, doc="[H, W] of the latents that sample() draws")
    latent_scale: float | None = option(None, min=1e-12, doc="null: 1/std of the training latents, measured")
    autoencoder_checkpoint: str | None = option(None, doc="frozen autoencoder for encoding images and decoding")
    class_dropout: float = option(0.1, min=0.0, max=1.0, doc="share of labels replaced by the null class")
    min_snr_gamma: float | None = option(None, min=0.0, doc="Min-SNR-gamma loss weighting (5 is typical)")
    sampler: str = option("ddim", choices=SAMPLERS)
    sample_steps: int | None = option(None, min=1, doc="sampling steps; null = every training step")
    eta: float = option(0.0, min=0.0, doc="DDIM stochasticity (0 = deterministic)")
    guidance_scale: float = option(1.0, min=0.0, doc="classifier-free guidance; 1 = no guidance")
    label_key: str = option("label", doc="batch key of class labels")
    cond_key: str = option("cond", doc="batch key of the conditioning map (unet.cond_channels > 0)")

    def validate(self, where: str) -> None:
        prefix = f"{where}." if where else ""
        if len(self.latent_size) != 2:
            raise ValueError(f"{prefix}latent_size: expected [H, W], got {self.latent_size}")
        try:
            build_scheduler(self.scheduler)
        except ValueError as err:
            raise ValueError(f"{prefix}scheduler: {err}") from None


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023), per sample, for each prediction target.

    epsilon: min(snr, gamma) / snr;  v: min(snr, gamma) / (snr + 1);  sample: min(snr, gamma).
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        # min(snr, g) / snr written as min(1, g / snr) so that snr = 0 (zero terminal SNR) gives 1, not 0/0.
        return torch.clamp(gamma / snr, max=1.0)
    if prediction_type == "v":
        return clipped / (snr + 1.0)
    return clipped


def _twice(value: torch.Tensor | None) -> torch.Tensor | None:
    return None if value is None else torch.cat([value, value])


class DiffusionModel(BaseModel):
    config_class = DiffusionConfig
    checkpoint_exclude = ("autoencoder.",)

    def __init__(self, config: dict | DiffusionConfig | None = None, autoencoder: Autoencoder | None = None,
                 **overrides) -> None:
        super().__init__(config, **overrides)
        cfg: DiffusionConfig = self.cfg
        self.unet = UNet(cfg.unet)
        self.scheduler = build_scheduler(cfg.scheduler)
        # NaN until set: from the config, fit_latent_scale, or the first training batch.
        scale = math.nan if cfg.latent_scale is None else cfg.latent_scale
        self.register_buffer("latent_scale", torch.tensor(scale, dtype=torch.float32))
        if autoencoder is None and cfg.autoencoder_checkpoint:
            autoencoder = Autoencoder.from_checkpoint(cfg.autoencoder_checkpoint)
        if autoencoder is not None:
            if autoencoder.latent_channels != cfg.unet.in_channels:
                raise ValueError(f"unet.in_channels: {cfg.unet.in_channels} does not match the autoencoder's "
                                 f"latent_channels={autoencoder.latent_channels}")
            autoencoder.freeze()
        self.autoencoder = autoencoder

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Config) -> DiffusionModel:
        """Accepts the diffusion section, or a whole experiment dict that has a "diffusion" section."""
        if isinstance(config, Mapping) and isinstance(config.get("diffusion"), Mapping):
            config = config["diffusion"]
        return cls(config)

    # ---------------------------------------------------------------- latents
    @property
    def latent_channels(self) -> int:
        return self.cfg.unet.in_channels

    @torch.no_grad()
    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] -> unscaled latents, through the frozen encoder (the mean for a VAE)."""
        if self.autoencoder is None:
            raise ValueError("DiffusionModel: encoding images needs an autoencoder (set autoencoder_checkpoint), "
                             "or give pre-embedded latents under 'latent'")
        return self.autoencoder.encode(rgb, sample=False)["latent"]

    @torch.no_grad()
    def fit_latent_scale(self, latents: torch.Tensor | Iterable[torch.Tensor]) -> float:
        """Sets latent_scale = 1 / std over the given latents (a tensor or an iterable of batches)."""
        if isinstance(latents, torch.Tensor):
            latents = [latents]
        count, total, total_sq = 0, 0.0, 0.0
        for batch in latents:
            batch = batch.double()
            count += batch.numel()
            total += batch.sum().item()
            total_sq += (batch ** 2).sum().item()
        if count < 2:
            raise ValueError("fit_latent_scale: needs at least two latent values")
        variance = (total_sq - total ** 2 / count) / (count - 1)
        if not variance > 0:
            raise ValueError(f"fit_latent_scale: the latents have no spread (variance {variance})")
        self.latent_scale.fill_(1.0 / math.sqrt(variance))
        return float(self.latent_scale)

    def _scale(self) -> torch.Tensor:
        if torch.isnan(self.latent_scale):
            raise ValueError("DiffusionModel: latent_scale is not set; set it in the config, call "
                             "fit_latent_scale(latents), or train (the first batch sets it)")
        return self.latent_scale

    def batch_latents(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Unscaled latents of a batch: batch["latent"], or batch["rgb"] through the frozen encoder."""
        if "latent" in batch:
            latents = batch["latent"]
        elif "rgb" in batch:
            latents = self.encode_images(batch["rgb"])
        else:
            raise ValueError(f"DiffusionModel: the batch needs 'latent' or 'rgb'; it has {sorted(batch)}")
        expected = self.latent_channels
        if latents.dim() != 4 or latents.shape[1] != expected:
            raise ValueError(f"DiffusionModel: latents must be [N, {expected}, h, w], got {describe_tensor(latents)}")
        return latents

    # ---------------------------------------------------------------- training
    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's prediction (noise for epsilon prediction) for scaled noisy latents at `timestep`."""
        return self.unet(latent, timestep, cond=cond, labels=labels)

    def training_loss(self, batch: Mapping[str, Any],
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MSE between the UNet's prediction and the scheduler's target at uniformly drawn timesteps.

        Returns (loss, logs). With num_classes > 0, labels are replaced by the null class with probability
        class_dropout in training mode, so one model learns both the conditional and the unconditional branch.
        """
        cfg = self.cfg
        latents = self.batch_latents(batch)
        if torch.isnan(self.latent_scale):
            self.fit_latent_scale(latents)
        z = latents.float() * self._scale()
        n, device = z.shape[0], z.device
        t = torch.randint(0, self.scheduler.num_steps, (n,), device=device, generator=generator)
        x_t, noise = self.scheduler.add_noise(z, t, generator=generator)
        labels = self._training_labels(batch, n, device, generator)
        cond = batch.get(cfg.cond_key) if cfg.unet.cond_channels else None
        prediction = self.denoise(x_t, t, cond, labels, self.batch_control(batch))
        target = self.scheduler.training_target(z, noise, t)
        per_sample = ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, z.dim())))
        logs = {"mse": per_sample.detach().mean()}
        if cfg.min_snr_gamma is not None:
            snr = self.scheduler.snr(t).to(device=device, dtype=torch.float32)
            per_sample = per_sample * min_snr_weights(snr, cfg.min_snr_gamma, self.scheduler.prediction_type)
        loss = per_sample.mean()
        logs["loss"] = loss.detach()
        return loss, logs

    def batch_control(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """The control image of a batch; plain diffusion models take none (ControlNetDiffusion overrides this)."""
        return None

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, labels: torch.Tensor | None,
                control: torch.Tensor | None = None) -> torch.Tensor:
        """One prediction of the denoiser for scaled noisy latents x at timesteps t."""
        if control is not None:
            raise ValueError("DiffusionModel: a control image needs a ControlNetDiffusion model")
        return self.unet(x, t, cond=cond, labels=labels)

    def _training_labels(self, batch: Mapping[str, Any], n: int, device: torch.device,
                         generator: torch.Generator | None) -> torch.Tensor | None:
        if not self.cfg.unet.num_classes:
            return None
        labels = batch.get(self.cfg.label_key)
        if labels is None:
            return torch.full((n,), self.unet.null_label, device=device, dtype=torch.long)
        labels = labels.to(device=device, dtype=torch.long)
        if self.training and self.cfg.class_dropout > 0:
            drop = torch.rand(n, device=device, generator=generator) < self.cfg.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.unet.null_label), labels)
        return labels

    # ---------------------------------------------------------------- sampling
    def guided_prediction(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                          labels: torch.Tensor | None, guidance_scale: float,
                          control: torch.Tensor | None = None) -> torch.Tensor:
        """Prediction with classifier-free guidance (Ho & Salimans, 2022): u + s * (c - u).

        The conditional and unconditional (null class) branches run as one batch of 2N.
        """
        if guidance_scale == 1.0 or labels is None:
            return self.denoise(x, t, cond, labels, control)
        null = torch.full_like(labels, self.unet.null_label)
        both = self.denoise(_twice(x), _twice(t), _twice(cond), torch.cat([labels, null]), _twice(control))
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    @torch.no_grad()
    def sample(self, batch_size: int, device: torch.device | str | None = None, num_steps: int | None = None,
               sampler: str | None = None, eta: float | None = None, guidance_scale: float | None = None,
               labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
               generator: torch.Generator | None = None, latent_size: tuple[int, int] | None = None,
               control: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
        """Generates `batch_size` latents (unscaled: ready for decode_to_image). Options default to the config.

        cond: [N, cond_channels, h, w] where the UNet has cond_channels; control: the control images of a
        ControlNetDiffusion model.
        """
        cfg = self.cfg
        sampler = cfg.sampler if sampler is None else sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sample: sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
        num_steps = cfg.sample_steps if num_steps is None else num_steps
        eta = cfg.eta if eta is None else eta
        guidance_scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        device = torch.device(device) if device is not None else self.latent_scale.device
        height, width = latent_size or cfg.latent_size
        if labels is not None:
            labels = torch.as_tensor(labels, device=device, dtype=torch.long)
            if labels.shape != (batch_size,):
                raise ValueError(f"sample: labels must have shape [{batch_size}], got {tuple(labels.shape)}")
        elif guidance_scale != 1.0:
            raise ValueError("sample: guidance_scale != 1 needs class labels")
        cond = None if cond is None else cond.to(device)
        control = None if control is None else control.to(device)
        scale = self._scale()
        was_training = self.training
        self.eval()
        z = torch.randn((batch_size, self.latent_channels, height, width), generator=generator, device=device)
        steps = self.scheduler.timesteps(num_steps)
        inference_steps = num_steps or self.scheduler.num_steps
        iterator = steps.tolist()
        if progress:
            from tqdm.auto import tqdm
            iterator = tqdm(iterator, desc=f"sampling ({sampler})", leave=False)
        for step in iterator:
            t = torch.full((batch_size,), step, device=device, dtype=torch.long)
            output = self.guided_prediction(z, t, cond, labels, guidance_scale, control).float()
            if sampler == "ddpm":
                z, _ = self.scheduler.ddpm_step(output, step, z, num_inference_steps=inference_steps,
                                                generator=generator)
            else:
                z, _ = self.scheduler.ddim_step(output, step, z, num_inference_steps=inference_steps, eta=eta,
                                                generator=generator)
        self.train(was_training)
        return z / scale

    # ---------------------------------------------------------------- decoding
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every head of the frozen decoder for unscaled latents."""
        if self.autoencoder is None:
            raise ValueError("DiffusionModel: decoding needs an autoencoder (set autoencoder_checkpoint)")
        return self.autoencoder.decode(latents)

    @torch.no_grad()
    def decode_to_image(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> RGB images [N, 3, H, W] in [-1, 1], from the decoder's first RGB head."""
        heads = self.decode(latents)
        names = [h["name"] for h in self.autoencoder.cfg.decoder.heads if h["type"] == "RGBHead"]
        if not names:
            raise ValueError("decode_to_image: the autoencoder's decoder has no RGBHead")
        return heads[names[0]].clamp(-1.0, 1.0)
