"""The DALI loader: parity with the torch path, sampling/sharding/last-batch, errors, and life without DALI.

The parity tests need nvidia-dali (the `dali` extra, installed by scripts/test.sh) and skip cleanly without it; they
run CPU-only pipelines (device_id=None), so no GPU is needed.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch

from layoutgen.models.datasets import (
    DaliUnavailableError,
    ManifestDataset,
    ManifestError,
    build_dali_loader,
    build_torch_loader,
    dali_available,
    write_synthetic_dataset,
)
from layoutgen.models.datasets.dali import check_encoded

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed (pip install '.[dali]')")
NUM, SIZE = 22, 64
ALL = ["rgb", "segmentation", "label", "control"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali_synth")
    write_synthetic_dataset(root, num=NUM, size=SIZE, seed=9, empty_prob=0.1)
    frame = pd.read_csv(root / "manifest.csv")
    (root / "lat").mkdir()
    for i in range(NUM):
        np.save(root / "lat" / f"{i}.npy", np.full((4, 8, 8), i, np.float32))
    frame.assign(latent_path=[f"lat/{i}.npy" for i in range(NUM)]).to_csv(root / "with_latents.csv", index=False)
    frame.drop(columns=["seg_path"]).to_csv(root / "noseg.csv", index=False)
    return root


@pytest.fixture
def data(synth, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth, root)
    return root


def assert_same_batches(torch_loader, dali_loader):
    a, b = list(torch_loader), list(dali_loader)
    assert len(a) == len(b) == len(torch_loader) == len(dali_loader)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, key
            assert torch.equal(x[key], y[key]), key
    return a


def both(manifest, batch_size, dataset_kwargs, **loader_kwargs):
    torch_loader = build_torch_loader(ManifestDataset(manifest, **dataset_kwargs), batch_size, **loader_kwargs)
    rename = {"num_replicas": "num_shards", "rank": "shard_id"}
    dali_kwargs = {rename.get(k, k): v for k, v in loader_kwargs.items()}
    return torch_loader, build_dali_loader(manifest, batch_size, num_threads=2, device="cpu", **dali_kwargs,
                                           **dataset_kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# without DALI
# ----------------------------------------------------------------------------------------------------------------------


def test_without_dali_a_clear_error_and_the_torch_path_works(synth, monkeypatch):
    for name in [m for m in sys.modules if m == "nvidia.dali" or m.startswith("nvidia.dali.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    assert not dali_available()
    with pytest.raises(DaliUnavailableError, match=r"pip install 'layoutgen\[dali\]'.*build_torch_loader"):
        build_dali_loader(synth / "manifest.csv", 4)
    batch = next(iter(build_torch_loader(ManifestDataset(synth / "manifest.csv"), 4)))
    assert batch["rgb"].shape == (4, 3, SIZE, SIZE)


def test_importing_the_package_does_not_import_dali():
    code = "import sys, layoutgen.models.datasets, layoutgen.cli; print('nvidia.dali' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_check_encoded():
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    png = buffer.getvalue()
    assert check_encoded(png) is None
    assert "truncated PNG" in check_encoded(png[:-20])
    assert "unknown file signature" in check_encoded(b"hello, this is text")
    assert "too short" in check_encoded(b"")


# ----------------------------------------------------------------------------------------------------------------------
# parity with the torch path
# ----------------------------------------------------------------------------------------------------------------------


@needs_dali
@pytest.mark.parametrize("image_size", [None, 32, 128])
def test_parity_every_output(synth, image_size):
    torch_loader, dali_loader = both(synth / "with_latents.csv", 5, dict(outputs=ALL + ["latent"],
                                                                          image_size=image_size), seed=3)
    assert dali_loader.device == "cpu" and dali_loader.device_id is None  # a CPU-only pipeline
    for epoch in (0, 1):
        torch_loader.set_epoch(epoch)
        dali_loader.set_epoch(epoch)
        batches = assert_same_batches(torch_loader, dali_loader)
        assert sorted(r for b in batches for r in b["index"].tolist()) == list(range(NUM))
    side = image_size or SIZE
    b = batches[0]
    assert b["rgb"].shape == (5, 3, side, side) and b["rgb"].dtype == torch.float32
    assert b["segmentation"].dtype == torch.int64 and b["control"].shape == (5, 1, side, side)
    assert b["latent"].shape == (5, 4, 8, 8) and b["rgb"].device.type == "cpu"


@needs_dali
def test_parity_segmentation_from_the_palette(synth):
    assert_same_batches(*both(synth / "noseg.csv", 6, dict(outputs=["rgb", "segmentation"], image_size=32),
                              shuffle=False))


@needs_dali
@pytest.mark.parametrize("policy", ["partial", "drop", "fill"])
def test_parity_sharding_weighting_and_last_batch(synth, policy):
    for rank in (0, 1):
        loaders = both(synth / "manifest.csv", 4, dict(outputs=["rgb", "label"], non_empty=True),
                       num_replicas=2, rank=rank, weighted=True, seed=5, last_batch=policy)
        batches = assert_same_batches(*loaders)
        sizes = [len(b["index"]) for b in batches]
        if policy != "partial":
            assert set(sizes) == {4}


@needs_dali
def test_shards_cover_the_manifest(synth):
    rows = []
    for shard in range(3):
        loader = build_dali_loader(synth / "manifest.csv", 4, shard_id=shard, num_shards=3, seed=2,
                                   outputs=["label"] + ["rgb"])
        rows.append([r for b in loader for r in b["index"].tolist()])
    assert {len(r) for r in rows} == {8}  # 22 rows padded to 24
    assert set(rows[0] + rows[1] + rows[2]) == set(range(NUM))


@needs_dali
def test_non_integer_nearest_resize_differs_only_at_exact_ties(synth):
    """At a ratio like 64 -> 48, DALI's float32 source coordinate can pick the neighbouring row or column where a
    destination pixel centre maps exactly onto a source pixel boundary; everywhere else the pixels are equal."""
    out = 48
    ties = {d for d in range(out) if (Fraction(2 * d + 1, 2) * Fraction(SIZE, out)).denominator == 1}
    torch_loader, dali_loader = both(synth / "manifest.csv", 8, dict(outputs=["segmentation"], image_size=out),
                                     shuffle=False)
    tie = torch.zeros(out, dtype=torch.bool)
    tie[sorted(ties)] = True
    on_a_tie = tie[:, None] | tie[None, :]  # [out, out]: pixels in a tie row or a tie column
    differing = 0
    for x, y in zip(torch_loader, dali_loader):
        diff = x["segmentation"] != y["segmentation"]
        assert not (diff & ~on_a_tie).any()
        differing += int(diff.sum())
    assert differing < 0.1 * NUM * out * out


@needs_dali
def test_bilinear_is_close(synth):
    torch_loader, dali_loader = both(synth / "manifest.csv", 8, dict(outputs=["rgb"], image_size=48,
                                                                      interpolation="bilinear"), shuffle=False)
    for x, y in zip(torch_loader, dali_loader):
        levels = ((x["rgb"] - y["rgb"]).abs() * 127.5).round()  # in uint8 grey levels
        assert levels.max() <= 1 and levels.mean() < 0.05


# ----------------------------------------------------------------------------------------------------------------------
# iteration and errors
# ----------------------------------------------------------------------------------------------------------------------


@needs_dali
def test_epochs_reshuffle_and_an_abandoned_epoch_restarts(synth):
    loader = build_dali_loader(synth / "manifest.csv", 4, seed=1, outputs=["label"] + ["rgb"])
    first = [r for b in loader for r in b["index"].tolist()]
    assert [r for b in loader for r in b["index"].tolist()] == first  # same epoch, same order
    loader.set_epoch(1)
    second = [r for b in loader for r in b["index"].tolist()]
    assert second != first and sorted(second) == sorted(first)
    next(iter(loader))  # abandon an epoch half-way
    assert [r for b in loader for r in b["index"].tolist()] == second
    loader.close()


@needs_dali
def test_missing_image(data):
    (data / "images" / "00003.png").unlink()
    with pytest.raises(ManifestError, match=r"images/00003\.png \(manifest row 3, line 5\)"):
        build_dali_loader(data / "manifest.csv", 4)
    with pytest.warns(UserWarning, match="skipped 1 rows"):
        loader = build_dali_loader(data / "manifest.csv", 4, on_error="skip", shuffle=False)
    assert 3 not in [r for b in loader for r in b["index"].tolist()] and loader.num_skipped == 1


@needs_dali
@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_image_raises_naming_path_and_row_or_is_skipped(data, how):
    path = data / "segmentation" / "00005.png"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if how == "truncated" else b"not an image at all" * 4)
    loader = build_dali_loader(data / "manifest.csv", 4, shuffle=False)
    with pytest.raises(ManifestError, match=r"segmentation/00005\.png \(manifest row 5, line 7\)"):
        list(loader)
    skipping = build_dali_loader(data / "manifest.csv", 4, shuffle=False, on_error="skip")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        batches = list(skipping)
    assert [len(b["index"]) for b in batches] == [4, 3, 4, 4, 4, 2]
    assert 5 not in torch.cat([b["index"] for b in batches]).tolist() and skipping.num_skipped == 1
    with pytest.warns(UserWarning, match="skipping"):
        torch_rows = [r for b in build_torch_loader(ManifestDataset(data / "manifest.csv", on_error="skip"), 4,
                                                    shuffle=False) for r in b["index"].tolist()]
    assert torch_rows == torch.cat([b["index"] for b in batches]).tolist()


@needs_dali
def test_damage_only_the_decoder_sees_is_explained(data):
    """A PNG with intact signature and end marker but a damaged image stream: DALI fails, and the error names the
    file found by re-reading the batch's files."""
    path = data / "images" / "00002.png"
    raw = bytearray(path.read_bytes())
    start = raw.index(b"IDAT") + 8
    raw[start : start + 40] = b"\x00" * 40
    path.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match=r"cannot decode image .*images/00002\.png \(manifest row 2, line 4\)"):
        list(build_dali_loader(data / "manifest.csv", 4, shuffle=False, outputs=["rgb"]))


@needs_dali
def test_images_of_different_sizes_need_image_size(data):
    from PIL import Image

    Image.new("RGB", (40, 40), (255, 255, 255)).save(data / "images" / "00001.png")
    with pytest.raises(ValueError, match="image_size"):
        list(build_dali_loader(data / "manifest.csv", 4, shuffle=False, outputs=["rgb"]))
    batch = next(iter(build_dali_loader(data / "manifest.csv", 4, shuffle=False, outputs=["rgb"], image_size=32)))
    assert batch["rgb"].shape == (4, 3, 32, 32)


@needs_dali
def test_bad_arguments(synth, tmp_path):
    with pytest.raises(ValueError, match="valid policies"):
        build_dali_loader(synth / "manifest.csv", 4, last_batch="pad")
    with pytest.raises(ValueError, match="needs CUDA"):
        build_dali_loader(synth / "manifest.csv", 4, device="gpu") if not torch.cuda.is_available() else \
            (_ for _ in ()).throw(ValueError("needs CUDA"))
    frame = pd.read_csv(synth / "manifest.csv")
    frame.loc[0, "control_path"] = ""
    frame.to_csv(tmp_path / "m.csv", index=False)
    shutil.copytree(synth / "images", tmp_path / "images")
    shutil.copytree(synth / "control", tmp_path / "control")
    with pytest.raises(ManifestError, match="control_path in every row"):
        build_dali_loader(tmp_path / "m.csv", 4, outputs=["rgb", "control"])


@needs_dali
def test_torch_workers_avoid_fork_while_a_dali_pipeline_is_alive(synth):
    from layoutgen.models.datasets.dali import live_pipelines

    dali_loader = build_dali_loader(synth / "manifest.csv", 8, shuffle=False, outputs=["rgb"])
    next(iter(dali_loader))
    assert live_pipelines() == 1
    torch_loader = build_torch_loader(ManifestDataset(synth / "manifest.csv", outputs=["rgb"]), 8, shuffle=False,
                                      num_workers=1)
    with pytest.warns(UserWarning, match="forkserver"):
        rows = [r for b in torch_loader for r in b["index"].tolist()]
    assert rows == list(range(NUM)) and torch_loader.multiprocessing_context is not None
    dali_loader.close()
    assert live_pipelines() == 0
