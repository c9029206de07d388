"""ManifestDataset: layout images listed in a CSV manifest, as dict samples for training.

A manifest is a CSV read with pandas, one row per layout. Paths are relative to the manifest's folder, or absolute.

    column         used for                         sample key      sample value
    layout_path    the RGB layout image             rgb             float32 [3, H, W] in [-1, 1]  (x / 127.5 - 1)
    seg_path       class indices (PNG mode L)       segmentation    int64 [H, W]; from the RGB through PALETTE
                                                                    when the manifest has no seg_path
    type           layout category                  label           int64 [], via a stable, saved class map
    control_path   control image, e.g. the outline  control         float32 [1, H, W] in [0, 1]  (x / 255)
    latent_path    pre-embedded latent              latent          float32, as stored (.safetensors/.pt/.npy)
    is_empty       filter non_empty                 (every sample also has index: int64 [], the manifest row)

Rows are numbered from 0 in file order (row r is on line r + 2 of the CSV); errors name the row and the path. The
same decoding steps feed the DALI pipeline's parity (see dali.py): images are decoded to uint8, resized with
nearest-neighbour ("nearest-exact", pixel centres) and only then converted to floats.
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from layoutgen.config import Config, option
from layoutgen.utils.atomic import atomic_write_text

from .collate import collate_dicts
from .sampling import LAST_BATCH_POLICIES, EpochBatchSampler, make_sampler
from .synthetic import LAYOUT_TYPES, rgb_to_segmentation

__all__ = [
    "OUTPUTS",
    "ManifestError",
    "ManifestDataConfig",
    "ManifestDataset",
    "EpochDataLoader",
    "build_torch_loader",
    "build_class_map",
    "load_latent",
    "read_manifest",
    "stratified_split",
]

OUTPUTS = ("rgb", "segmentation", "label", "control", "latent")
_OUTPUT_COLUMNS = {"rgb": "layout_path", "label": "type", "control": "control_path", "latent": "latent_path"}
LATENT_SUFFIXES = (".safetensors", ".pt", ".pth", ".npy")
_SKIP_SLOTS = 256


class ManifestError(ValueError):
    """A manifest, or a file it lists, that cannot be used; the message names the file and the row."""


@dataclass
class ManifestDataConfig(Config):
    """The `data` section of an experiment that trains from a manifest (see ManifestDataset for each key)."""

    section = "data"

    manifest: str = option(doc="path of the CSV manifest")
    outputs: list[str] | None = option(None, choices=OUTPUTS, doc="sample keys; default rgb, segmentation, label")
    image_size: int | None = option(None, min=8, doc="resize every image to image_size x image_size")
    interpolation: str = option("nearest", choices=("nearest", "bilinear"), doc="RGB resize (masks: nearest)")
    non_empty: bool = option(False, doc="drop rows whose is_empty is true")
    types: list[str] | None = option(None, doc="keep only these layout types")
    query: str | None = option(None, doc="pandas query over the columns, e.g. 'room_count >= 3'")
    split: str = option("all", choices=("all", "train", "val"))
    val_fraction: float = option(0.1, min=0.0, max=0.9)
    split_seed: int = option(0, min=0)
    on_error: str = option("raise", choices=("raise", "skip"), doc="missing or corrupt images: raise or skip")
    latent_shape: list[int] | None = option(None, min=1, doc="expected latent shape; default: the first row's")
    class_map: str | None = option(None, doc="class-map JSON (default: <manifest stem>.classes.json beside it)")
    weighted_sampling: bool = option(False, doc="class-balanced sampling by inverse type frequency")
    sampling_power: float = option(1.0, min=0.0, doc="weight = count ** -power (0 plain, 1 balanced)")


# ----------------------------------------------------------------------------------------------------------------------
# Manifest parsing, class map, split
# ----------------------------------------------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike) -> Any:
    """The manifest as a pandas DataFrame (every column as read, plus nothing); errors name the file."""
    import pandas as pd

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ManifestError(f"manifest {path} is empty (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ManifestError(f"manifest {path} is not a readable CSV: {' '.join(str(err).split())}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def build_class_map(types: Sequence[str]) -> dict[str, int]:
    """Class-to-index map of the layout types: the generator's order (LAYOUT_TYPES) when every type is one of its,
    so labels match SyntheticLayoutDataset and models trained on it; otherwise the sorted unique types."""
    unique = sorted({str(t) for t in types})
    if set(unique) <= set(LAYOUT_TYPES):
        return {name: i for i, name in enumerate(LAYOUT_TYPES)}
    return {name: i for i, name in enumerate(unique)}


def _load_class_map(path: str) -> dict[str, int]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise ManifestError(f"class map {path} is not readable JSON: {err}") from None
    mapping = data.get("class_to_index") if isinstance(data, dict) and "class_to_index" in data else data
    if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
        raise ManifestError(f"class map {path}: expected {{\"class_to_index\": {{type: index}}}}")
    if sorted(mapping.values()) != list(range(len(mapping))):
        raise ManifestError(f"class map {path}: indices must be 0..{len(mapping) - 1} without gaps")
    return {str(k): int(v) for k, v in mapping.items()}


def save_class_map(path: str | os.PathLike, class_to_index: Mapping[str, int]) -> None:
    """Writes the class map as JSON ({"class_to_index": ..., "classes": [names by index]}), atomically."""
    classes = sorted(class_to_index, key=class_to_index.__getitem__)
    text = json.dumps({"class_to_index": dict(class_to_index), "classes": classes}, indent=2)
    atomic_write_text(path, text + "\n")


def stratified_split(types: Sequence[Any] | None, num_rows: int, val_fraction: float, seed: int = 0) -> np.ndarray:
    """bool [num_rows], True for validation rows: in every type, round(val_fraction * count) rows (at least one
    when the type has two rows or more) drawn with a generator seeded by ``seed``. Unstratified when types is None.
    """
    is_val = np.zeros(num_rows, dtype=bool)
    if val_fraction <= 0 or num_rows == 0:
        return is_val
    rng = np.random.default_rng(seed)
    groups = [np.arange(num_rows)] if types is None else [
        np.flatnonzero(np.asarray(types, dtype=object) == t) for t in sorted({str(t) for t in types})]
    for rows in groups:
        k = math.floor(val_fraction * len(rows) + 0.5)
        if len(rows) >= 2:
            k = min(max(k, 1), len(rows) - 1)
        else:
            k = 0
        is_val[rng.permutation(rows)[:k]] = True
    return is_val


def _as_bool(values: Any, path: str, column: str) -> np.ndarray:
    out = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)):
            out[i] = bool(v)
        elif isinstance(v, (int, float, np.integer, np.floating)) and v in (0, 1):
            out[i] = bool(v)
        elif isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            out[i] = v.strip().lower() in ("true", "1", "yes")
        else:
            raise ManifestError(f"manifest {path}, row {i} (line {i + 2}): column {column!r} must be true/false, "
                                f"got {v!r}")
    return out


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not
                                                                               value.strip())


# ----------------------------------------------------------------------------------------------------------------------
# Decoding (shared by the torch path and the DALI path's checks)
# ----------------------------------------------------------------------------------------------------------------------


def _where(path: str, row: int) -> str:
    return f"{path} (manifest row {row}, line {row + 2})"


def read_image(path: str, row: int, kind: str) -> np.ndarray:
    """uint8 HWC (kind "rgb": 3 channels) or HW (kind "mask": a mode-L/P image's values) of an image file."""
    from PIL import Image

    if not os.path.isfile(path):
        raise ManifestError(f"image not found: {_where(path, row)}")
    try:
        with Image.open(path) as im:
            if kind == "rgb":
                return np.array(im if im.mode == "RGB" else im.convert("RGB"))
            if im.mode in ("L", "P"):  # P: the palette indices themselves are the values
                return np.array(im)
            if im.mode in ("I", "I;16", "1"):
                return np.asarray(im).astype(np.uint8)
            return np.array(im.convert("L"))
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, zlib.error ... for broken files
        raise ManifestError(f"cannot decode image {_where(path, row)}: {type(err).__name__}: {err}") from None


def read_segmentation(path: str, row: int) -> np.ndarray:
    """uint8 HW class indices: a mode-L/P image's values, or an RGB image mapped through PALETTE."""
    from PIL import Image

    if not os.path.isfile(path):
        raise ManifestError(f"image not found: {_where(path, row)}")
    try:
        with Image.open(path) as im:
            mode = im.mode
    except Exception as err:
        raise ManifestError(f"cannot decode image {_where(path, row)}: {type(err).__name__}: {err}") from None
    if mode in ("RGB", "RGBA"):
        return rgb_to_segmentation(read_image(path, row, "rgb"))
    return read_image(path, row, "mask")


def resize_nearest(image: torch.Tensor, size: int | None) -> torch.Tensor:
    """[C, H, W] (any dtype) -> [C, size, size], nearest neighbour at pixel centres (DALI's INTERP_NN)."""
    if size is None or tuple(image.shape[-2:]) == (size, size):
        return image
    return F.interpolate(image[None], size=(size, size), mode="nearest-exact")[0]


def resize_bilinear_uint8(image: torch.Tensor, size: int | None) -> torch.Tensor:
    """uint8 [C, H, W] -> uint8 [C, size, size], antialiased bilinear, rounded (close to DALI's INTERP_LINEAR)."""
    if size is None or tuple(image.shape[-2:]) == (size, size):
        return image
    out = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def normalize_rgb(image_u8: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1]: (x - 127.5) * float32(1 / 127.5).

    Exactly what DALI's crop_mirror_normalize(mean=127.5, std=127.5) computes, so both loading paths agree to the
    bit (x / 127.5 - 1, as SyntheticLayoutDataset writes it, differs from it by at most one float32 ulp).
    """
    return (image_u8.to(torch.float32) - 127.5) * (1.0 / 127.5)


def normalize_mask(image_u8: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]: x * float32(1 / 255) (DALI's crop_mirror_normalize(mean=0, std=255))."""
    return image_u8.to(torch.float32) * (1.0 / 255.0)


def load_latent(path: str, row: int = -1) -> torch.Tensor:
    """A latent tensor from .safetensors (key 'latent' or the only tensor), .pt/.pth (torch.load with
    weights_only=True: a tensor, or a dict as for safetensors) or .npy (no pickles); float32 on the CPU."""
    where = _where(path, row) if row >= 0 else path
    if not os.path.isfile(path):
        raise ManifestError(f"latent not found: {where}")
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(path)
        elif suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            obj = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            raise ManifestError(f"latent {where}: unsupported file type {suffix!r}; use one of {list(LATENT_SUFFIXES)}")
    except ManifestError:
        raise
    except Exception as err:
        raise ManifestError(f"cannot read latent {where}: {type(err).__name__}: {' '.join(str(err).split())}") from None
    if isinstance(obj, Mapping):
        if "latent" in obj:
            obj = obj["latent"]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
        else:
            raise ManifestError(f"latent {where}: expected a tensor named 'latent', found keys {sorted(obj)}")
    if not isinstance(obj, torch.Tensor):
        raise ManifestError(f"latent {where}: expected a tensor, got {type(obj).__name__}")
    return obj.to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------------
# The data set
# ----------------------------------------------------------------------------------------------------------------------


class ManifestDataset(Dataset):
    """Layout images listed in a CSV manifest (see the module docstring for columns and sample keys).

    Args:
        manifest_path: the CSV file.
        outputs: sample keys among OUTPUTS; default rgb, plus segmentation when there is a seg_path column and label
            when there is a type column. ``index`` (the manifest row) is always included.
        image_size: resize every image to image_size x image_size (None: as stored).
        interpolation: RGB resize, "nearest" (keeps palette colours exact; the default) or "bilinear" (antialiased).
            Segmentation and control always use nearest.
        non_empty: drop rows whose is_empty is true. types: keep only these types. query: a pandas query string.
        split: "all", "train" or "val": a deterministic split stratified by type, made over the whole manifest
            before any filter (a row's side never depends on the filters). val_fraction, split_seed: its settings.
        on_error: "raise" (default): a missing or corrupt file raises a ManifestError naming its path and row;
            "skip": such rows are skipped (missing files at construction, corrupt ones when read: ``__getitem__``
            returns None, which collate_dicts drops) and counted in ``num_skipped``.
        latent_shape: the shape every latent must have (default: the first row's).
        class_map: path of the class-map JSON (loaded when it exists, written otherwise), a mapping, or False (not
            saved). Default: ``<manifest stem>.classes.json`` beside the manifest.
    """

    def __init__(self, manifest_path: str | os.PathLike, outputs: Sequence[str] | None = None,
                 image_size: int | None = None, interpolation: str = "nearest", non_empty: bool = False,
                 types: Sequence[str] | None = None, query: str | None = None, split: str = "all",
                 val_fraction: float = 0.1, split_seed: int = 0, on_error: str = "raise",
                 latent_shape: Sequence[int] | None = None,
                 class_map: str | os.PathLike | Mapping | bool | None = None):
        self.manifest_path = os.fspath(manifest_path)
        self.root = os.path.dirname(os.path.abspath(self.manifest_path))
        if interpolation not in ("nearest", "bilinear"):
            raise ValueError(f"interpolation: {interpolation!r}; choose 'nearest' or 'bilinear'")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error: {on_error!r}; choose 'raise' or 'skip'")
        if split not in ("all", "train", "val"):
            raise ValueError(f"split: {split!r}; choose 'all', 'train' or 'val'")
        if image_size is not None and int(image_size) < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.image_size = None if image_size is None else int(image_size)
        self.interpolation, self.on_error, self.split = interpolation, on_error, split

        frame = read_manifest(self.manifest_path)
        self.columns = list(frame.columns)
        self.outputs = self._resolve_outputs(outputs)
        self.seg_from_palette = "segmentation" in self.outputs and "seg_path" not in self.columns

        # Class map and split over the whole manifest, before filters: neither depends on them.
        all_types = None
        if "type" in self.columns:
            bad = [i for i, t in enumerate(frame["type"].tolist()) if _is_missing(t)]
            if bad and "label" in self.outputs:
                raise ManifestError(f"manifest {self.manifest_path}: rows {bad[:10]} have no 'type' "
                                    f"(needed for the label output)")
            all_types = ["" if _is_missing(t) else str(t) for t in frame["type"].tolist()]
        self.class_to_index = self._resolve_class_map(class_map, all_types)
        is_val = stratified_split(all_types, len(frame), float(val_fraction), int(split_seed))

        keep = np.ones(len(frame), dtype=bool)
        if split != "all":
            keep &= is_val if split == "val" else ~is_val
        filters = [f"split={split}"] if split != "all" else []
        if non_empty:
            if "is_empty" not in self.columns:
                raise ManifestError(self._column_message(["is_empty"], "the non_empty filter"))
            keep &= ~_as_bool(frame["is_empty"].tolist(), self.manifest_path, "is_empty")
            filters.append("non_empty")
        if types is not None:
            if all_types is None:
                raise ManifestError(self._column_message(["type"], "the types filter"))
            unknown = sorted(set(types) - set(all_types))
            if unknown:
                raise ManifestError(f"types filter: {unknown} not in manifest {self.manifest_path}; "
                                    f"its types are {sorted(set(all_types))}")
            keep &= np.isin(np.asarray(all_types, dtype=object), list(types))
            filters.append(f"types={list(types)}")
        if query:
            try:
                selected = frame.assign(_row=np.arange(len(frame))).query(query)["_row"].to_numpy()
            except Exception as err:
                raise ManifestError(f"query {query!r} on manifest {self.manifest_path} failed: "
                                    f"{type(err).__name__}: {' '.join(str(err).split())}") from None
            mask = np.zeros(len(frame), dtype=bool)
            mask[selected] = True
            keep &= mask
            filters.append(f"query={query!r}")
        self.filters = filters

        rows = np.flatnonzero(keep)
        self._paths: dict[str, list[str | None]] = {}
        for column in self._path_columns():
            values = frame[column].tolist()
            self._paths[column] = [None if _is_missing(values[r]) else self._resolve(values[r]) for r in rows]
        self._rows = rows.astype(np.int64)
        self._labels = None
        if all_types is not None and "label" in self.outputs:
            self._labels = np.array([self.class_to_index[all_types[r]] for r in rows], dtype=np.int64)
        self._types = None if all_types is None else [all_types[r] for r in rows]

        self.skipped: list[tuple[int, str, str]] = []  # (row, path, reason), found at construction
        self._check_files()
        # Rows skipped while reading, counted across DataLoader workers whatever their start method: a shared-memory
        # tensor (torch pickles it for spawn/forkserver workers too), one slot per worker so no increment races.
        self._runtime_skips = torch.zeros(_SKIP_SLOTS + 1, dtype=torch.int64).share_memory_()
        if len(self._rows) == 0:
            reason = f" after filters ({', '.join(filters)})" if filters else ""
            skipped = f" and skipping {len(self.skipped)} rows with missing files" if self.skipped else ""
            raise ManifestError(f"manifest {self.manifest_path}: no rows left{reason}{skipped} "
                                f"({len(frame)} rows in the manifest)")
        if self.skipped:
            warnings.warn(f"{self.manifest_path}: skipped {len(self.skipped)} rows with missing files "
                          f"(first: {_where(self.skipped[0][1], self.skipped[0][0])})", stacklevel=2)
        self.latent_shape = None
        if "latent" in self.outputs:
            if latent_shape is not None:
                self.latent_shape = tuple(int(s) for s in latent_shape)
            else:
                first = next((i for i, p in enumerate(self._paths["latent_path"]) if p is not None), None)
                self.latent_shape = None if first is None else tuple(self._read_latent(first).shape)

    # -- construction helpers ------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ManifestDataConfig | Mapping[str, Any], **overrides: Any) -> ManifestDataset:
        """From a ManifestDataConfig (or its dict); keyword arguments override keys (e.g. split="val")."""
        cfg = ManifestDataConfig.from_dict(config).to_dict()
        cfg.update(overrides)
        cfg.pop("weighted_sampling", None)
        cfg.pop("sampling_power", None)
        return cls(cfg.pop("manifest"), **cfg)

    def _column_message(self, missing: list[str], needed_for: str) -> str:
        return (f"manifest {self.manifest_path}: missing column(s) {missing} needed for {needed_for}; "
                f"present columns: {self.columns}")

    def _resolve_outputs(self, outputs: Sequence[str] | None) -> tuple[str, ...]:
        if outputs is None:
            outputs = ["rgb"]
            if "seg_path" in self.columns:
                outputs.append("segmentation")
            if "type" in self.columns:
                outputs.append("label")
        if isinstance(outputs, str):
            outputs = [outputs]
        unknown = [o for o in outputs if o not in OUTPUTS]
        if unknown:
            raise ValueError(f"outputs: unknown {unknown}; valid outputs are {list(OUTPUTS)}")
        outputs = tuple(dict.fromkeys(outputs))
        required = {o: ("seg_path or layout_path" if o == "segmentation" else _OUTPUT_COLUMNS[o]) for o in outputs}
        missing = [o for o in outputs if (o == "segmentation" and not {"seg_path", "layout_path"} & set(self.columns))
                   or (o != "segmentation" and _OUTPUT_COLUMNS[o] not in self.columns)]
        if missing:
            raise ManifestError(
                f"manifest {self.manifest_path}: missing column(s) for outputs {missing}; required columns "
                f"{sorted(set(required.values()))} (for outputs {list(outputs)}); present columns: {self.columns}")
        return outputs

    def _path_columns(self) -> list[str]:
        columns = []
        for output in self.outputs:
            if output == "segmentation":
                columns.append("layout_path" if self.seg_from_palette else "seg_path")
            elif output != "label":
                columns.append(_OUTPUT_COLUMNS[output])
        return list(dict.fromkeys(columns))

    def _resolve(self, value: Any) -> str:
        path = os.path.expanduser(str(value).strip())
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(self.root, path))

    def _resolve_class_map(self, class_map: Any, all_types: list[str] | None) -> dict[str, int]:
        if all_types is None:
            return {}
        present = sorted(set(all_types) - {""})
        if isinstance(class_map, Mapping):
            mapping = {str(k): int(v) for k, v in class_map.items()}
            path = None
        else:
            if class_map is None or class_map is True:
                stem = os.path.splitext(os.path.basename(self.manifest_path))[0]
                path = os.path.join(self.root, f"{stem}.classes.json")
            elif class_map is False:
                path = None
            else:
                path = os.fspath(class_map)
            if path is not None and os.path.isfile(path):
                mapping = _load_class_map(path)
            else:
                mapping = build_class_map(present)
                if path is not None:
                    try:
                        save_class_map(path, mapping)
                    except OSError as err:  # a read-only data folder: the map is still deterministic
                        warnings.warn(f"could not save the class map to {path}: {err}", stacklevel=3)
        self.class_map_path = path
        unknown = [t for t in present if t not in mapping]
        if unknown:
            raise ManifestError(f"manifest {self.manifest_path}: types {unknown} are not in the class map "
                                f"{path or '(given)'} {sorted(mapping)}; delete the file to rebuild it")
        return mapping

    def _check_files(self) -> None:
        """Missing files: raise naming the first (and how many), or drop their rows with on_error=skip."""
        missing: list[tuple[int, int, str]] = []  # (position, row, path)
        for column, paths in self._paths.items():
            optional = column in ("control_path", "latent_path")
            for pos, path in enumerate(paths):
                if path is None:
                    if not optional:
                        missing.append((pos, int(self._rows[pos]), f"<empty {column}>"))
                elif not os.path.isfile(path):
                    missing.append((pos, int(self._rows[pos]), path))
        if not missing:
            return
        if self.on_error == "raise":
            pos, row, path = missing[0]
            more = f" ({len(missing) - 1} more missing files; on_error: skip skips them)" if len(missing) > 1 else ""
            raise ManifestError(f"file not found: {_where(path, row)}{more}")
        bad = sorted({pos for pos, _, _ in missing})
        seen = set()
        for pos, row, path in missing:
            if pos not in seen:
                seen.add(pos)
                self.skipped.append((row, path, "missing"))
        keep = np.ones(len(self._rows), dtype=bool)
        keep[bad] = False
        self._rows = self._rows[keep]
        for column in self._paths:
            self._paths[column] = [p for p, k in zip(self._paths[column], keep) if k]
        if self._labels is not None:
            self._labels = self._labels[keep]
        if self._types is not None:
            self._types = [t for t, k in zip(self._types, keep) if k]

    # -- public API ----------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def rows(self) -> np.ndarray:
        """int64 [len]: the manifest row of every item."""
        return self._rows

    def path(self, column: str, index: int) -> str | None:
        """The resolved path of ``column`` for item ``index`` (None when the cell is empty)."""
        return self._paths[column][index]

    @property
    def num_classes(self) -> int:
        return len(self.class_to_index)

    def labels(self) -> np.ndarray:
        """int64 [len]: every item's label (ManifestError when the manifest has no type column)."""
        if self._labels is None:
            if self._types is None:
                raise ManifestError(self._column_message(["type"], "labels (weighted sampling)"))
            self._labels = np.array([self.class_to_index[t] for t in self._types], dtype=np.int64)
        return self._labels

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels(), minlength=self.num_classes).astype(np.int64)

    @property
    def num_skipped(self) -> int:
        """Rows skipped with on_error=skip: missing at construction plus corrupt when read (over all workers)."""
        return len(self.skipped) + int(self._runtime_skips.sum())

    def report(self) -> str:
        """One line about the rows in use and the rows skipped."""
        text = f"{self.manifest_path}: {len(self)} rows"
        if self.filters:
            text += f" ({', '.join(self.filters)})"
        if self.num_skipped:
            text += f", {self.num_skipped} skipped ({len(self.skipped)} missing at start, " \
                    f"{self.num_skipped - len(self.skipped)} unreadable)"
        return text

    def save_class_map(self, path: str | os.PathLike) -> None:
        save_class_map(path, self.class_to_index)

    def count_skip(self, err: Exception) -> None:
        """Record a row skipped while reading (the count is shared across DataLoader workers)."""
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        self._runtime_skips[0 if info is None else 1 + info.id % _SKIP_SLOTS] += 1
        warnings.warn(f"on_error=skip: skipping a row: {err}", stacklevel=2)

    def _read_latent(self, index: int) -> torch.Tensor | None:
        path = self._paths["latent_path"][index]
        if path is None:
            return None
        latent = load_latent(path, int(self._rows[index]))
        expected = getattr(self, "latent_shape", None)
        if expected is not None and tuple(latent.shape) != tuple(expected):
            raise ManifestError(f"latent {_where(path, int(self._rows[index]))} has shape {tuple(latent.shape)}, "
                                f"expected {tuple(expected)}")
        return latent

    def load_latent(self, index: int) -> torch.Tensor | None:
        return self._read_latent(index)

    def load_sample(self, index: int) -> dict[str, Any]:
        """The sample of item ``index``; raises ManifestError for a bad file whatever on_error says."""
        row = int(self._rows[index])
        size = self.image_size
        sample: dict[str, Any] = {"index": torch.tensor(row, dtype=torch.int64)}
        rgb_u8 = None
        if "rgb" in self.outputs or self.seg_from_palette:
            hwc = read_image(self._paths["layout_path"][index], row, "rgb")
            rgb_u8 = torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1)
        if "rgb" in self.outputs:
            resized = resize_bilinear_uint8(rgb_u8, size) if self.interpolation == "bilinear" else \
                resize_nearest(rgb_u8, size)
            sample["rgb"] = normalize_rgb(resized)
        if "segmentation" in self.outputs:
            if self.seg_from_palette:
                hwc = resize_nearest(rgb_u8, size).permute(1, 2, 0)
                sample["segmentation"] = rgb_to_segmentation(hwc)
            else:
                seg = read_segmentation(self._paths["seg_path"][index], row)
                sample["segmentation"] = resize_nearest(torch.from_numpy(seg)[None], size)[0].to(torch.int64)
        if "label" in self.outputs:
            sample["label"] = torch.tensor(int(self._labels[index]), dtype=torch.int64)
        if "control" in self.outputs:
            path = self._paths["control_path"][index]
            if path is None:
                sample["control"] = None
            else:
                control = torch.from_numpy(read_image(path, row, "mask"))[None]
                sample["control"] = normalize_mask(resize_nearest(control, size))
        if "latent" in self.outputs:
            sample["latent"] = self._read_latent(index)
        return sample

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        try:
            return self.load_sample(index)
        except ManifestError as err:
            if self.on_error != "skip":
                raise
            self.count_skip(err)
            return None


# ----------------------------------------------------------------------------------------------------------------------
# The torch loading path
# ----------------------------------------------------------------------------------------------------------------------


class EpochDataLoader(DataLoader):
    """A DataLoader whose batches come from an EpochBatchSampler; ``set_epoch`` reshuffles (as the DALI loader).

    Workers are forked when iteration starts. A worker forked while a DALI pipeline is alive in this process can
    crash (measured here: a segfault in about one fork in eight), so when one is alive and no start method was
    chosen, the workers start with "forkserver" instead (as with any non-fork start method, a script must then
    guard its entry point with ``if __name__ == "__main__":``).
    """

    def __iter__(self):
        reuses_workers = self.persistent_workers and getattr(self, "_iterator", None) is not None
        if self.num_workers > 0 and self.multiprocessing_context is None and os.name == "posix" and not reuses_workers:
            dali = sys.modules.get("layoutgen.models.datasets.dali")
            if dali is not None and dali.live_pipelines() > 0:
                warnings.warn("DataLoader workers start with 'forkserver': forking while a DALI pipeline is alive "
                              "can crash them (close DALI loaders first to keep fork)", stacklevel=2)
                self.multiprocessing_context = "forkserver"
        return super().__iter__()

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    @property
    def row_sampler(self):
        return self.batch_sampler.sampler


def build_torch_loader(dataset: ManifestDataset, batch_size: int, shuffle: bool = True, num_workers: int = 0,
                       seed: int = 0, weighted: bool = False, power: float = 1.0, num_samples: int | None = None,
                       num_replicas: int | None = None, rank: int | None = None, last_batch: str = "partial",
                       pin_memory: bool = False, persistent_workers: bool = False,
                       prefetch_factor: int | None = None, multiprocessing_context: Any = None) -> EpochDataLoader:
    """A DataLoader over ``dataset`` with the sampler and batching the DALI loader uses (same rows, same order).

    ``weighted``: class-balanced sampling (inverse type frequency to ``power``); ``num_replicas``/``rank``: this
    process's DDP slice (default: torch.distributed's); ``last_batch``: "partial", "drop" or "fill".
    See EpochDataLoader about workers and DALI pipelines in the same process.
    """
    if last_batch not in LAST_BATCH_POLICIES:
        raise ValueError(f"last_batch: unknown policy {last_batch!r}; valid policies are {list(LAST_BATCH_POLICIES)}")
    labels = dataset.labels() if weighted else None
    sampler = make_sampler(len(dataset), shuffle=shuffle, seed=seed, labels=labels, weighted=weighted, power=power,
                           num_samples=num_samples, num_replicas=num_replicas, rank=rank)
    extra = {}
    if num_workers > 0:
        extra = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor,
                 "multiprocessing_context": multiprocessing_context}
    return EpochDataLoader(dataset, batch_sampler=EpochBatchSampler(sampler, batch_size, last_batch),
                           num_workers=num_workers, collate_fn=collate_dicts, pin_memory=pin_memory, **extra)
