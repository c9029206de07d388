"""Latent pre-embedding: encode every image of a manifest once with a frozen autoencoder, so that the diffusion model
trains from latents instead of running the encoder at every step.

    layoutgen embed --autoencoder runs/ae/autoencoder.safetensors --manifest data/synth/manifest.csv --out data/lat

writes ``OUT/latents/<row>.safetensors`` (one file per manifest row, the tensor ``latent`` [C, h, w], float32) and
``OUT/manifest.csv``: the input manifest's rows with their paths rewritten relative to OUT and a ``latent_path``
column. The class map travels along (``OUT/manifest.classes.json``), so labels keep their indices.

Resuming: every latent file is written atomically (temp file + rename) and records in its metadata the image it came
from, the image size and the autoencoder's weight checksum. A second run skips the rows whose file is there and
matches; it re-encodes rows whose image, size or autoencoder changed. Stopping a run (Ctrl-C, a crash) loses at most
the batch in progress. A variational encoder stores its mean (``encode(sample=False)``).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from layoutgen.utils.atomic import atomic_write_bytes, atomic_write_text
from layoutgen.utils.checkpoint import CHECKSUM_KEY, read_safetensors_metadata, tensor_checksum

from .collate import collate_dicts
from .datasets import ManifestDataset, read_manifest, save_class_map

__all__ = ["embed_manifest", "latent_file_matches"]

LATENT_DIR = "latents"
_AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _model_and_checksum(autoencoder: Any, device: torch.device):
    from layoutgen.models.autoencoder import Autoencoder

    if isinstance(autoencoder, (str, os.PathLike)):
        path = os.fspath(autoencoder)
        model = Autoencoder.from_checkpoint(path)
        checksum = (_read_metadata(path) or {}).get(CHECKSUM_KEY) or tensor_checksum(model.state_dict())
    else:
        model = autoencoder
        checksum = tensor_checksum(model.state_dict())
    if not hasattr(model, "encode"):
        raise ValueError(f"embed: {type(model).__name__} has no encode(); expected a layoutgen Autoencoder")
    model = model.to(device)
    if hasattr(model, "freeze"):
        model.freeze()
    else:
        model.eval().requires_grad_(False)
    return model, checksum[:16]


def _read_metadata(path: str) -> dict[str, str] | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None
            (n,) = np.frombuffer(head, dtype="<u8")
            if n > 100 << 20:  # not a safetensors header
                return None
            return read_safetensors_metadata(head + fh.read(int(n)), path)
    except (OSError, ValueError):
        return None


def latent_file_matches(path: str, source: str, image_size: int | None, model_checksum: str) -> bool:
    """True when ``path`` is a complete latent file made from ``source`` at ``image_size`` by that autoencoder."""
    meta = _read_metadata(path)
    return meta is not None and meta.get("source") == source and meta.get("image_size") == str(image_size) \
        and meta.get("autoencoder") == model_checksum


def _write_latent(path: str, latent: torch.Tensor, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({"latent": latent.contiguous()}, metadata=metadata))


def _relative(path: str, start: str) -> str:
    try:
        return os.path.relpath(path, start)
    except ValueError:  # another drive on Windows
        return path


def embed_manifest(autoencoder: Any, manifest: str | os.PathLike, out_dir: str | os.PathLike, batch_size: int = 16,
                   device: str = "auto", amp: str = "auto", image_size: int | None = None, num_workers: int = 0,
                   on_error: str = "raise", progress: bool = True,
                   on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Encodes every row's layout image into ``out_dir`` (see the module docstring); returns a summary dict.

    Args:
        autoencoder: a checkpoint path or an Autoencoder.
        manifest: the input manifest (needs layout_path). out_dir: the output folder (not the manifest's own).
        batch_size: images per encoder call. device: "auto" (CUDA when available), "cpu", "cuda", "cuda:N".
        amp: "auto" (bf16 on CUDA, none on the CPU), "none", "bf16" or "fp16": autocast while encoding.
        image_size: resize images before encoding (default: as stored).
        on_error: "raise" or "skip" unreadable images (skipped rows are left out of the new manifest).
        on_batch: called with the number of rows written after every batch.
    """
    if amp not in ("auto", *_AMP):
        raise ValueError(f"amp: {amp!r}; choose one of {['auto', *_AMP]}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    amp_dtype = (torch.bfloat16 if dev.type == "cuda" else None) if amp == "auto" else _AMP[amp]
    manifest = os.fspath(manifest)
    out_dir = os.path.abspath(os.fspath(out_dir))
    out_manifest = os.path.join(out_dir, "manifest.csv")
    if os.path.abspath(manifest) == out_manifest:
        raise ValueError(f"embed: --out {out_dir} holds the input manifest; choose another folder")

    dataset = ManifestDataset(manifest, outputs=["rgb"], image_size=image_size, on_error=on_error)
    frame = read_manifest(manifest)
    model, checksum = _model_and_checksum(autoencoder, dev)

    rows = dataset.rows
    width = max(6, len(str(int(rows.max()))))
    latent_dir = os.path.join(out_dir, LATENT_DIR)
    os.makedirs(latent_dir, exist_ok=True)
    sources = [str(frame["layout_path"].iloc[int(r)]) for r in rows]
    targets = [os.path.join(latent_dir, f"{int(r):0{width}d}.safetensors") for r in rows]
    pending = [i for i in range(len(rows)) if not latent_file_matches(targets[i], sources[i], image_size, checksum)]
    done_before = len(rows) - len(pending)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(rows), initial=done_before, disable=not progress, unit="img", desc="embed")
    loader = DataLoader(Subset(dataset, pending), batch_size=int(batch_size), num_workers=num_workers,
                        collate_fn=collate_dicts)
    written, shape = 0, None
    position_of_row = {int(r): i for i, r in enumerate(rows)}
    autocast = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    try:
        with torch.inference_mode():
            for batch in loader:
                if not batch:  # every row of the batch was skipped
                    continue
                with autocast:
                    encoded = model.encode(batch["rgb"].to(dev, non_blocking=True), sample=False)
                latents = encoded["latent"].float().cpu()
                shape = tuple(latents.shape[1:])
                for row, latent in zip(batch["index"].tolist(), latents):
                    i = position_of_row[row]
                    _write_latent(targets[i], latent, {"source": sources[i], "image_size": str(image_size),
                                                       "autoencoder": checksum, "row": str(row)})
                written += len(latents)
                bar.update(len(latents))
                if on_batch is not None:
                    on_batch(written)
    finally:
        bar.close()

    # The new manifest: rows with a latent (all of them unless some were skipped), paths relative to out_dir.
    ok = [i for i in range(len(rows)) if os.path.isfile(targets[i])]
    out = frame.iloc[[int(rows[i]) for i in ok]].copy()
    source_root = os.path.dirname(os.path.abspath(manifest))
    for column in out.columns:
        if column.endswith("_path") and column != "latent_path":
            out[column] = [value if not isinstance(value, str) or not value.strip() else
                           _relative(value if os.path.isabs(value) else os.path.join(source_root, value), out_dir)
                           for value in out[column].tolist()]
    out["latent_path"] = [_relative(targets[i], out_dir) for i in ok]
    atomic_write_text(out_manifest, out.to_csv(index=False))
    if dataset.class_to_index:
        save_class_map(os.path.join(out_dir, "manifest.classes.json"), dataset.class_to_index)
    if shape is None and ok:
        from .datasets import load_latent

        shape = tuple(load_latent(targets[ok[0]]).shape)
    return {"manifest": out_manifest, "rows": len(ok), "embedded": written, "already_embedded": done_before,
            "skipped": dataset.num_skipped, "latent_shape": shape, "device": str(dev),
            "amp": "none" if amp_dtype is None else str(amp_dtype).replace("torch.", "")}
