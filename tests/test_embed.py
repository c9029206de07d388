"""Latent pre-embedding: values, the new manifest, resuming after a stop, skipping, and the dataset reading it."""
from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest
import torch

from layoutgen.models.autoencoder import Autoencoder
from layoutgen.models.datasets import ManifestDataset, build_torch_loader, embed_manifest, write_synthetic_dataset
from layoutgen.models.datasets.embed import latent_file_matches

NUM, SIZE = 10, 32
CODEC = dict(latent_channels=4, base_channels=8, norm_groups=4)


def tiny_autoencoder(seed=0, variational=False):
    torch.manual_seed(seed)
    return Autoencoder.from_config({
        "encoder": dict(downsampling_steps=2, variational=variational, **CODEC),
        "decoder": dict(upsampling_steps=2, heads=[{"type": "RGBHead", "name": "rgb", "out_channels": 3}], **CODEC),
    })


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_synth")
    write_synthetic_dataset(root / "data", num=NUM, size=SIZE, seed=4)
    tiny_autoencoder().save_checkpoint(root / "ae.safetensors")
    return root


def latents(out):
    """{file name: latent tensor} (safetensors does not keep the metadata's key order, so not the bytes)."""
    from safetensors.torch import load_file

    return {name: load_file(out / "latents" / name)["latent"] for name in sorted(os.listdir(out / "latents"))}


def same(a, b):
    # batches of other sizes may round differently in the last bits
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5) for k in a)


def file_ids(out):
    """(inode, mtime) of every latent file: a rewrite (atomic replace) changes the inode."""
    return {name: (os.stat(out / "latents" / name).st_ino, os.stat(out / "latents" / name).st_mtime_ns)
            for name in os.listdir(out / "latents")}


def test_embed_values_manifest_and_dataset(synth, tmp_path):
    out = tmp_path / "lat"
    summary = embed_manifest(synth / "ae.safetensors", synth / "data" / "manifest.csv", out, batch_size=4,
                             progress=False)
    assert summary["rows"] == summary["embedded"] == NUM and summary["already_embedded"] == 0
    assert summary["latent_shape"] == (4, SIZE // 4, SIZE // 4) and summary["amp"] == "none"
    frame = pd.read_csv(out / "manifest.csv")
    assert list(frame.columns) == ["layout_path", "seg_path", "control_path", "type", "is_empty", "room_count",
                                   "latent_path"]
    assert frame.latent_path[3] == "latents/000003.safetensors"
    assert frame.layout_path[3] == os.path.relpath(synth / "data" / "images" / "00003.png", out)
    # the stored latent is the frozen encoder's output for that image
    model = Autoencoder.from_checkpoint(str(synth / "ae.safetensors")).eval()
    source = ManifestDataset(synth / "data" / "manifest.csv", outputs=["rgb"])
    with torch.no_grad():
        expected = model.encode(source[3]["rgb"][None])["latent"][0]
    lat = ManifestDataset(out / "manifest.csv", outputs=["latent", "label", "rgb"])
    assert lat.latent_shape == (4, 8, 8) and torch.allclose(lat[3]["latent"], expected, atol=1e-6)
    assert torch.equal(lat[3]["rgb"], source[3]["rgb"])  # the image paths still resolve from the new folder
    assert (out / "manifest.classes.json").is_file() and lat.class_to_index == source.class_to_index
    batch = next(iter(build_torch_loader(ManifestDataset(out / "manifest.csv", outputs=["latent", "label"]), 4)))
    assert batch["latent"].shape == (4, 4, 8, 8) and batch["label"].shape == (4,)


def test_embed_resumes_where_it_stopped(synth, tmp_path):
    out = tmp_path / "lat"
    stops = []

    def stop_after_first_batch(written):
        stops.append(written)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_manifest(synth / "ae.safetensors", synth / "data" / "manifest.csv", out, batch_size=4,
                       progress=False, on_batch=stop_after_first_batch)
    assert stops == [4] and len(os.listdir(out / "latents")) == 4  # complete files only, no temporaries
    assert not (out / "manifest.csv").exists()
    first = file_ids(out)
    resumed = embed_manifest(synth / "ae.safetensors", synth / "data" / "manifest.csv", out, batch_size=4,
                             progress=False)
    assert resumed["already_embedded"] == 4 and resumed["embedded"] == NUM - 4 and resumed["rows"] == NUM
    assert all(file_ids(out)[name] == ids for name, ids in first.items())  # the first four were not rewritten
    fresh = tmp_path / "fresh"
    embed_manifest(synth / "ae.safetensors", synth / "data" / "manifest.csv", fresh, batch_size=3, progress=False)
    assert same(latents(fresh), latents(out))
    fresh_paths = pd.read_csv(fresh / "manifest.csv").latent_path.tolist()
    assert fresh_paths == pd.read_csv(out / "manifest.csv").latent_path.tolist()
    # nothing left to do; a deleted file is redone; another autoencoder redoes everything
    again = embed_manifest(synth / "ae.safetensors", synth / "data" / "manifest.csv", out, progress=False)
    assert again["embedded"] == 0 and again["already_embedded"] == NUM
    (out / "latents" / "000007.safetensors").unlink()
    assert embed_manifest(synth / "ae.safetensors", synth / "data" / "manifest.csv", out,
                          progress=False)["embedded"] == 1
    other = tiny_autoencoder(seed=1)
    assert embed_manifest(other, synth / "data" / "manifest.csv", out, progress=False)["embedded"] == NUM
    assert not latent_file_matches(str(out / "latents" / "000000.safetensors"), "images/00000.png", None, "x")


def test_embed_image_size_and_variational_mean(synth, tmp_path):
    vae = tiny_autoencoder(variational=True)
    a = embed_manifest(vae, synth / "data" / "manifest.csv", tmp_path / "a", image_size=64, progress=False)
    embed_manifest(vae, synth / "data" / "manifest.csv", tmp_path / "b", image_size=64, progress=False)
    assert a["latent_shape"] == (4, 16, 16)
    assert same(latents(tmp_path / "a"), latents(tmp_path / "b"))  # the mean, not a sample
    # a different image size is a different latent: re-embedded
    assert embed_manifest(vae, synth / "data" / "manifest.csv", tmp_path / "a", progress=False)["embedded"] == NUM


def test_embed_skips_unreadable_images_or_names_them(synth, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth / "data", data)
    (data / "images" / "00004.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"images/00004\.png \(manifest row 4, line 6\)"):
        embed_manifest(synth / "ae.safetensors", data / "manifest.csv", tmp_path / "lat", progress=False)
    with pytest.warns(UserWarning, match="skipping"):
        summary = embed_manifest(synth / "ae.safetensors", data / "manifest.csv", tmp_path / "lat",
                                 on_error="skip", progress=False)
    assert summary["rows"] == NUM - 1 and summary["skipped"] == 1
    written = pd.read_csv(tmp_path / "lat" / "manifest.csv").latent_path.tolist()
    assert "latents/000004.safetensors" not in written and len(written) == NUM - 1


def test_embed_refuses_to_overwrite_its_input(synth, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth / "data", data)
    with pytest.raises(ValueError, match="holds the input manifest"):
        embed_manifest(synth / "ae.safetensors", data / "manifest.csv", data, progress=False)
    with pytest.raises(ValueError, match="amp"):
        embed_manifest(synth / "ae.safetensors", data / "manifest.csv", tmp_path / "x", amp="fp8", progress=False)
