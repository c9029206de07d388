"""Evaluation of generated layouts: palette fidelity, room rectangularity, class-conditional accuracy, memorisation
and ControlNet adherence (see :mod:`layoutgen.evaluation.generation`); connected components in
:mod:`layoutgen.evaluation.components`. Reconstruction metrics live in :mod:`layoutgen.metrics`."""

from layoutgen.evaluation.components import RegionStats, connected_components, region_stats
from layoutgen.evaluation.generation import (
    class_conditional_accuracy,
    control_adherence_iou,
    evaluate_generation,
    memorisation_distances,
    palette_fidelity,
    room_rectangularity,
)

__all__ = [
    "RegionStats",
    "class_conditional_accuracy",
    "connected_components",
    "control_adherence_iou",
    "evaluate_generation",
    "memorisation_distances",
    "palette_fidelity",
    "region_stats",
    "room_rectangularity",
]
