"""Data sets: procedural floor plans (``synthetic``), CSV manifests (``datasets``), collate functions, samplers,
the DALI loader (``dali``) and latent pre-embedding (``embed``).

Import-light on purpose: nvidia.dali is imported only when a DALI loader is built, so everything here works without
the optional ``dali`` extra.
"""

from .collate import collate_dicts
from .dali import DaliLoader, DaliUnavailableError, build_dali_loader, dali_available
from .datasets import (
    OUTPUTS,
    EpochDataLoader,
    ManifestDataConfig,
    ManifestDataset,
    ManifestError,
    build_class_map,
    build_torch_loader,
    load_latent,
    read_manifest,
    stratified_split,
)
from .embed import embed_manifest
from .sampling import (
    EpochBatchSampler,
    ShardedSampler,
    WeightedDistributedSampler,
    class_balance_weights,
    make_sampler,
)
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
    "OUTPUTS",
    "PALETTE",
    "ROOM_CLASSES",
    "WALL",
    "DaliLoader",
    "DaliUnavailableError",
    "EpochBatchSampler",
    "EpochDataLoader",
    "ManifestDataConfig",
    "ManifestDataset",
    "ManifestError",
    "ShardedSampler",
    "SyntheticLayout",
    "SyntheticLayoutDataset",
    "WeightedDistributedSampler",
    "build_class_map",
    "build_dali_loader",
    "build_torch_loader",
    "class_balance_weights",
    "collate_dicts",
    "dali_available",
    "embed_manifest",
    "generate_layout",
    "generate_layouts",
    "layout_rng",
    "load_latent",
    "make_sampler",
    "read_manifest",
    "rgb_to_segmentation",
    "stratified_split",
    "write_synthetic_dataset",
]
