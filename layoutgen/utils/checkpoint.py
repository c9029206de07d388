"""Checkpoint files: safetensors with a checksum, written atomically, loaded without executing code.

A layoutgen checkpoint is one safetensors file: the tensors, and string metadata holding the model class, its config
as JSON, the package version, a SHA-256 over every tensor's name, dtype, shape and bytes, and a SHA-256 over the other
metadata (the config above all). safetensors cannot carry code, and the checksums catch a file whose tensor bytes or
stored config were altered or cut short after it was written (files from before the metadata checksum carry the
tensor one only, and are checked against that).

Plain PyTorch state dicts (`.pt`, `.pth`, `.ckpt`) can be read too, with `torch.load(weights_only=True)`, which
refuses any pickle that would build arbitrary objects.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from collections.abc import Mapping

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from layoutgen.utils.atomic import atomic_write_bytes

FORMAT_NAME = "layoutgen.checkpoint"
FORMAT_VERSION = "1"
CHECKSUM_KEY = "tensor_sha256"
METADATA_CHECKSUM_KEY = "metadata_sha256"
# A safetensors header larger than this is certainly not one of ours (and guards against a huge allocation).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: not found, truncated, tampered with, or not matching the model."""


def tensor_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def metadata_checksum(metadata: Mapping[str, str]) -> str:
    """SHA-256 over every (key, value) of the metadata in key order, the metadata checksum itself aside."""
    items = sorted((k, v) for k, v in metadata.items() if k != METADATA_CHECKSUM_KEY)
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def save_checkpoint_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                         metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` and string `metadata` to a safetensors file, atomically, with a checksum."""
    # safetensors wants contiguous CPU tensors; channels_last conv weights are not contiguous.
    plain = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    for key, value in (metadata or {}).items():
        if not isinstance(value, str):
            raise TypeError(f"checkpoint metadata {key!r} must be a string, got {type(value).__name__}")
        meta[key] = value
    meta[CHECKSUM_KEY] = tensor_checksum(plain)
    meta[METADATA_CHECKSUM_KEY] = metadata_checksum(meta)
    atomic_write_bytes(path, safetensors_save(plain, metadata=meta))


def read_safetensors_metadata(data: bytes, path: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header; CheckpointError if the header is not valid."""
    if len(data) < 8:
        raise CheckpointError(f"{path}: not a safetensors checkpoint (file is {len(data)} bytes, too short)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise CheckpointError(f"{path}: not a safetensors checkpoint, or truncated "
                              f"(header claims {header_len} bytes, file has {len(data)})")
    try:
        header = json.loads(data[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a safetensors checkpoint (unreadable header: {err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors checkpoint (header is not a mapping)")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: safetensors metadata is not a mapping")
    return metadata


def load_checkpoint_file(path: str | os.PathLike, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reads a checkpoint: (tensors on the CPU, metadata). Never unpickles arbitrary objects.

    safetensors files are checked against their checksums when they carry them (`verify=False` skips that). Files ending
    in .pt/.pth/.ckpt/.bin are read with torch.load(weights_only=True) and must hold a flat mapping of tensors (or
    {"state_dict": ...}); their metadata is empty.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith((".pt", ".pth", ".ckpt", ".bin")):
        return _load_torch_state(path), {}
    with open(path, "rb") as fh:
        data = fh.read()
    metadata = read_safetensors_metadata(data, path)
    try:
        tensors = safetensors_load(data)
    except Exception as err:  # safetensors raises its own error type for every malformed file
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from None
    expected = metadata.get(CHECKSUM_KEY)
    if verify and expected is not None and tensor_checksum(tensors) != expected:
        raise CheckpointError(f"{path}: checksum mismatch: the tensor data was modified or damaged after saving")
    expected = metadata.get(METADATA_CHECKSUM_KEY)
    if verify and expected is not None and metadata_checksum(metadata) != expected:
        raise CheckpointError(f"{path}: metadata checksum mismatch: the stored config or other metadata was modified "
                              f"after saving")
    return tensors, metadata


def _load_torch_state(path: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused to load: the pickle holds more than plain tensors and "
                              f"weights_only loading does not execute code ({str(err).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch file ({err})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors")
    return dict(obj)
