"""Data sets: the built-in procedural floor plans (``synthetic``).

Import-light on purpose: no DALI or other optional loaders are imported here.
"""

from .synthetic import (
    BACKGROUND,
    CLASS_NAMES,
    LAYOUT_TYPE_PROBS,
    LAYOUT_TYPES,
    NUM_CLASSES,
    PALETTE,
    ROOM_CLASSES,
    WALL,
    SyntheticLayout,
    SyntheticLayoutDataset,
    generate_layout,
    generate_layouts,
    layout_rng,
    rgb_to_segmentation,
    write_synthetic_dataset,
)

__all__ = [
    "BACKGROUND",
    "CLASS_NAMES",
    "LAYOUT_TYPE_PROBS",
    "LAYOUT_TYPES",
    "NUM_CLASSES",
    "PALETTE",
    "ROOM_CLASSES",
    "WALL",
    "SyntheticLayout",
    "SyntheticLayoutDataset",
    "generate_layout",
    "generate_layouts",
    "layout_rng",
    "rgb_to_segmentation",
    "write_synthetic_dataset",
]
