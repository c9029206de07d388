"""The DALI loading path: the same batch dicts as ManifestDataset + build_torch_loader, decoded by NVIDIA DALI.

    loader = build_dali_loader("data/synth/manifest.csv", batch_size=32, shuffle=True, image_size=256,
                               outputs=["rgb", "segmentation", "label", "control"], num_threads=2)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:          # {"index", "rgb", "segmentation", "label", "control"}, as the torch path
            ...

How it is built:
- The rows come from the sampler and batch sampler of the torch path (sampling.py): seeded shuffling, class-balanced
  weighted sampling, DDP sharding (``shard_id`` of ``num_shards``) and the last-batch policy are the same code, so
  both paths read the same rows in the same order.
- A Python source (``fn.external_source``) reads the files of each batch's rows as raw bytes, with the row's position
  carried along as an extra output (to look up label, latent and manifest row). Files are checked cheaply there
  (signature and end marker) so a missing, truncated or foreign file names its path and row, or is skipped with
  ``on_error: skip``.
- DALI decodes (PNG on the CPU even in "mixed" mode; JPEG on the GPU with "mixed"), resizes (nearest neighbour at
  pixel centres, as the torch path; masks always nearest), and transposes to CHW and normalises in one
  crop_mirror_normalize, which computes ``(x - mean) * float32(1 / std)``: the torch path's normalize_rgb and
  normalize_mask compute exactly that, so values derived from uint8 pixels are equal.
- CPU-only pipelines (``device_id=None``) where there is no GPU; with one (``device="gpu"``, or "auto"), decoding is
  "mixed", the rest runs on the GPU and the batch tensors are CUDA tensors (all but ``index``, the row numbers).

Parity caveats: nearest-neighbour resizing is exact for no resize and integer scale factors; at other ratios DALI's
float32 source coordinates can pick the neighbouring source row where a destination pixel centre falls exactly on a
source pixel boundary. "bilinear" RGB resizing is close (+-1 level), not exact. Segmentation PNGs must be mode L.

nvidia-dali is an optional extra (``pip install 'layoutgen[dali]'``): without it, build_dali_loader raises
DaliUnavailableError and the torch path works as before. Nothing here imports DALI until a loader is built.
"""
from __future__ import annotations

import collections
import gc
import os
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from .datasets import ManifestDataConfig, ManifestDataset, ManifestError, _where, read_image, read_segmentation
from .sampling import LAST_BATCH_POLICIES, EpochBatchSampler, distributed_world, make_sampler
from .synthetic import rgb_to_segmentation

__all__ = ["DaliUnavailableError", "DaliLoader", "build_dali_loader", "check_encoded", "dali_available",
           "live_pipelines"]

INSTALL_HINT = "pip install 'layoutgen[dali]' (the nvidia-dali-cuda130 package)"


_LOADERS: weakref.WeakSet = weakref.WeakSet()


def live_pipelines() -> int:
    """How many DALI pipelines this process holds (after collecting unreachable loaders)."""
    gc.collect()
    return sum(loader._pipe is not None for loader in list(_LOADERS))


class DaliUnavailableError(ImportError):
    """NVIDIA DALI is not installed (or cannot be imported)."""


def dali_available() -> bool:
    """True when nvidia.dali imports."""
    try:
        _import_dali()
    except DaliUnavailableError:
        return False
    return True


def _import_dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
    except ImportError as err:  # also the case of a broken install missing its libraries
        raise DaliUnavailableError(
            f"the DALI loader needs NVIDIA DALI, which is not installed ({err}); {INSTALL_HINT}, "
            f"or use the torch path (build_torch_loader), which needs nothing more") from None
    return dali, fn, types


# ----------------------------------------------------------------------------------------------------------------------
# Reading the encoded files
# ----------------------------------------------------------------------------------------------------------------------

_PNG = b"\x89PNG\r\n\x1a\n"


def check_encoded(data: bytes) -> str | None:
    """None when ``data`` looks like a complete image file DALI can decode, else the reason it does not.

    PNG: signature and a final IEND chunk; JPEG: SOI and an EOI near the end; BMP, TIFF, WebP, JPEG 2000: signature.
    """
    if len(data) < 12:
        return f"file too short ({len(data)} bytes)"
    if data.startswith(_PNG):
        return None if data[-12:-4] == b"\x00\x00\x00\x00IEND" else "truncated PNG (no IEND chunk at the end)"
    if data.startswith(b"\xff\xd8"):
        return None if b"\xff\xd9" in data[-64:] else "truncated JPEG (no end-of-image marker)"
    if data[:2] == b"BM" or data[:4] in (b"II*\x00", b"MM\x00*") or (data[:4] == b"RIFF" and data[8:12] == b"WEBP") \
            or data[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or data[:4] == b"\xffO\xffQ":
        return None
    return "not an image DALI decodes (unknown file signature)"


def _first_mode(dataset: ManifestDataset, column: str) -> str | None:
    from PIL import Image

    for path in dataset._paths[column]:
        if path is not None and os.path.isfile(path):
            try:
                with Image.open(path) as im:
                    return im.mode
            except Exception:
                continue
    return None


class _ManifestSource:
    """The external source: one epoch of batches of (encoded files per column..., position) lists."""

    def __init__(self, loader: DaliLoader):
        # weakly: the pipeline holds the source, so a strong reference would make a loader-pipeline cycle that only
        # the garbage collector frees (and a live pipeline makes forking unsafe)
        self.loader = weakref.proxy(loader)
        self.batches: Iterator[list[int]] | None = None
        self.in_flight: collections.deque[list[int]] = collections.deque()

    def __iter__(self) -> _ManifestSource:
        self.batches = None  # drawn at the first __next__, so a set_epoch made after the reset still counts
        self.in_flight.clear()
        return self

    def __next__(self) -> tuple[list[np.ndarray], ...]:
        loader = self.loader
        if self.batches is None:
            self.batches = iter(loader.batch_sampler)
        while True:
            positions = next(self.batches)  # StopIteration at the end of the epoch
            columns: list[list[np.ndarray]] = [[] for _ in loader.columns]
            kept = []
            for pos in positions:
                encoded = self._read_row(pos)
                if encoded is None:
                    continue
                for out, data in zip(columns, encoded):
                    out.append(data)
                kept.append(pos)
            if kept:
                self.in_flight.append(kept)
                return (*columns, [np.array(pos, dtype=np.int64) for pos in kept])

    def _read_row(self, pos: int) -> list[np.ndarray] | None:
        dataset, row = self.loader.dataset, int(self.loader.dataset.rows[pos])
        encoded = []
        for column in self.loader.columns:
            path = dataset.path(column, pos)
            try:
                if path is None:
                    raise ManifestError(f"empty {column} in manifest row {row} (line {row + 2})")
                try:
                    with open(path, "rb") as fh:
                        data = fh.read()
                except OSError as err:
                    raise ManifestError(f"cannot read image {_where(path, row)}: {err}") from None
                problem = check_encoded(data)
                if problem:
                    raise ManifestError(f"cannot decode image {_where(path, row)}: {problem}")
            except ManifestError as err:
                if dataset.on_error != "skip":
                    raise
                self.loader._count_skip(err)
                return None
            encoded.append(np.frombuffer(data, dtype=np.uint8))
        return encoded


# ----------------------------------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------------------------------


class DaliLoader:
    """Iterates batch dicts decoded by a DALI pipeline; one pass of ``for batch in loader`` is one epoch."""

    def __init__(self, dataset: ManifestDataset, batch_sampler: EpochBatchSampler, num_threads: int = 2,
                 device: str = "auto", device_id: int | None = None, prefetch: int = 2, seed: int = 0):
        self._dali = _import_dali()
        self.dataset, self.batch_sampler = dataset, batch_sampler
        self.num_threads, self.prefetch, self.seed = int(num_threads), int(prefetch), int(seed)
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device: {device!r}; choose 'auto', 'cpu' or 'gpu'")
        if device == "auto":
            device = "gpu" if torch.cuda.is_available() else "cpu"
        if device == "gpu":
            if not torch.cuda.is_available():
                raise ValueError("device='gpu' needs CUDA; use device='cpu' (a CPU-only DALI pipeline)")
            device_id = torch.cuda.current_device() if device_id is None else int(device_id)
        self.device, self.device_id = device, (device_id if device == "gpu" else None)

        outputs = dataset.outputs
        columns = []
        if "rgb" in outputs or dataset.seg_from_palette:
            columns.append("layout_path")
        if "segmentation" in outputs and not dataset.seg_from_palette:
            columns.append("seg_path")
            mode = _first_mode(dataset, "seg_path")
            if mode not in (None, "L"):
                raise ManifestError(f"the DALI loader reads segmentation PNGs of mode L (class indices); "
                                    f"{dataset.manifest_path} has mode {mode}: use the torch path")
        if "control" in outputs:
            if any(p is None for p in dataset._paths["control_path"]):
                raise ManifestError(f"the DALI loader needs a control_path in every row of {dataset.manifest_path}; "
                                    f"filter the rows or use the torch path")
            columns.append("control_path")
        self.columns = columns
        self._runtime_skips = 0
        self._pipe = None
        self._state = "new"
        self._source: _ManifestSource | None = None

    # -- pipeline ------------------------------------------------------------------------------------------------------

    def _build(self):
        dali, fn, types = self._dali
        ds, size = self.dataset, self.dataset.image_size
        decode_device = "mixed" if self.device == "gpu" else "cpu"
        source = _ManifestSource(self)

        def resize(image, interp):
            if size is None:
                return image
            return fn.resize(image, resize_x=size, resize_y=size, interp_type=interp,
                             antialias=interp != types.INTERP_NN)

        @dali.pipeline_def(batch_size=self.batch_sampler.batch_size, num_threads=self.num_threads,
                           device_id=self.device_id, prefetch_queue_depth=self.prefetch, seed=self.seed,
                           exec_dynamic=True)
        def graph():
            encoded = fn.external_source(source=source, num_outputs=len(self.columns) + 1, batch=True,
                                         cycle="raise", dtype=[types.UINT8] * len(self.columns) + [types.INT64])
            files = dict(zip(self.columns, encoded[:-1]))
            outs = {"position": encoded[-1]}
            if "layout_path" in files:
                image = fn.decoders.image(files["layout_path"], device=decode_device, output_type=types.RGB)
                if "rgb" in ds.outputs:
                    interp = types.INTERP_LINEAR if ds.interpolation == "bilinear" else types.INTERP_NN
                    # One fused op for HWC -> CHW and normalisation (a separate transpose costs a third of the
                    # throughput); normalize_rgb in the torch path computes the same float32 operations.
                    outs["rgb"] = fn.crop_mirror_normalize(resize(image, interp), mean=127.5, std=127.5,
                                                           output_layout="CHW", dtype=types.FLOAT)
                if ds.seg_from_palette:
                    outs["rgb_hwc"] = resize(image, types.INTERP_NN)
            if "seg_path" in files:
                seg = fn.decoders.image(files["seg_path"], device=decode_device, output_type=types.ANY_DATA)
                seg = fn.squeeze(resize(seg, types.INTERP_NN), axes=[2])
                outs["segmentation"] = fn.cast(seg, dtype=types.INT64)
            if "control_path" in files:
                control = fn.decoders.image(files["control_path"], device=decode_device, output_type=types.GRAY)
                outs["control"] = fn.crop_mirror_normalize(resize(control, types.INTERP_NN), mean=0.0, std=255.0,
                                                           output_layout="CHW", dtype=types.FLOAT)
            self._names = list(outs)
            return tuple(outs.values())

        pipe = graph()
        pipe.build()
        self._pipe, self._source, self._state = pipe, source, "new"
        _LOADERS.add(self)

    def _to_torch(self, name: str, tensor_list) -> torch.Tensor:
        try:
            tensor = tensor_list.as_tensor()
        except RuntimeError:
            raise ValueError(f"DALI loader: {name!r} images differ in size within a batch of "
                             f"{self.dataset.manifest_path}; set image_size to resize them to one size") from None
        from nvidia.dali.backend import TensorGPU

        if isinstance(tensor, TensorGPU):
            from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

            out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype],
                              device=torch.device("cuda", self.device_id))
            feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(self.device_id))
            return out
        # Zero-copy: with the dynamic executor (exec_dynamic=True) an output buffer stays alive and untouched while
        # anything references it, and the DLPack capsule holds such a reference. A copy here (np.array) would cost
        # about as much as decoding the batch.
        return torch.from_dlpack(tensor)

    def _batch(self, outputs) -> dict[str, Any]:
        tensors = {name: self._to_torch(name, out) for name, out in zip(self._names, outputs)}
        positions = tensors.pop("position").reshape(-1).numpy()
        if self._source is not None and self._source.in_flight:
            self._source.in_flight.popleft()
        ds = self.dataset
        batch: dict[str, Any] = {"index": torch.from_numpy(ds.rows[positions].copy())}
        if "rgb" in ds.outputs:
            batch["rgb"] = tensors["rgb"]
        if "segmentation" in ds.outputs:
            if ds.seg_from_palette:
                batch["segmentation"] = rgb_to_segmentation(tensors["rgb_hwc"])
            else:
                batch["segmentation"] = tensors["segmentation"]
        if "label" in ds.outputs:
            batch["label"] = torch.from_numpy(ds.labels()[positions].copy())
        if "control" in ds.outputs:
            batch["control"] = tensors["control"]
        if "latent" in ds.outputs:
            latents = [ds.load_latent(int(p)) for p in positions]
            present = [lat is not None for lat in latents]
            if all(present):
                batch["latent"] = torch.stack(latents)
            elif any(present):
                first = next(lat for lat in latents if lat is not None)
                batch["latent"] = torch.stack([first.new_zeros(first.shape) if lat is None else lat
                                               for lat in latents])
                batch["has_latent"] = torch.tensor(present, dtype=torch.bool)
        if self.device == "gpu":  # everything but the row index (bookkeeping) on the pipeline's GPU
            for key in ("label", "latent", "has_latent"):
                if key in batch:
                    batch[key] = batch[key].to(f"cuda:{self.device_id}", non_blocking=True)
        return batch

    def _explain_failure(self, err: Exception) -> Exception:
        """A DALI decode error -> a ManifestError naming the first unreadable file among the batches in flight."""
        ds = self.dataset
        in_flight = list(self._source.in_flight) if self._source is not None else []
        for positions in in_flight:
            for pos in positions:
                row = int(ds.rows[pos])
                for column in self.columns:
                    try:
                        if column == "seg_path":
                            read_segmentation(ds.path(column, pos), row)
                        else:
                            read_image(ds.path(column, pos), row, "rgb" if column == "layout_path" else "mask")
                    except ManifestError as bad:
                        return bad
        rows = sorted(int(ds.rows[p]) for positions in in_flight for p in positions)
        message = " ".join(str(err).split())[:2000]
        return RuntimeError(f"DALI pipeline failed on manifest rows {rows[:32]} of {ds.manifest_path}: {message}")

    # -- public API ----------------------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle (and redraw the weighted sample) for ``epoch``; call before iterating, as with DDP samplers."""
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    @property
    def num_skipped(self) -> int:
        """Rows skipped with on_error=skip: missing at construction plus unreadable when read."""
        return len(self.dataset.skipped) + self._runtime_skips

    def _count_skip(self, err: Exception) -> None:
        import warnings

        self._runtime_skips += 1
        warnings.warn(f"on_error=skip: skipping a row: {err}", stacklevel=3)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # _state: "new" (no pipeline, or just built), "ended" (an epoch ran to its end: reset() restarts the source),
        # "running" (an epoch in progress or abandoned half-way, or failed: a new pipeline is the safe restart).
        if self._pipe is None or self._state == "running":
            self.close()
            self._build()
        elif self._state == "ended":
            self._pipe.reset()
        self._state = "running"
        while True:
            try:
                outputs = self._pipe.run()
            except StopIteration:
                self._state = "ended"
                return
            except ManifestError:
                raise
            except Exception as err:
                raise self._explain_failure(err) from None
            yield self._batch(outputs)

    def close(self) -> None:
        """Frees the pipeline (and its threads); the next iteration builds a new one."""
        if self._pipe is not None:
            self._pipe = self._source = None
            _LOADERS.discard(self)

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass


def build_dali_loader(manifest: str | os.PathLike | ManifestDataset | ManifestDataConfig | Mapping[str, Any],
                      batch_size: int, shuffle: bool = True, *, seed: int = 0, shard_id: int | None = None,
                      num_shards: int | None = None, last_batch: str = "partial", weighted: bool | None = None,
                      power: float | None = None, num_samples: int | None = None, num_threads: int = 2,
                      device: str = "auto", device_id: int | None = None, prefetch: int = 2,
                      **dataset_kwargs: Any) -> DaliLoader:
    """A DALI loader over a manifest, yielding the batch dicts of the torch path for the same rows.

    Args:
        manifest: a manifest path (``dataset_kwargs`` go to ManifestDataset: outputs, image_size, non_empty, split,
            on_error, ...), a ManifestDataConfig or its dict (weighted_sampling and sampling_power are used too), or
            a ManifestDataset.
        batch_size: rows per batch (before skipped rows).
        shuffle: reshuffle every epoch (seeded by ``seed`` and the epoch given to ``set_epoch``).
        shard_id, num_shards: this process's DDP shard (default: torch.distributed's rank and world size).
        last_batch: "partial", "drop" or "fill" (see EpochBatchSampler).
        weighted, power, num_samples: class-balanced sampling (as build_torch_loader).
        num_threads: DALI CPU threads. device: "auto" (GPU when CUDA is available), "cpu" or "gpu".
        device_id: the GPU (default: the current one); prefetch: batches decoded ahead.
    """
    _import_dali()  # fail first, and clearly, when DALI is missing
    if isinstance(manifest, ManifestDataset):
        if dataset_kwargs:
            raise ValueError(f"dataset options {sorted(dataset_kwargs)} cannot be applied to an existing "
                             f"ManifestDataset")
        dataset = manifest
    elif isinstance(manifest, (ManifestDataConfig, Mapping)):
        config = ManifestDataConfig.from_dict(manifest)
        weighted = config.weighted_sampling if weighted is None else weighted
        power = config.sampling_power if power is None else power
        dataset = ManifestDataset.from_config(config, **dataset_kwargs)
    else:
        dataset = ManifestDataset(manifest, **dataset_kwargs)
    if last_batch not in LAST_BATCH_POLICIES:
        raise ValueError(f"last_batch: unknown policy {last_batch!r}; valid policies are {list(LAST_BATCH_POLICIES)}")
    num_shards, shard_id = distributed_world(num_shards, shard_id)
    weighted = bool(weighted)
    sampler = make_sampler(len(dataset), shuffle=shuffle, seed=seed, labels=dataset.labels() if weighted else None,
                           weighted=weighted, power=1.0 if power is None else power, num_samples=num_samples,
                           num_replicas=num_shards, rank=shard_id)
    return DaliLoader(dataset, EpochBatchSampler(sampler, batch_size, last_batch), num_threads=num_threads,
                      device=device, device_id=device_id, prefetch=prefetch, seed=seed)

