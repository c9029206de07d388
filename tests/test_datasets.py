"""ManifestDataset: parsing, outputs, class map, filters, split, latents, the torch loader and every bad input."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from layoutgen.models.datasets import (
    LAYOUT_TYPES,
    PALETTE,
    ManifestDataConfig,
    ManifestDataset,
    ManifestError,
    SyntheticLayoutDataset,
    build_torch_loader,
    collate_dicts,
    generate_layouts,
    load_latent,
    rgb_to_segmentation,
    write_synthetic_dataset,
)
from layoutgen.models.datasets.datasets import normalize_rgb

NUM, SIZE, SEED = 24, 64, 5
ALL = ["rgb", "segmentation", "label", "control"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, num=NUM, size=SIZE, seed=SEED, empty_prob=0.2)
    return root


@pytest.fixture
def data(synth, tmp_path):
    """A private copy (tests edit files and manifests)."""
    root = tmp_path / "data"
    shutil.copytree(synth, root)
    return root


def manifest_of(root):
    return root / "manifest.csv"


def edit_manifest(root, fn, name="manifest.csv"):
    frame = pd.read_csv(root / "manifest.csv")
    frame = fn(frame)
    frame.to_csv(root / name, index=False)
    return root / name


# ----------------------------------------------------------------------------------------------------------------------
# outputs and values
# ----------------------------------------------------------------------------------------------------------------------


def test_default_outputs_and_values_match_the_generator(synth):
    ds = ManifestDataset(manifest_of(synth))
    assert ds.outputs == ("rgb", "segmentation", "label") and len(ds) == NUM
    layouts = generate_layouts(NUM, size=SIZE, seed=SEED, empty_prob=0.2)
    for i in range(NUM):
        s = ds[i]
        assert set(s) == {"index", "rgb", "segmentation", "label"}
        assert s["rgb"].dtype == torch.float32 and s["rgb"].shape == (3, SIZE, SIZE)
        assert -1.0 <= s["rgb"].min() and s["rgb"].max() <= 1.0
        assert s["segmentation"].dtype == torch.int64 and s["segmentation"].shape == (SIZE, SIZE)
        assert int(s["index"]) == i
        np.testing.assert_array_equal(s["segmentation"].numpy(), layouts[i].segmentation)
        # the RGB is the palette colour of the segmentation, exactly
        u8 = torch.from_numpy(PALETTE[layouts[i].segmentation]).permute(2, 0, 1)
        assert torch.equal(s["rgb"], normalize_rgb(u8))
        assert int(s["label"]) == LAYOUT_TYPES.index(layouts[i].layout_type)


def test_rgb_matches_the_synthetic_dataset_within_one_ulp(synth):
    ds = ManifestDataset(manifest_of(synth), outputs=ALL)
    ref = SyntheticLayoutDataset(NUM, size=SIZE, seed=SEED, empty_prob=0.2)
    for i in (0, 3, 7):
        a, b = ds[i], ref[i]
        assert torch.allclose(a["rgb"], b["rgb"], rtol=0, atol=1.2e-7)
        assert torch.equal(a["segmentation"], b["segmentation"])
        assert torch.equal(a["control"], b["control"]) and a["control"].shape == (1, SIZE, SIZE)
        assert torch.equal(a["label"], b["label"])


def test_every_uint8_value_normalises_into_minus_one_one():
    x = torch.arange(256, dtype=torch.uint8)
    y = normalize_rgb(x)
    assert y[0] == -1.0 and y[255] == 1.0 and torch.all(y[1:] > y[:-1])
    assert torch.allclose(y, x.float() / 127.5 - 1, rtol=0, atol=1.2e-7)


def test_relative_and_absolute_paths(data, tmp_path):
    absolute = edit_manifest(data, lambda f: f.assign(
        layout_path=[str(data / p) for p in f.layout_path], seg_path=[str(data / p) for p in f.seg_path]), "abs.csv")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(str(absolute), moved / "abs.csv")
    a, b = ManifestDataset(manifest_of(data)), ManifestDataset(moved / "abs.csv")
    for i in (0, 5):
        assert all(torch.equal(a[i][k], b[i][k]) for k in a[i])


def test_segmentation_from_the_palette_without_a_seg_column(data):
    path = edit_manifest(data, lambda f: f.drop(columns=["seg_path"]), "noseg.csv")
    no_seg = ManifestDataset(path, outputs=["rgb", "segmentation"])
    assert no_seg.seg_from_palette
    assert ManifestDataset(path).outputs == ("rgb", "label")  # by default only where the manifest allows
    with_seg = ManifestDataset(manifest_of(data), outputs=["segmentation"])
    for i in range(6):
        assert torch.equal(no_seg[i]["segmentation"], with_seg[i]["segmentation"])
    resized = ManifestDataset(path, outputs=["rgb", "segmentation"], image_size=32)[2]
    assert torch.equal(resized["segmentation"], rgb_to_segmentation(resized["rgb"]))


@pytest.mark.parametrize("size", [32, 48, 96])
def test_resize_nearest_keeps_classes_and_colours(synth, size):
    ds = ManifestDataset(manifest_of(synth), outputs=ALL, image_size=size)
    s = ds[1]
    assert s["rgb"].shape == (3, size, size) and s["segmentation"].shape == (size, size)
    assert s["control"].shape == (1, size, size)
    # nearest: every pixel keeps a palette colour and stays consistent with the resized segmentation
    assert torch.equal(rgb_to_segmentation(s["rgb"]), s["segmentation"])
    assert set(torch.unique(s["control"]).tolist()) <= {0.0, 1.0}
    if size == 32:  # an integer factor picks every second pixel centre
        full = ManifestDataset(manifest_of(synth), outputs=["segmentation"])[1]["segmentation"]
        assert torch.equal(s["segmentation"], full[1::2, 1::2])


def test_bilinear_rgb_resize(synth):
    s = ManifestDataset(manifest_of(synth), outputs=["rgb", "segmentation"], image_size=32,
                        interpolation="bilinear")[1]
    assert s["rgb"].shape == (3, 32, 32) and -1 <= s["rgb"].min() and s["rgb"].max() <= 1
    assert s["segmentation"].shape == (32, 32)  # masks stay nearest


# ----------------------------------------------------------------------------------------------------------------------
# class map, filters, split
# ----------------------------------------------------------------------------------------------------------------------


def test_class_map_is_saved_and_stable(data):
    ds = ManifestDataset(manifest_of(data))
    saved = json.loads((data / "manifest.classes.json").read_text())
    assert saved["class_to_index"] == {t: i for i, t in enumerate(LAYOUT_TYPES)} == ds.class_to_index
    # custom types: sorted, saved, and a saved map wins over a rebuilt one
    custom = edit_manifest(data, lambda f: f.assign(type=["z" if i % 3 else "a" for i in range(len(f))]), "c.csv")
    assert ManifestDataset(custom).class_to_index == {"a": 0, "z": 1}
    (data / "c.classes.json").write_text(json.dumps({"class_to_index": {"z": 0, "a": 1}}))
    ds = ManifestDataset(custom)
    assert ds.class_to_index == {"z": 0, "a": 1} and int(ds[1]["label"]) == 0
    # a type the saved map lacks is an error naming it
    (data / "c.classes.json").write_text(json.dumps({"class_to_index": {"z": 0}}))
    with pytest.raises(ManifestError, match=r"\['a'\].*class map"):
        ManifestDataset(custom)
    assert ManifestDataset(custom, class_map={"a": 0, "z": 1}).class_to_index == {"a": 0, "z": 1}


def test_filters(synth):
    frame = pd.read_csv(manifest_of(synth))
    ds = ManifestDataset(manifest_of(synth), non_empty=True)
    assert len(ds) == int((~frame.is_empty).sum()) and 0 < len(ds) < NUM
    assert not frame.is_empty.iloc[ds.rows].any()
    house = ManifestDataset(manifest_of(synth), types=["house"])
    assert set(frame.type.iloc[house.rows]) == {"house"}
    rooms = ManifestDataset(manifest_of(synth), query="room_count >= 6 and not is_empty")
    assert (frame.room_count.iloc[rooms.rows] >= 6).all()
    assert "query=" in rooms.report() and "non_empty" in ds.report()
    with pytest.raises(ManifestError, match="not in manifest"):
        ManifestDataset(manifest_of(synth), types=["castle"])
    with pytest.raises(ManifestError, match="query"):
        ManifestDataset(manifest_of(synth), query="no_such_column > 1")


def test_split_is_deterministic_stratified_and_independent_of_filters(tmp_path):
    root = tmp_path / "big"
    root.mkdir()
    types = ["apartment"] * 60 + ["house"] * 25 + ["studio"] * 10 + ["office"] * 5
    pd.DataFrame({"layout_path": ["x.png"] * 100, "type": types, "is_empty": [i % 7 == 0 for i in range(100)]}
                 ).to_csv(root / "m.csv", index=False)
    Image.new("RGB", (32, 32)).save(root / "x.png")
    kw = dict(val_fraction=0.2, split_seed=3)
    train, val = (ManifestDataset(root / "m.csv", split=s, **kw) for s in ("train", "val"))
    assert len(train) + len(val) == 100 and not set(train.rows) & set(val.rows)
    counts = {t: sum(types[r] == t for r in val.rows) for t in set(types)}
    assert counts == {"apartment": 12, "house": 5, "studio": 2, "office": 1}  # 20% of every type
    assert list(ManifestDataset(root / "m.csv", split="val", **kw).rows) == list(val.rows)
    assert list(ManifestDataset(root / "m.csv", split="val", val_fraction=0.2, split_seed=4).rows) != list(val.rows)
    filtered = ManifestDataset(root / "m.csv", split="val", non_empty=True, **kw)
    assert set(filtered.rows) == {r for r in val.rows if r % 7}


def test_from_config(synth):
    cfg = {"manifest": str(manifest_of(synth)), "outputs": ["rgb", "control"], "image_size": 32, "non_empty": True}
    ds = ManifestDataset.from_config(cfg, split="train")
    assert ds.outputs == ("rgb", "control") and ds.split == "train" and ds[0]["rgb"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="data.imag_size: unknown key"):
        ManifestDataConfig.from_dict({"manifest": "m.csv", "imag_size": 3})
    with pytest.raises(ValueError, match="data.outputs"):
        ManifestDataConfig.from_dict({"manifest": "m.csv", "outputs": ["depth"]})


# ----------------------------------------------------------------------------------------------------------------------
# latents
# ----------------------------------------------------------------------------------------------------------------------


def write_latents(root, frame, fmt, shape=(4, 8, 8)):
    from safetensors.torch import save_file

    paths = []
    for i in range(len(frame)):
        latent = torch.full(shape, float(i))
        name = f"lat/{i}.{fmt}"
        (root / "lat").mkdir(exist_ok=True)
        if fmt == "safetensors":
            save_file({"latent": latent}, root / name)
        elif fmt == "pt":
            torch.save(latent, root / name)
        else:
            np.save(root / name, latent.numpy())
        paths.append(name)
    return frame.assign(latent_path=paths)


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "npy"])
def test_latents_in_every_format(data, fmt):
    path = edit_manifest(data, lambda f: write_latents(data, f, fmt), f"lat_{fmt}.csv")
    ds = ManifestDataset(path, outputs=["latent", "label"])
    assert ds.latent_shape == (4, 8, 8)
    s = ds[3]
    assert set(s) == {"index", "latent", "label"} and s["latent"].dtype == torch.float32
    assert s["latent"].eq(3).all()


def test_latent_of_the_wrong_shape_names_path_and_row(data):
    def bad(frame):
        frame = write_latents(data, frame, "npy")
        np.save(data / "lat" / "2.npy", np.zeros((4, 8, 9), np.float32))
        return frame

    path = edit_manifest(data, bad, "lat_bad.csv")
    ds = ManifestDataset(path, outputs=["latent"])
    with pytest.raises(ManifestError, match=r"2\.npy \(manifest row 2, line 4\) has shape \(4, 8, 9\), expected"):
        ds[2]
    with pytest.raises(ManifestError, match="expected \\(4, 8, 9\\)"):
        ManifestDataset(path, outputs=["latent"], latent_shape=[4, 8, 9])[0]


class Arbitrary:
    """An object a weights_only load must refuse to rebuild."""


def test_latent_pickle_is_refused(tmp_path):
    torch.save({"latent": torch.zeros(2), "x": Arbitrary()}, tmp_path / "e.pt")
    with pytest.raises(ManifestError, match="cannot read latent"):
        load_latent(str(tmp_path / "e.pt"))
    (tmp_path / "l.bin").write_bytes(b"0")
    with pytest.raises(ManifestError, match="unsupported file type"):
        load_latent(str(tmp_path / "l.bin"))


# ----------------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------------


def test_missing_columns_list_required_and_present(data):
    path = edit_manifest(data, lambda f: f.drop(columns=["control_path", "type"]), "cols.csv")
    with pytest.raises(ManifestError) as info:
        ManifestDataset(path, outputs=["rgb", "label", "control"])
    message = str(info.value)
    assert "required columns ['control_path', 'layout_path', 'type']" in message
    assert "present columns: ['layout_path', 'seg_path', 'is_empty', 'room_count']" in message
    assert "['label', 'control']" in message
    with pytest.raises(ManifestError, match="is_empty.*non_empty"):
        ManifestDataset(edit_manifest(data, lambda f: f.drop(columns=["is_empty"]), "e.csv"), non_empty=True)


def test_missing_image_names_path_and_row(data):
    (data / "segmentation" / "00004.png").unlink()
    with pytest.raises(ManifestError, match=r"segmentation/00004\.png \(manifest row 4, line 6\)"):
        ManifestDataset(manifest_of(data))
    with pytest.warns(UserWarning, match="skipped 1 rows"):
        ds = ManifestDataset(manifest_of(data), on_error="skip")
    assert len(ds) == NUM - 1 and 4 not in ds.rows and ds.num_skipped == 1
    assert "1 skipped" in ds.report()


def corrupt(data, name, how):
    path = data / "images" / name
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if how == "truncated" else b"this is not a png" * 10)
    return path


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_image_names_path_and_row(data, how):
    corrupt(data, "00006.png", how)
    ds = ManifestDataset(manifest_of(data))
    with pytest.raises(ManifestError, match=r"cannot decode image .*images/00006\.png \(manifest row 6, line 8\)"):
        ds[6]


def test_corrupt_image_skipped_and_counted_across_workers(data):
    corrupt(data, "00006.png", "garbage")
    corrupt(data, "00009.png", "truncated")
    ds = ManifestDataset(manifest_of(data), on_error="skip")
    with pytest.warns(UserWarning, match="skipping"):
        assert ds[6] is None
    loader = build_torch_loader(ds, batch_size=8, shuffle=False, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = [r for batch in loader for r in batch["index"].tolist()]
    assert rows == [r for r in range(NUM) if r not in (6, 9)]
    assert ds.num_skipped == 3  # once directly, twice in the workers
    assert "3 skipped" in ds.report()


def test_empty_after_filters_and_empty_manifests(data, tmp_path):
    only_empty = edit_manifest(data, lambda f: f[f.is_empty], "only_empty.csv")
    with pytest.raises(ManifestError, match=r"no rows left after filters \(non_empty\)"):
        ManifestDataset(only_empty, non_empty=True)
    header_only = edit_manifest(data, lambda f: f.iloc[:0], "header.csv")
    with pytest.raises(ManifestError, match="no rows left"):
        ManifestDataset(header_only)
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(ManifestError, match="empty"):
        ManifestDataset(tmp_path / "blank.csv")
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        ManifestDataset(tmp_path / "nope.csv")
    bad_bool = edit_manifest(data, lambda f: f.assign(is_empty=["maybe"] * len(f)), "bool.csv")
    with pytest.raises(ManifestError, match="is_empty.*true/false"):
        ManifestDataset(bad_bool, non_empty=True)


# ----------------------------------------------------------------------------------------------------------------------
# the torch loader
# ----------------------------------------------------------------------------------------------------------------------


def test_torch_loader_batches_epochs_and_policies(synth):
    ds = ManifestDataset(manifest_of(synth), outputs=ALL, image_size=32)
    loader = build_torch_loader(ds, batch_size=5, seed=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 5 and len(batches[-1]["index"]) == 4
    b = batches[0]
    assert b["rgb"].shape == (5, 3, 32, 32) and b["segmentation"].shape == (5, 32, 32)
    assert b["label"].shape == (5,) and b["control"].shape == (5, 1, 32, 32)
    first = [r for b in batches for r in b["index"].tolist()]
    assert sorted(first) == list(range(NUM))
    loader.set_epoch(1)
    assert [r for b in loader for r in b["index"].tolist()] != first
    assert len(list(build_torch_loader(ds, 5, last_batch="drop"))) == 4
    assert all(len(b["index"]) == 5 for b in build_torch_loader(ds, 5, last_batch="fill"))
    halves = [[r for b in build_torch_loader(ds, 5, num_replicas=2, rank=k) for r in b["index"].tolist()]
              for k in (0, 1)]
    assert sorted(halves[0] + halves[1]) == list(range(NUM))


def test_torch_loader_weighted(synth):
    ds = ManifestDataset(manifest_of(synth), outputs=["label"])
    loader = build_torch_loader(ds, batch_size=64, weighted=True, num_samples=2048, seed=0)
    labels = torch.cat([b["label"] for b in loader])
    shares = torch.bincount(labels, minlength=4).float() / len(labels)
    present = torch.from_numpy(ds.class_counts()) > 0
    assert torch.all((shares[present] - 1 / present.sum()).abs() < 0.06), shares


def test_optional_control_column(data):
    path = edit_manifest(data, lambda f: f.assign(control_path=[p if i % 2 else "" for i, p in
                                                                enumerate(f.control_path)]), "ctl.csv")
    ds = ManifestDataset(path, outputs=["rgb", "control"])
    batch = collate_dicts([ds[i] for i in range(4)])
    assert batch["has_control"].tolist() == [False, True, False, True]
    assert batch["control"][0].eq(0).all()
