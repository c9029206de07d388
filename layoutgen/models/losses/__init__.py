"""Training losses: ``loss(predictions, batch) -> (weighted scalar, logs)``; see :mod:`.base_loss`."""

from layoutgen.models.losses.base_loss import (
    LOSS_REGISTRY,
    BaseLoss,
    CompositeLoss,
    CrossEntropyLoss,
    KLDLoss,
    L1Loss,
    LatentStandardizationLoss,
    MSELoss,
    build_loss,
)
from layoutgen.models.losses.loss_utils import (
    REDUCTIONS,
    autocast_disabled,
    check_same_shape,
    get_input,
    kl_divergence_normal,
    reduce_loss,
    upcast,
    validate_weight,
)

__all__ = [
    "LOSS_REGISTRY",
    "REDUCTIONS",
    "BaseLoss",
    "CompositeLoss",
    "CrossEntropyLoss",
    "KLDLoss",
    "L1Loss",
    "LatentStandardizationLoss",
    "MSELoss",
    "autocast_disabled",
    "build_loss",
    "check_same_shape",
    "get_input",
    "kl_divergence_normal",
    "reduce_loss",
    "upcast",
    "validate_weight",
]
