"""ControlNet: a trainable copy of a frozen UNet's encoder that steers it with a control image
(Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

    control [N, control_channels, H*f, W*f] --hint encoder--> [N, C0, H, W] --+
    x_t [N, in_channels, H, W] (+ cond) --conv_in copy---------------------> + --> down copy --> mid copy
                                                                                  |skips         |mid
    frozen UNet:  embed -> encode -> skips  --fusion(skip_i, control_skip_i)-> fused skips --+
                                     middle --fusion(mid, control_mid)-----> fused mid ----> decode -> prediction

f is `downsampling_factor` (the autoencoder's image-to-latent ratio): the control image is drawn at image
resolution, e.g. a room outline mask (control_channels 1) or a one-hot segmentation (control_channels K). The
copy (`time_embed`, `class_embed`, `conv_in`, `down`, `mid`) has the UNet's modules and state-dict keys and starts
from its weights (`ControlNet.from_unet`); the hint encoder's last conv and every fusion module start at zero, so
the controlled UNet starts out computing exactly what the UNet alone computes (see layoutgen.models.components.fusion).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layoutgen.config import Config, option
from layoutgen.models.components.base_model import BaseModel
from layoutgen.models.components.codec import describe_tensor
from layoutgen.models.components.fusion import FUSION_MODES, build_fusion
from layoutgen.models.components.unet import UNet, UNetConfig, UNetEncoderPath

# The modules of the UNet that the ControlNet copies (same names, so their state-dict keys match).
COPIED_MODULES = ("time_embed", "class_embed", "conv_in", "down", "mid")


@dataclass
class ControlNetConfig(Config):
    section = "controlnet"

    unet: UNetConfig = option(doc="the base UNet's config (required: the trainable copy must match it)")
    control_channels: int = option(1, min=1, doc="channels of the control image: 1 for an outline mask, K for a "
                                                 "one-hot segmentation of K classes")
    downsampling_factor: int = option(4, min=1, doc="control image resolution / latent resolution; a power of two")
    hint_channels: list[int] = option([16, 32, 64], min=1, doc="widths of the hint encoder's conv stages")
    fusion: str = option("add", choices=tuple(FUSION_MODES), doc="how control features enter the UNet")
    conditioning_scale: float = option(1.0, doc="default strength of the control (0 = off)")
    fusion_heads: int = option(4, min=1, doc="attention heads of the cross_attention fusion")

    def validate(self, where: str) -> None:
        prefix = f"{where}." if where else ""
        f = self.downsampling_factor
        if f < 1 or f & (f - 1):
            raise ValueError(f"{prefix}downsampling_factor: invalid value {f}; must be a power of two >= 1 "
                             f"(1, 2, 4, 8, ...)")
        if not self.hint_channels:
            raise ValueError(f"{prefix}hint_channels: must list at least one width")
        if self.fusion == "cross_attention":
            for ch in sorted(set(self.unet.level_channels())):
                if ch % self.fusion_heads:
                    raise ValueError(f"{prefix}fusion_heads: {self.fusion_heads} does not divide the {ch} channels "
                                     f"of a UNet level (needed by fusion=cross_attention)")

    @property
    def hint_steps(self) -> int:
        """log2(downsampling_factor): the stride-2 convs of the hint encoder."""
        return self.downsampling_factor.bit_length() - 1


class HintEncoder(nn.Module):
    """Brings the control image to latent resolution: [N, control_channels, H*f, W*f] -> [N, out_channels, H, W].

    ControlNet's input hint block: conv3x3(control -> w0) + SiLU, then for each step a conv3x3 + SiLU at the current
    width and a conv3x3 + SiLU to the next width, stride 2 for the first log2(f) steps; there are
    max(len(widths) - 1, log2 f) steps (the last width repeats when f needs more steps than widths). A last conv3x3
    to out_channels starts at zero, so the hint adds nothing before training.
    """

    def __init__(self, in_channels: int, out_channels: int, widths: list[int], downsampling_steps: int) -> None:
        super().__init__()
        widths = list(widths)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1), nn.SiLU()]
        width = widths[0]
        for step in range(max(len(widths) - 1, downsampling_steps)):
            nxt = widths[min(step + 1, len(widths) - 1)]
            stride = 2 if step < downsampling_steps else 1
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                       nn.Conv2d(width, nxt, 3, padding=1, stride=stride), nn.SiLU()]
            width = nxt
        self.layers = nn.Sequential(*layers)
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        return self.out(self.layers(control))


class ControlNet(UNetEncoderPath, BaseModel):
    """The ControlNet adapter of a UNet: `forward` gives its features, `fuse` mixes them into the UNet's, and
    `controlled_unet_forward` runs the whole controlled UNet.

    Build it with `ControlNet.from_unet(unet, fusion=..., ...)` to start the copy from the UNet's weights;
    `ControlNet(config)` alone leaves the copy randomly initialised (a checkpoint then fills it).
    """

    config_class = ControlNetConfig

    def __init__(self, config: dict | ControlNetConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg: ControlNetConfig = self.cfg
        # Build a UNet and keep its encoder path: the copy then has the UNet's exact classes, layouts and keys.
        template = UNet(cfg.unet)
        for name in COPIED_MODULES:
            setattr(self, name, getattr(template, name))
        self.skip_channels = list(template.skip_channels)
        self.mid_channels = template.mid_channels
        del template

        self.hint_encoder = HintEncoder(cfg.control_channels, self.skip_channels[0], cfg.hint_channels,
                                        cfg.hint_steps)
        kwargs = {}
        if cfg.fusion == "cross_attention":
            kwargs = {"num_heads": cfg.fusion_heads, "norm_groups": cfg.unet.norm_groups,
                      "norm_eps": cfg.unet.norm_eps}
        self.skip_fusions = nn.ModuleList(build_fusion(cfg.fusion, ch, **kwargs) for ch in self.skip_channels)
        self.mid_fusion = build_fusion(cfg.fusion, self.mid_channels, **kwargs)

    @property
    def unet_config(self) -> UNetConfig:
        return self.cfg.unet

    # ------------------------------------------------------------ building
    @classmethod
    def from_unet(cls, unet: UNet, **controlnet_options) -> ControlNet:
        """A ControlNet for `unet` whose trainable copy starts from the UNet's weights (on its device and dtype)."""
        model = cls(unet=unet.config, **controlnet_options)
        reference = next(unet.parameters())
        model.to(device=reference.device, dtype=reference.dtype)
        for name in COPIED_MODULES:
            source, target = getattr(unet, name), getattr(model, name)
            if source is None and target is None:
                continue
            target.load_state_dict(source.state_dict())
            copied, original = target.state_dict(), source.state_dict()
            for key, value in original.items():
                if not torch.equal(copied[key], value):
                    raise RuntimeError(f"ControlNet.from_unet: {name}.{key} was not copied exactly")
        return model

    # ------------------------------------------------------------- forward
    def expected_control_shape(self, x: torch.Tensor) -> list[int]:
        f = self.cfg.downsampling_factor
        return [x.shape[0], self.cfg.control_channels, x.shape[2] * f, x.shape[3] * f]

    def _check_control(self, x: torch.Tensor, control: torch.Tensor) -> None:
        expected = self.expected_control_shape(x)
        if not isinstance(control, torch.Tensor) or list(control.shape) != expected:
            raise ValueError(f"ControlNet: expected control of shape [N, control_channels, H*f, W*f] = {expected} "
                             f"for x of shape {tuple(x.shape)} (downsampling_factor f={self.cfg.downsampling_factor}),"
                             f" got {describe_tensor(control)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, control: torch.Tensor, cond: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The copy's features: (one per UNet skip, same shapes as the UNet's skips; after the middle block).

        x [N, in_channels, H, W], t [N] or scalar, control [N, control_channels, H*f, W*f], cond and labels as the
        UNet takes them.
        """
        self._check_inputs(x, cond)
        self._check_control(x, control)
        emb = self.embed(t, labels, batch_size=x.shape[0])
        h, skips = self.encode(x, emb, cond, hint=self.hint_encoder(control.to(x.dtype)))
        h = self.middle(h, emb)
        return skips, h

    def fuse(self, skips: list[torch.Tensor], mid: torch.Tensor | None, control_skips: list[torch.Tensor],
             control_mid: torch.Tensor | None, scale: float | None = None
             ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Applies the fusion modules: (fused skips, fused middle). `mid`/`control_mid` may be None (skips only)."""
        scale = self.cfg.conditioning_scale if scale is None else scale
        if len(skips) != len(self.skip_fusions) or len(control_skips) != len(self.skip_fusions):
            raise ValueError(f"ControlNet.fuse: expected {len(self.skip_fusions)} skips and control skips, got "
                             f"{len(skips)} and {len(control_skips)}")
        fused = [fusion(s, c, scale) for fusion, s, c in zip(self.skip_fusions, skips, control_skips)]
        fused_mid = None if mid is None else self.mid_fusion(mid, control_mid, scale)
        return fused, fused_mid

    def controlled_unet_forward(self, unet: UNet, x: torch.Tensor, t: torch.Tensor, control: torch.Tensor,
                                cond: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                                scale: float | None = None) -> torch.Tensor:
        """The UNet's prediction with this ControlNet's control: [N, out_channels, H, W].

        With the zero-initialised fusion (before training) this equals `unet(x, t, cond, labels)` exactly. The UNet
        is used as given (freeze it to train the adapter only; gradients still flow through it to the adapter).
        """
        if list(unet.skip_channels) != self.skip_channels or unet.mid_channels != self.mid_channels:
            raise ValueError(f"ControlNet: the UNet's skip channels {unet.skip_channels} / middle {unet.mid_channels} "
                             f"do not match this ControlNet's {self.skip_channels} / {self.mid_channels}")
        self._check_control(x, control)
        emb = unet.embed(t, labels, batch_size=x.shape[0])
        h, skips = unet.encode(x, emb, cond)
        control_skips, control_mid = self(x, t, control, cond, labels)
        # Skips are fused as the encoder leaves them; the middle block's output after it has run.
        skips, _ = self.fuse(skips, None, control_skips, None, scale)
        h = self.mid_fusion(unet.middle(h, emb), control_mid, self.cfg.conditioning_scale if scale is None else scale)
        return unet.decode(h, skips, emb)
