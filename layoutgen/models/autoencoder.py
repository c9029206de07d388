"""Autoencoder: an Encoder and a multi-head Decoder, deterministic or variational.

    model = Autoencoder.from_config(config["autoencoder"])
    out = model(x)              # {head name: output, "latent": z} (+ "mu", "logvar" for a VAE)
    enc = model.encode(x)       # {"latent": z} or {"mu", "logvar", "latent"}
    heads = model.decode(enc)   # accepts that dict or a latent tensor

A variational model samples its latent with the reparameterisation trick (Kingma & Welling, 2014) in training mode
and returns the mean in eval mode, unless `sample=` says otherwise.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from layoutgen.config import Config, option
from layoutgen.models.components.base_model import BaseModel
from layoutgen.models.decoder import Decoder, DecoderConfig
from layoutgen.models.encoder import Encoder, EncoderConfig

# Keys the autoencoder's output dict uses for latent information; heads may not take these names.
LATENT_KEYS = ("latent", "mu", "logvar")


@dataclass
class AutoencoderConfig(Config):
    section = "autoencoder"

    encoder: EncoderConfig = option(EncoderConfig)
    decoder: DecoderConfig = option(DecoderConfig)

    def validate(self, where: str) -> None:
        enc, dec = self.encoder, self.decoder
        prefix = f"{where}." if where else ""
        if enc.latent_channels != dec.latent_channels:
            raise ValueError(f"{prefix}decoder.latent_channels: {dec.latent_channels} does not match "
                             f"{prefix}encoder.latent_channels={enc.latent_channels}")
        if enc.downsampling_steps != dec.upsampling_steps:
            raise ValueError(f"{prefix}decoder.upsampling_steps: {dec.upsampling_steps} does not match "
                             f"{prefix}encoder.downsampling_steps={enc.downsampling_steps}, so the output would "
                             f"not have the input's size")
        for i, head in enumerate(dec.heads):
            if head["name"] in LATENT_KEYS:
                raise ValueError(f"{prefix}decoder.heads[{i}].name: {head['name']!r} is reserved for the latent "
                                 f"outputs {list(LATENT_KEYS)}")


class Autoencoder(BaseModel):
    config_class = AutoencoderConfig

    def __init__(self, config: dict | AutoencoderConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        self.encoder = Encoder(self.cfg.encoder)
        self.decoder = Decoder(self.cfg.decoder)

    @property
    def variational(self) -> bool:
        return self.cfg.encoder.variational

    @property
    def latent_channels(self) -> int:
        return self.cfg.encoder.latent_channels

    @property
    def downsampling_factor(self) -> int:
        return self.encoder.downsampling_factor

    def encode(self, x: torch.Tensor, sample: bool | None = None,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """x: [N, C, H, W] -> {"latent"} or {"mu", "logvar", "latent"}.

        For a VAE, "latent" is a sample mu + sigma * eps when `sample` is true (default: in training mode only),
        otherwise mu.
        """
        encoded = self.encoder(x)
        if not self.variational:
            return encoded
        mu, logvar = encoded["mu"], encoded["logvar"]
        if sample if sample is not None else self.training:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            latent = mu + torch.exp(0.5 * logvar) * eps
        else:
            latent = mu
        return {"mu": mu, "logvar": logvar, "latent": latent}

    def decode(self, latent: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A latent tensor [N, latent_channels, h, w], or the dict `encode` returns -> {head name: output}."""
        if isinstance(latent, Mapping):
            if "latent" in latent:
                latent = latent["latent"]
            elif "mu" in latent:
                latent = latent["mu"]
            else:
                raise ValueError(f"Autoencoder.decode: the dict has keys {sorted(latent)}; expected 'latent' or 'mu'")
        return self.decoder(latent)

    def forward(self, x: torch.Tensor, sample: bool | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """x: [N, C, H, W] -> every head's output plus the latent information of `encode`."""
        encoded = self.encode(x, sample=sample, generator=generator)
        return {**self.decode(encoded["latent"]), **encoded}
