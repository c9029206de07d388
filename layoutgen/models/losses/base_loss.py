"""Training losses for the layout autoencoder / diffusion models.

Every loss is an ``nn.Module`` called as ``loss(predictions, batch)`` where ``predictions`` is the dict of model
outputs and ``batch`` the dict the data loader produced. It returns ``(weighted_loss, logs)``: a scalar tensor to
back-propagate and a dict of detached float32 scalars for logging (always containing ``{name: unweighted value}``).

Example::

    loss_fn = CompositeLoss(losses=[
        MSELoss(key="rgb", target="rgb", weight=1.0),
        CrossEntropyLoss(key="segmentation", target="segmentation", weight=0.05),
    ])
    total, logs = loss_fn(model_outputs, batch)   # logs: {"rgb": ..., "segmentation": ..., "loss": ...}

Losses are computed in float32 (inputs are upcast, autocast is switched off inside the loss) so mixed-precision
training does not lose precision in the reductions.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from layoutgen.config import check_typed_config
from layoutgen.models.losses.loss_utils import (
    REDUCTIONS,
    autocast_disabled,
    check_same_shape,
    get_input,
    kl_divergence_normal,
    reduce_loss,
    upcast,
    validate_name,
    validate_weight,
)

__all__ = [
    "BaseLoss",
    "MSELoss",
    "L1Loss",
    "KLDLoss",
    "CrossEntropyLoss",
    "LatentStandardizationLoss",
    "CompositeLoss",
    "LOSS_REGISTRY",
    "build_loss",
]

Logs = dict[str, torch.Tensor]


def _as_log(value: Any) -> torch.Tensor:
    """Detached float32 scalar for logging (accepts tensors and plain numbers)."""
    if isinstance(value, torch.Tensor):
        return value.detach().float()
    return torch.tensor(float(value), dtype=torch.float32)


class BaseLoss(nn.Module):
    """Base class: reads inputs from the prediction/batch dicts, weights the result and builds the log dict.

    Args:
        key: key of the prediction (model output) this loss reads.
        target: key of the target in the batch, or ``None`` for losses that need no target.
        weight: finite number >= 0 multiplying the loss; the logs keep the unweighted value.
        name: name of the loss in the logs; defaults to ``default_name`` of the class, else ``key``.

    Subclasses implement :meth:`compute`, returning the unweighted scalar and a dict of extra logs.
    """

    #: Name used when ``name`` is not given; ``None`` means "use ``key``".
    default_name: ClassVar[str | None] = None

    def __init__(self, key: str, target: str | None = None, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__()
        cls_name = type(self).__name__
        self.key = validate_name(key, "key", cls_name)
        self.target = None if target is None else validate_name(target, "target", cls_name)
        self.weight = validate_weight(weight, cls_name)
        if name is None:
            name = self.default_name if self.default_name is not None else key
        self.name = validate_name(name, "name", cls_name)

    @property
    def where(self) -> str:
        """Prefix for error messages, e.g. ``"MSELoss 'rgb'"``."""
        return f"{type(self).__name__} {self.name!r}"

    def compute(self, predictions: Mapping[str, Any], batch: Mapping[str, Any]) -> tuple[torch.Tensor, Logs]:
        """Return ``(unweighted scalar loss, extra logs)``. Implemented by subclasses."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute()")

    def forward(self, predictions: Mapping[str, Any], batch: Mapping[str, Any]) -> tuple[torch.Tensor, Logs]:
        with autocast_disabled():
            value, extra = self.compute(predictions, batch)
        if value.ndim != 0:
            raise RuntimeError(f"{self.where}: compute() must return a scalar, got shape {tuple(value.shape)}")
        logs: Logs = {self.name: _as_log(value)}
        for log_name, log_value in extra.items():
            if log_name in logs:
                raise ValueError(f"{self.where}: extra log {log_name!r} collides with the loss name")
            logs[log_name] = _as_log(log_value)
        return value * self.weight, logs

    def extra_repr(self) -> str:
        target = f", target={self.target!r}" if self.target is not None else ""
        return f"key={self.key!r}{target}, weight={self.weight}, name={self.name!r}"


class _ElementwiseLoss(BaseLoss):
    """Shared code of MSE/L1: same-shape prediction and target, mean over all elements."""

    def __init__(self, key: str, target: str, weight: float = 1.0, name: str | None = None) -> None:
        # ``target`` is required here; BaseLoss accepts None, so check it before delegating.
        validate_name(target, "target", type(self).__name__)
        super().__init__(key=key, target=target, weight=weight, name=name)

    def _pair(self, predictions: Mapping[str, Any], batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        pred = get_input(predictions, self.key, self.where, "prediction")
        tgt = get_input(batch, self.target, self.where, "target")
        check_same_shape(pred, tgt, f"{self.where} (prediction {self.key!r} vs target {self.target!r})")
        pred, tgt = upcast(pred, tgt)
        return pred, tgt


class MSELoss(_ElementwiseLoss):
    """Mean squared error ``mean((pred - target)**2)`` over all elements."""

    def compute(self, predictions: Mapping[str, Any], batch: Mapping[str, Any]) -> tuple[torch.Tensor, Logs]:
        pred, tgt = self._pair(predictions, batch)
        return F.mse_loss(pred, tgt, reduction="mean"), {}


class L1Loss(_ElementwiseLoss):
    """Mean absolute error ``mean(|pred - target|)`` over all elements."""

    def compute(self, predictions: Mapping[str, Any], batch: Mapping[str, Any]) -> tuple[torch.Tensor, Logs]:
        pred, tgt = self._pair(predictions, batch)
        return F.l1_loss(pred, tgt, reduction="mean"), {}


class KLDLoss(BaseLoss):
    """KL divergence of the encoder posterior ``N(mu, exp(logvar))`` from ``N(0, 1)``.

    Both ``mu`` and ``logvar`` are read from the *predictions* (the target is unused).

    The meaning of ``weight`` depends on ``reduction``:

    * ``"mean"`` (default): mean over every latent element. The weight is independent of the latent size, so the
      same weight keeps the same strength when the latent resolution or channel count changes.
    * ``"sum_per_sample"``: sum over each sample's latent, mean over the batch, i.e. the ELBO convention used by
      CompVis latent-diffusion. The weight is then the ``beta`` of a beta-VAE, and its effective strength scales with
      the number of latent elements (``C*H*W``): ``weight_mean == weight_sum * C*H*W`` give the same loss.

    ``logvar`` is not clamped here; encoders usually clamp it (e.g. to ``[-30, 20]``) before sampling.
    """

    default_name = "kl"

    def __init__(
        self,
        key: str = "mu",
        logvar_key: str = "logvar",
        weight: float = 1.0,
        reduction: str = "mean",
        name: str | None = "kl",
    ) -> None:
        super().__init__(key=key, target=None, weight=weight, name=name)
        self.logvar_key = validate_name(logvar_key, "logvar_key", type(self).__name__)
        if reduction not in REDUCTIONS:
            raise ValueError(f"{self.where}: unknown reduction {reduction!r}; allowed: {list(REDUCTIONS)}")
        self.reduction = reduction

    def compute(self, predictions: Mapping[str, Any], batch: Mapping[str, Any]) -> tuple[torch.Tensor, Logs]:
        mu = get_input(predictions, self.key, self.where, "prediction")
        logvar = get_input(predictions, self.logvar_key, self.where, "prediction")
        check_same_shape(mu, logvar, f"{self.where} (mu {self.key!r} vs logvar {self.logvar_key!r})")
        return reduce_loss(kl_divergence_normal(mu, logvar), self.reduction), {}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, logvar_key={self.logvar_key!r}, reduction={self.reduction!r}"


class CrossEntropyLoss(BaseLoss):
    """Cross entropy of class logits against integer class indices.

    Works for segmentation logits ``[N, K, H, W]`` (or any ``[N, K, d1, ...]``) against an index map ``[N, H, W]`` and
    for classification logits ``[N, K]`` against labels ``[N]``. Matches ``F.cross_entropy(reduction="mean")``: the
    mean is over non-ignored elements, weighted by ``class_weights[target]`` when class weights are given.

    Args:
        ignore_index: target value that contributes neither loss nor gradient (e.g. unlabeled pixels).
        class_weights: optional per-class weights (length ``K``), stored as a buffer so it follows ``.to(device)``.
        label_smoothing: in ``[0, 1)``; mixes the one-hot target with the uniform distribution, as in PyTorch.

    Unlike ``F.cross_entropy``, a batch in which every element is ignored gives a loss of 0 (not NaN), so a single
    unlabeled batch cannot poison the weights.
    """

    class_weights: torch.Tensor | None

    def __init__(
        self,
        key: str,
        target: str,
        weight: float = 1.0,
        ignore_index: int = -100,
        class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        name: str | None = None,
    ) -> None:
        validate_name(target, "target", type(self).__name__)
        super().__init__(key=key, target=target, weight=weight, name=name)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"{self.where}: 'ignore_index' must be an int, got {ignore_index!r}")
        self.ignore_index = ignore_index

        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
            raise ValueError(f"{self.where}: 'label_smoothing' must be a number in [0, 1), got {label_smoothing!r}")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"{self.where}: 'label_smoothing' must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)

        weights_tensor = None
        if class_weights is not None:
            try:
                values = [float(w) for w in class_weights]
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"{self.where}: 'class_weights' must be a list of numbers, got {class_weights!r}"
                ) from exc
            if not values or any(not math.isfinite(w) or w < 0 for w in values):
                raise ValueError(
                    f"{self.where}: 'class_weights' must be a non-empty list of finite numbers >= 0, got {values}"
                )
            weights_tensor = torch.tensor(values, dtype=torch.float32)
        # Registered even when None so the attribute always exists; a None buffer is not saved in the state dict.
        self.register_buffer("class_weights", weights_tensor)

    def compute(self, predictions: Mapping[str, Any], batch: Mapping[str, Any]) -> tuple[torch.Tensor, Logs]:
        logits = get_input(predictions, self.key, self.where, "prediction")
        target = get_input(batch, self.target, self.where, "target")
        pair = f"{self.where} (logits {self.key!r} vs target {self.target!r})"

        if logits.ndim < 2:
            raise ValueError(f"{pair}: logits must have shape [N, K, ...], got {tuple(logits.shape)}")
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(
                f"{pair}: target must be integer class indices (e.g. torch.long), got dtype {target.dtype}"
            )
        expected = (logits.shape[0], *logits.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(
                f"{pair}: logits shape {tuple(logits.shape)} expects target shape {expected} "
                f"(logits without the class dim), got {tuple(target.shape)}"
            )
        num_classes = logits.shape[1]
        weights = self.class_weights
        if weights is not None:
            if weights.numel() != num_classes:
                raise ValueError(
                    f"{pair}: 'class_weights' has {weights.numel()} entries but the logits have {num_classes} classes"
                )
            weights = weights.to(device=logits.device, dtype=torch.float32)

        (logits,) = upcast(logits)
        target = target.long()

        # Summed loss divided by our own denominator, instead of reduction="mean": identical whenever something is
        # labeled, but an all-ignored batch gives 0 instead of 0/0 = NaN. Everything stays on the device (no .item()
        # or boolean indexing), so there is no host sync.
        summed = F.cross_entropy(
            logits,
            target,
            weight=weights,
            ignore_index=self.ignore_index,
            reduction="sum",
            label_smoothing=self.label_smoothing,
        )
        valid = target != self.ignore_index
        if weights is None:
            denom = valid.sum().to(summed.dtype)
        else:
            # Same normaliser as F.cross_entropy: sum of the weights of the valid targets. Ignored entries may hold
            # out-of-range values (e.g. 255), so index with a safe class first and mask afterwards.
            safe_target = torch.where(valid, target, torch.zeros_like(target))
            denom = (weights.to(summed.dtype)[safe_target] * valid).sum()
        has_any = denom > 0
        # Dividing by a placeholder 1 where denom == 0 and then masking keeps the gradient finite (torch.where over a
        # 0/0 branch would still propagate NaN gradients).
        loss = summed / torch.where(has_any, denom, torch.ones_like(denom)) * has_any
        return loss, {}

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"ignore_index={self.ignore_index}"]
        if self.class_weights is not None:
            parts.append(f"class_weights={self.class_weights.tolist()}")
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        return ", ".join(parts)


class LatentStandardizationLoss(BaseLoss):
    """Pushes latents toward zero mean and unit standard deviation, so a diffusion model can use them unscaled.

    With ``m`` the mean and ``s`` the (unbiased) standard deviation of the latent ``[N, C, ...]``, computed per channel
    over the batch and spatial dims when ``per_channel`` (else over all elements), the loss is
    ``mean(pen(m)) + mean(pen(s - 1))`` with ``pen`` = square (``"l2"``) or absolute value (``"l1"``).

    Logs ``{name}_mean`` (mean of the measured means) and ``{name}_std`` (mean of the measured stds).
    Each statistic needs at least 2 elements (``N * H * W >= 2`` per channel), else ``ValueError``.
    """

    default_name = "latent_std"
    PENALTIES = ("l2", "l1")

    def __init__(
        self,
        key: str = "latent",
        weight: float = 1.0,
        per_channel: bool = True,
        penalty: str = "l2",
        name: str | None = "latent_std",
    ) -> None:
        super().__init__(key=key, target=None, weight=weight, name=name)
        if not isinstance(per_channel, bool):
            raise ValueError(f"{self.where}: 'per_channel' must be a bool, got {per_channel!r}")
        if penalty not in self.PENALTIES:
            raise ValueError(f"{self.where}: unknown penalty {penalty!r}; allowed: {list(self.PENALTIES)}")
        self.per_channel = per_channel
        self.penalty = penalty

    def _pen(self, x: torch.Tensor) -> torch.Tensor:
        return x.pow(2) if self.penalty == "l2" else x.abs()

    def compute(self, predictions: Mapping[str, Any], batch: Mapping[str, Any]) -> tuple[torch.Tensor, Logs]:
        latent = get_input(predictions, self.key, self.where, "prediction")
        (latent,) = upcast(latent)
        if self.per_channel:
            if latent.ndim < 2:
                raise ValueError(
                    f"{self.where}: per_channel needs a latent of shape [N, C, ...], got {tuple(latent.shape)}"
                )
            dims = (0, *range(2, latent.ndim))
            count = latent.numel() // max(latent.shape[1], 1)
        else:
            dims = tuple(range(latent.ndim))
            count = latent.numel()
        if count < 2:
            raise ValueError(
                f"{self.where}: need at least 2 elements per statistic to estimate a std, got {count} "
                f"(latent shape {tuple(latent.shape)}, per_channel={self.per_channel})"
            )
        mean = latent.mean(dim=dims)
        var = latent.var(dim=dims, correction=1)
        # sqrt has an infinite derivative at 0: a collapsed (constant) channel would turn every gradient into NaN.
        # Clamping first keeps it finite; the bias (std >= 1e-6) is irrelevant for a target of 1.
        std = var.clamp_min(1e-12).sqrt()
        loss = self._pen(mean).mean() + self._pen(std - 1.0).mean()
        return loss, {f"{self.name}_mean": mean.mean(), f"{self.name}_std": std.mean()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, per_channel={self.per_channel}, penalty={self.penalty!r}"


class CompositeLoss(nn.Module):
    """Sum of several losses.

    Returns ``(sum of the weighted losses, logs)`` where the logs hold every part's logs plus ``"loss"`` = the
    weighted total. Part names must be unique (and not ``"loss"``) so no log entry is overwritten; nested
    ``CompositeLoss`` parts are flattened into this one.
    """

    TOTAL_KEY = "loss"

    def __init__(self, losses: Sequence[nn.Module]) -> None:
        super().__init__()
        if isinstance(losses, (str, bytes)) or not isinstance(losses, Sequence) or isinstance(losses, nn.Module):
            raise ValueError(f"CompositeLoss: 'losses' must be a list of losses, got {type(losses).__name__}")
        flat: list[BaseLoss] = []
        for index, loss in enumerate(losses):
            if isinstance(loss, CompositeLoss):
                flat.extend(loss.losses)
            elif isinstance(loss, BaseLoss):
                flat.append(loss)
            else:
                raise ValueError(
                    f"CompositeLoss: losses[{index}] must be a BaseLoss or CompositeLoss, got {type(loss).__name__}"
                )
        if not flat:
            raise ValueError("CompositeLoss: 'losses' must contain at least one loss, got an empty list")
        seen: set[str] = {self.TOTAL_KEY}
        for loss in flat:
            if loss.name in seen:
                raise ValueError(
                    f"CompositeLoss: duplicate loss name {loss.name!r} (names must be unique and not "
                    f"{self.TOTAL_KEY!r}; pass name=... to tell them apart)"
                )
            seen.add(loss.name)
        self.losses = nn.ModuleList(flat)

    def forward(self, predictions: Mapping[str, Any], batch: Mapping[str, Any]) -> tuple[torch.Tensor, Logs]:
        total: torch.Tensor | None = None
        logs: Logs = {}
        for loss in self.losses:
            value, part_logs = loss(predictions, batch)
            total = value if total is None else total + value
            for log_name, log_value in part_logs.items():
                # Names were checked at construction, but extra logs (e.g. "<name>_mean") can still collide.
                if log_name in logs or log_name == self.TOTAL_KEY:
                    raise ValueError(f"CompositeLoss: duplicate log name {log_name!r} (from {loss.where})")
                logs[log_name] = log_value
        assert total is not None  # the constructor guarantees at least one loss
        logs[self.TOTAL_KEY] = _as_log(total)
        return total, logs


LOSS_REGISTRY: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (MSELoss, L1Loss, KLDLoss, CrossEntropyLoss, LatentStandardizationLoss, CompositeLoss)
}


def build_loss(config: Mapping[str, Any] | Sequence[Mapping[str, Any]] | nn.Module) -> nn.Module:
    """Build a loss from a config.

    ``config`` is one of:

    * a dict ``{"type": "MSELoss", "key": "rgb", "target": "rgb", "weight": 1.0}`` -> that loss;
    * a list of such dicts -> :class:`CompositeLoss` of them;
    * ``{"type": "CompositeLoss", "losses": [...]}`` -> :class:`CompositeLoss`;
    * an already-built loss module, returned as is.

    Raises ``ValueError`` naming the offending type / key (and listing the valid ones) for unknown types, unknown or
    missing constructor arguments and invalid argument values.
    """
    if isinstance(config, (BaseLoss, CompositeLoss)):
        return config
    if isinstance(config, Sequence) and not isinstance(config, (str, bytes)):
        return CompositeLoss([build_loss(item) for item in config])
    if not isinstance(config, Mapping):
        raise ValueError(f"build_loss: config must be a dict or a list of dicts, got {type(config).__name__}")

    cls, cfg = check_typed_config(config, LOSS_REGISTRY, "build_loss", "loss")
    loss_type = config["type"]
    valid_keys = ["type", *inspect.signature(cls).parameters]
    if cls is CompositeLoss:
        parts = cfg["losses"]
        if isinstance(parts, (str, bytes, Mapping)) or not isinstance(parts, Sequence):
            raise ValueError(f"build_loss: CompositeLoss 'losses' must be a list of loss configs, got {parts!r}")
        return CompositeLoss([build_loss(item) for item in parts])
    try:
        return cls(**cfg)
    except (TypeError, ValueError) as exc:
        # Constructor messages name the bad parameter; add the type and the accepted keys for config users.
        raise ValueError(f"build_loss: invalid config for {loss_type}: {exc}; valid keys: {valid_keys}") from exc
