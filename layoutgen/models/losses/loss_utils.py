"""Small, dependency-free helpers shared by the losses in :mod:`layoutgen.models.losses.base_loss`.

Everything here is a pure function of its arguments (no module state), so it can be unit-tested on its own and reused
by losses written elsewhere.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import torch

#: Reductions understood by :func:`reduce_loss`.
REDUCTIONS = ("mean", "sum_per_sample")


def upcast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Return ``tensors`` cast to one common floating dtype that is at least float32.

    Losses are reductions over many elements; doing them in fp16/bf16 loses precision (bf16 has 8 mantissa bits) and
    fp16 overflows easily. float64 inputs are kept as float64 so that ``torch.autograd.gradcheck`` still works.
    Integer inputs (e.g. an integer target image for an MSE) are converted as well.
    """
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors)


@contextlib.contextmanager
def autocast_disabled() -> Iterator[None]:
    """Context manager that switches off any active CPU/CUDA autocast region.

    Inputs are upcast explicitly, but a subclass may use ops (matmul, conv) that autocast would silently run in half
    precision again; turning autocast off for the loss computation keeps it in the dtype we chose. Only regions that
    are actually enabled are touched, so nothing happens (and nothing warns) on a machine without CUDA.
    """
    with contextlib.ExitStack() as stack:
        for device_type in ("cuda", "cpu"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


def kl_divergence_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-element KL divergence ``KL(N(mu, exp(logvar)) || N(0, 1))``.

    ``-0.5 * (1 + logvar - mu**2 - exp(logvar))``, the closed form for a diagonal Gaussian against the standard
    normal. Computed in (at least) float32 even for half-precision inputs; ``mu`` and ``logvar`` broadcast as usual.
    No reduction is applied (see :func:`reduce_loss`).
    """
    mu, logvar = upcast(mu, logvar)
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())


def reduce_loss(per_element: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a per-element loss tensor to a scalar.

    * ``"mean"``: mean over every element, so the result does not depend on tensor size.
    * ``"sum_per_sample"``: sum over all dims except the leading batch dim, then mean over the batch. This is the ELBO
      convention used by CompVis latent-diffusion for its KL term (``torch.sum(kl) / kl.shape[0]``); the result grows
      with the number of elements per sample.

    Raises ``ValueError`` for an unknown reduction, or for ``"sum_per_sample"`` on a 0-d tensor (no batch dim).
    """
    if reduction == "mean":
        return per_element.mean()
    if reduction == "sum_per_sample":
        if per_element.ndim == 0:
            raise ValueError("reduction 'sum_per_sample' needs a tensor with a batch dimension, got a 0-d tensor")
        return per_element.reshape(per_element.shape[0], -1).sum(dim=1).mean()
    raise ValueError(f"unknown reduction {reduction!r}; allowed: {list(REDUCTIONS)}")


def get_input(mapping: Mapping[str, Any], key: str, where: str, what: str) -> torch.Tensor:
    """Return ``mapping[key]`` as a tensor, with an error message that says which loss wanted what.

    ``where`` names the loss (e.g. ``"MSELoss 'rgb'"``) and ``what`` the role of the value (``"prediction"`` /
    ``"target"``). A missing key raises ``KeyError`` listing the keys that are present, because the usual cause is a
    typo or a model that names its outputs differently from what the config expects.
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{where}: expected the {what}s as a dict, got {type(mapping).__name__}")
    if key not in mapping:
        available = sorted(mapping.keys(), key=str)
        # KeyError repr()s its argument, which would wrap the message in quotes; subclassing is not worth it, the
        # message stays readable either way.
        raise KeyError(f"{where}: {what} key {key!r} not found; available: {available}")
    value = mapping[key]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: {what} {key!r} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_same_shape(pred: torch.Tensor, target: torch.Tensor, where: str) -> None:
    """Raise ``ValueError`` naming both shapes unless ``pred`` and ``target`` have exactly the same shape.

    Elementwise losses deliberately do not broadcast: ``[N, 3, H, W]`` against ``[N, 1, H, W]`` or ``[N]`` against
    ``[N, 1]`` would silently produce a wrong (but finite) loss.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"{where}: prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}"
        )


def validate_weight(weight: Any, where: str = "loss") -> float:
    """Return ``weight`` as a float, raising ``ValueError`` unless it is a finite real number >= 0.

    Booleans are rejected even though they are ints: ``weight=True`` in a config is almost certainly a mistake.
    """
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise ValueError(f"{where}: 'weight' must be a finite number >= 0, got {weight!r} ({type(weight).__name__})")
    value = float(weight)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: 'weight' must be a finite number >= 0, got {weight!r}")
    return value


def validate_name(value: Any, param: str, where: str) -> str:
    """Return ``value`` unchanged if it is a non-empty string, else raise ``ValueError`` naming ``param``."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: {param!r} must be a non-empty string, got {value!r}")
    return value
