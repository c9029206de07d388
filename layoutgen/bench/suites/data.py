"""Data loading: the DALI pipeline against a torch DataLoader, both producing the full batch dict.

Both loaders read the same synthetic manifest (PNG layouts, segmentation and outline images, written first by the
generator) and yield {index, rgb, segmentation, label, control}: rgb float32 [B, 3, S, S] in [-1, 1], segmentation
int64, control float32 [B, 1, S, S], label int64. The DataLoader uses N worker processes (PIL decoding, persistent
workers); DALI uses as many CPU threads (a CPU-only pipeline unless device="gpu").
Samples/s is measured per epoch after a warm-up epoch, alternating the two loaders epoch by epoch so that load from
other processes on a shared machine hits both alike (`compare`: the median epoch of each and the median of the
per-round ratios). Target: DALI >= 2.5x the DataLoader with 2 workers at 512x512 on a 2-core machine.
"""
from __future__ import annotations

import os
import statistics
import time

from layoutgen.models.datasets import ManifestDataset, build_dali_loader, build_torch_loader, write_synthetic_dataset

OUTPUTS = ["rgb", "segmentation", "label", "control"]
TARGET_RATIO = 2.5


def make_data(root: str, size: int, num: int) -> str:
    """A synthetic manifest of ``num`` layouts of ``size`` pixels under ``root`` (reused when already there)."""
    folder = os.path.join(root, f"synth_{size}_{num}")
    manifest = os.path.join(folder, "manifest.csv")
    if not os.path.isfile(manifest):
        write_synthetic_dataset(folder, num=num, size=size, seed=0)
    return manifest


def epoch_rate(loader) -> float:
    start = time.perf_counter()
    count = 0
    for batch in loader:
        count += len(batch["index"])
        _ = batch["rgb"]  # the batch is complete (DALI outputs are ready once returned)
    return count / (time.perf_counter() - start)


def compare(manifest: str, workers: int, batch_size: int, rounds: int, device: str = "cpu") -> dict:
    """Alternating epochs of the torch DataLoader and the DALI loader; samples/s medians and their ratio."""
    torch_loader = build_torch_loader(ManifestDataset(manifest, outputs=OUTPUTS), batch_size, num_workers=workers,
                                      persistent_workers=workers > 0)
    epoch_rate(torch_loader)  # warm-up; forks the persistent workers before any DALI pipeline exists
    dali_loader = build_dali_loader(manifest, batch_size, outputs=OUTPUTS, num_threads=workers, device=device)
    epoch_rate(dali_loader)
    torch_rates, dali_rates = [], []
    for epoch in range(rounds):
        torch_loader.set_epoch(epoch)
        dali_loader.set_epoch(epoch)
        torch_rates.append(epoch_rate(torch_loader))
        dali_rates.append(epoch_rate(dali_loader))
    dali_loader.close()
    del torch_loader
    return {
        "torch": statistics.median(torch_rates),
        "dali": statistics.median(dali_rates),
        "ratio": statistics.median(d / t for d, t in zip(dali_rates, torch_rates)),
        "ratio_range": (min(d / t for d, t in zip(dali_rates, torch_rates)),
                        max(d / t for d, t in zip(dali_rates, torch_rates))),
    }
