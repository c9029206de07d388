"""Tests of the procedural floor-plan generator (layoutgen.models.datasets.synthetic). CPU only, a few seconds."""

from __future__ import annotations

import collections

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from layoutgen.models.datasets import (
    CLASS_NAMES,
    LAYOUT_TYPE_PROBS,
    LAYOUT_TYPES,
    NUM_CLASSES,
    PALETTE,
    SyntheticLayout,
    SyntheticLayoutDataset,
    generate_layout,
    generate_layouts,
    layout_rng,
    rgb_to_segmentation,
    write_synthetic_dataset,
)

BG, WALL = CLASS_NAMES.index("background"), CLASS_NAMES.index("wall")


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def count_components(mask: np.ndarray, classes: np.ndarray | None = None) -> int:
    """Number of 4-connected components of ``mask``; with ``classes``, neighbours must also share the class.

    Vectorised hook-and-compress union-find (no scipy in the environment).
    """
    h, w = mask.shape
    parent = np.arange(h * w)
    idx = parent.reshape(h, w)
    flat_cls = None if classes is None else classes.ravel()
    ea, eb = [], []
    for a, b, ma, mb in (
        (idx[:, :-1], idx[:, 1:], mask[:, :-1], mask[:, 1:]),
        (idx[:-1, :], idx[1:, :], mask[:-1, :], mask[1:, :]),
    ):
        ok = ma & mb
        if flat_cls is not None:
            ok &= flat_cls[a] == flat_cls[b]
        ea.append(a[ok])
        eb.append(b[ok])
    ea, eb = np.concatenate(ea), np.concatenate(eb)
    while True:
        before = parent.copy()
        pa, pb = parent[ea], parent[eb]
        m = np.minimum(pa, pb)
        np.minimum.at(parent, pa, m)
        np.minimum.at(parent, pb, m)
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
        if np.array_equal(parent, before):
            break
    return int(len(np.unique(parent[mask.ravel()])))


def neighbours(mask: np.ndarray, pad_value: bool = False) -> np.ndarray:
    """(8, H, W): the 8-neighbourhood of every pixel (outside the canvas = pad_value)."""
    p = np.pad(mask, 1, constant_values=pad_value)
    h, w = mask.shape
    return np.stack([p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])


def assert_consistent(lay: SyntheticLayout, size: int) -> None:
    assert lay.rgb.shape == (size, size, 3) and lay.rgb.dtype == np.uint8
    assert lay.segmentation.shape == (size, size) and lay.segmentation.dtype == np.uint8
    assert lay.outline.shape == (size, size) and lay.outline.dtype == np.uint8
    assert lay.segmentation.max() < NUM_CLASSES
    np.testing.assert_array_equal(lay.rgb, PALETTE[lay.segmentation])
    np.testing.assert_array_equal(lay.outline, np.where(lay.segmentation != BG, 255, 0).astype(np.uint8))
    assert lay.layout_type in LAYOUT_TYPES


def assert_walled(lay: SyntheticLayout) -> None:
    """No room pixel touches background (8-neighbourhood) or the canvas border: the outline is walled all round."""
    seg = lay.segmentation
    room = seg >= 2
    bg_near = neighbours(seg == BG, pad_value=True).any(0)
    assert not (room & bg_near).any(), "a room pixel touches the background directly"
    # The footprint border (footprint pixels next to the background) is wall only.
    border = (seg != BG) & bg_near
    assert (seg[border] == WALL).all()


def is_non_rectangular(lay: SyntheticLayout) -> bool:
    fp = lay.segmentation != BG
    ys, xs = np.nonzero(fp)
    return fp.sum() < (np.ptp(ys) + 1) * (np.ptp(xs) + 1)


@pytest.fixture(scope="module")
def layouts() -> list[SyntheticLayout]:
    return generate_layouts(400, size=128, seed=123)


@pytest.fixture(scope="module")
def non_empty(layouts) -> list[SyntheticLayout]:
    return [lay for lay in layouts if not lay.is_empty]


# ----------------------------------------------------------------------------------------------------------------------
# palette and constants
# ----------------------------------------------------------------------------------------------------------------------


def test_palette_and_class_names():
    assert CLASS_NAMES[0] == "background" and CLASS_NAMES[1] == "wall"
    assert len(CLASS_NAMES) == NUM_CLASSES >= 10 and len(set(CLASS_NAMES)) == NUM_CLASSES
    assert PALETTE.shape == (NUM_CLASSES, 3) and PALETTE.dtype == np.uint8
    d = np.sqrt(((PALETTE[:, None].astype(float) - PALETTE[None].astype(float)) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    assert d.min() > 80, f"palette colours too close: {d.min():.1f}"
    bg = PALETTE[0].astype(int)
    assert bg.min() >= 230 or bg.max() <= 25  # white-ish or black
    assert PALETTE[1].astype(int).max() <= 80  # dark wall


def test_layout_types_unbalanced():
    assert len(LAYOUT_TYPES) >= 4 and len(LAYOUT_TYPE_PROBS) == len(LAYOUT_TYPES)
    assert abs(sum(LAYOUT_TYPE_PROBS) - 1.0) < 1e-9
    assert list(LAYOUT_TYPE_PROBS) == sorted(LAYOUT_TYPE_PROBS, reverse=True)
    assert LAYOUT_TYPE_PROBS[0] > 3 * LAYOUT_TYPE_PROBS[-1]


# ----------------------------------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------------------------------


def _same(a: SyntheticLayout, b: SyntheticLayout) -> bool:
    return (
        np.array_equal(a.rgb, b.rgb)
        and np.array_equal(a.segmentation, b.segmentation)
        and np.array_equal(a.outline, b.outline)
        and (a.layout_type, a.is_empty, a.room_count) == (b.layout_type, b.is_empty, b.room_count)
    )


def test_determinism_same_seed():
    a = generate_layouts(8, size=96, seed=5)
    b = generate_layouts(8, size=96, seed=5)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert _same(generate_layout(128, seed=42), generate_layout(128, seed=42))
    assert _same(generate_layout(128, rng=np.random.default_rng(3)), generate_layout(128, seed=3))


def test_different_seeds_differ():
    a = generate_layouts(8, size=128, seed=1, empty_prob=0.0)
    b = generate_layouts(8, size=128, seed=2, empty_prob=0.0)
    assert sum(_same(x, y) for x, y in zip(a, b)) == 0
    # Layouts within one data set differ from each other as well.
    assert len({x.segmentation.tobytes() for x in a}) == len(a)


def test_layout_independent_of_num_and_order():
    short = generate_layouts(5, size=64, seed=9)
    long = generate_layouts(20, size=64, seed=9)
    assert all(_same(x, y) for x, y in zip(short, long[:5]))
    # Layout i alone, drawn from its own stream, is the same as in the list.
    assert _same(generate_layout(64, rng=layout_rng(9, 13)), long[13])


# ----------------------------------------------------------------------------------------------------------------------
# image consistency
# ----------------------------------------------------------------------------------------------------------------------


def test_colours_in_palette_and_consistent(layouts):
    palette_codes = set((PALETTE.astype(np.int64) @ np.array([65536, 256, 1])).tolist())
    for lay in layouts[:100]:
        assert_consistent(lay, 128)
        codes = np.unique(lay.rgb.reshape(-1, 3).astype(np.int64) @ np.array([65536, 256, 1]))
        assert set(codes.tolist()) <= palette_codes


def test_rgb_to_segmentation_round_trip(layouts):
    for lay in layouts[:30]:
        np.testing.assert_array_equal(rgb_to_segmentation(lay.rgb), lay.segmentation)
    lay = next(lay for lay in layouts if not lay.is_empty)
    # torch, channels-last uint8
    out = rgb_to_segmentation(torch.from_numpy(lay.rgb))
    assert out.dtype == torch.int64
    np.testing.assert_array_equal(out.numpy(), lay.segmentation)
    # torch, batched channels-first float in [-1, 1] (the model convention)
    x = torch.from_numpy(lay.rgb).permute(2, 0, 1).float() / 127.5 - 1.0
    out = rgb_to_segmentation(torch.stack([x, x]))
    assert out.shape == (2, 128, 128)
    np.testing.assert_array_equal(out[1].numpy(), lay.segmentation)
    # nearest colour: noisy colours still map back (noise well below half the palette spacing)
    noise = np.random.default_rng(0).integers(-20, 21, size=lay.rgb.shape)
    noisy = np.clip(lay.rgb.astype(int) + noise, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(rgb_to_segmentation(noisy), lay.segmentation)
    # and a colour far from the wall colour is not mapped to wall
    assert rgb_to_segmentation(np.full((1, 1, 3), 250, np.uint8))[0, 0] == BG


def test_outline_is_footprint(non_empty):
    for lay in non_empty[:100]:
        fp = lay.outline > 0
        np.testing.assert_array_equal(fp, lay.segmentation != BG)
        assert set(np.unique(lay.outline).tolist()) == {0, 255}
        # the footprint is one piece, away from the canvas border
        assert count_components(fp) == 1
        assert not (fp[0].any() or fp[-1].any() or fp[:, 0].any() or fp[:, -1].any())


def test_walls_surround_rooms(non_empty):
    for lay in non_empty:
        assert_walled(lay)
        assert (lay.segmentation == WALL).any()


def test_rooms_connected_by_doors(non_empty):
    """Interior walls have door gaps: in (nearly) every plan all floor pixels form one 4-connected region."""
    multi = [lay for lay in non_empty if lay.room_count >= 2]
    connected = sum(count_components(lay.segmentation >= 2) == 1 for lay in multi)
    assert connected >= 0.9 * len(multi)
    # ... while walls do separate rooms: with walls treated as floor's barrier and class identity required,
    # there are several regions.
    assert np.mean([count_components(lay.segmentation >= 2, lay.segmentation) for lay in multi]) > 3


def test_non_rectangular_share(non_empty):
    share = np.mean([is_non_rectangular(lay) for lay in non_empty[:200]])
    assert share > 0.2, share
    # ... but not every plan is non-rectangular.
    assert share < 0.9, share


def test_room_count(non_empty):
    for lay in non_empty:
        assert lay.room_count >= 1
        seg = lay.segmentation
        present = set(np.unique(seg).tolist()) - {BG, WALL}
        assert 1 <= len(present) <= lay.room_count
        # Connected same-class floor regions: doors may merge two rooms of one class, never split a room.
        assert 1 <= count_components(seg >= 2, seg) <= lay.room_count


def test_empty_layouts(layouts):
    empties = [lay for lay in layouts if lay.is_empty]
    assert empties, "expected some empty layouts at empty_prob=0.05 in 400 draws"
    for lay in empties:
        assert lay.room_count == 0
        assert (lay.segmentation == BG).all() and (lay.outline == 0).all()
        np.testing.assert_array_equal(lay.rgb, np.broadcast_to(PALETTE[BG], lay.rgb.shape))


def test_every_room_class_appears(non_empty):
    seen = set()
    for lay in non_empty:
        seen |= set(np.unique(lay.segmentation).tolist())
    assert seen == set(range(NUM_CLASSES)), sorted(set(range(NUM_CLASSES)) - seen)


# ----------------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------------


def test_type_frequencies_unbalanced():
    ds = SyntheticLayoutDataset(2000, size=64, seed=11)
    counts = ds.class_counts()
    assert counts.sum() == 2000
    freq = counts / counts.sum()
    # expected order, each within ~4.5 sigma of its nominal frequency
    assert all(freq[i] > freq[i + 1] for i in range(len(freq) - 1)), freq
    np.testing.assert_allclose(freq, LAYOUT_TYPE_PROBS, atol=0.05)
    # the cheap label path agrees with the layouts actually drawn
    for i in range(0, 2000, 97):
        assert ds.label(i) == LAYOUT_TYPES.index(ds.layout(i).layout_type)


def test_generated_type_frequencies(layouts):
    counts = collections.Counter(lay.layout_type for lay in layouts)
    freq = np.array([counts[t] for t in LAYOUT_TYPES]) / len(layouts)
    np.testing.assert_allclose(freq, LAYOUT_TYPE_PROBS, atol=0.08)
    assert freq[0] > freq[1] > freq[3]


@pytest.mark.parametrize("empty_prob", [0.0, 0.2, 1.0])
def test_empty_share(empty_prob):
    lays = generate_layouts(500, size=64, seed=3, empty_prob=empty_prob)
    share = np.mean([lay.is_empty for lay in lays])
    assert abs(share - empty_prob) < 0.06, share


def test_layout_types_change_generation():
    def stats(ltype):
        lays = [generate_layout(128, rng=layout_rng(77, i), layout_type=ltype, empty_prob=0.0) for i in range(60)]
        assert all(lay.layout_type == ltype for lay in lays)
        rooms = np.mean([lay.room_count for lay in lays])
        corridor = np.mean([(lay.segmentation == CLASS_NAMES.index("corridor")).any() for lay in lays])
        non_rect = np.mean([is_non_rectangular(lay) for lay in lays])
        return rooms, corridor, non_rect

    s = {t: stats(t) for t in ("apartment", "house", "studio", "office")}
    assert s["studio"][0] < s["apartment"][0] < s["house"][0] < s["office"][0]
    assert s["studio"][0] <= 3
    assert s["office"][1] > 0.8 and s["studio"][1] == 0.0
    assert s["house"][2] > s["apartment"][2] > 0.1
    assert s["house"][2] > s["office"][2]


def test_invalid_arguments():
    with pytest.raises(ValueError):
        generate_layout(128, layout_type="castle")
    with pytest.raises(ValueError):
        generate_layout(16)


# ----------------------------------------------------------------------------------------------------------------------
# sizes
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 96, 100, 128, 256])
def test_sizes(size):
    lays = generate_layouts(24, size=size, seed=size, empty_prob=0.0)
    for lay in lays:
        assert_consistent(lay, size)
        assert_walled(lay)
        assert lay.room_count >= 1
        np.testing.assert_array_equal(rgb_to_segmentation(lay.rgb), lay.segmentation)
    assert any(is_non_rectangular(lay) for lay in lays)
    # the footprint fills a sensible part of the canvas
    frac = np.mean([(lay.segmentation != BG).mean() for lay in lays])
    assert 0.2 < frac < 0.9, frac


# ----------------------------------------------------------------------------------------------------------------------
# on-disk data set
# ----------------------------------------------------------------------------------------------------------------------


def test_write_synthetic_dataset(tmp_path):
    out = tmp_path / "synth"
    manifest = write_synthetic_dataset(out, 12, size=64, seed=4, empty_prob=0.2)
    assert manifest == out / "manifest.csv" and manifest.is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    df = pd.read_csv(manifest)
    assert list(df.columns) == ["layout_path", "seg_path", "control_path", "type", "is_empty", "room_count"]
    assert len(df) == 12
    ref = generate_layouts(12, size=64, seed=4, empty_prob=0.2)
    for row, lay in zip(df.itertuples(index=False), ref):
        assert not row.layout_path.startswith("/")  # relative to out_dir
        with Image.open(out / row.layout_path) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
            np.testing.assert_array_equal(np.asarray(im), lay.rgb)
        with Image.open(out / row.seg_path) as im:
            assert im.mode == "L"
            np.testing.assert_array_equal(np.asarray(im), lay.segmentation)
        with Image.open(out / row.control_path) as im:
            assert im.mode == "L"
            np.testing.assert_array_equal(np.asarray(im), lay.outline)
        assert row.type == lay.layout_type
        assert bool(row.is_empty) == lay.is_empty
        assert int(row.room_count) == lay.room_count
    assert df["is_empty"].dtype == bool
    # Rewriting replaces the manifest in place.
    write_synthetic_dataset(out, 3, size=64, seed=4)
    assert len(pd.read_csv(out / "manifest.csv")) == 3


# ----------------------------------------------------------------------------------------------------------------------
# torch Dataset
# ----------------------------------------------------------------------------------------------------------------------


def test_dataset_items():
    ds = SyntheticLayoutDataset(16, size=64, seed=2, empty_prob=0.25)
    assert len(ds) == 16
    ref = generate_layouts(16, size=64, seed=2, empty_prob=0.25)
    for i in range(16):
        item = ds[i]
        assert set(item) >= {"rgb", "segmentation", "label", "control", "is_empty"}
        rgb, seg, ctrl = item["rgb"], item["segmentation"], item["control"]
        assert rgb.dtype == torch.float32 and rgb.shape == (3, 64, 64)
        assert -1.0 <= rgb.min() and rgb.max() <= 1.0
        assert seg.dtype == torch.int64 and seg.shape == (64, 64)
        assert ctrl.dtype == torch.float32 and ctrl.shape == (1, 64, 64)
        assert set(torch.unique(ctrl).tolist()) <= {0.0, 1.0}
        assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
        assert isinstance(item["is_empty"], bool)
        lay = ref[i]
        np.testing.assert_array_equal(((rgb + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy(), lay.rgb)
        np.testing.assert_array_equal(seg.numpy(), lay.segmentation)
        np.testing.assert_array_equal(ctrl[0].numpy() > 0, lay.segmentation != BG)
        assert int(item["label"]) == LAYOUT_TYPES.index(lay.layout_type)
        assert item["is_empty"] == lay.is_empty
    assert ds[-1]["segmentation"].equal(ds[15]["segmentation"])
    with pytest.raises(IndexError):
        ds[16]
    counts = ds.class_counts()
    assert counts.dtype == np.int64 and counts.shape == (len(LAYOUT_TYPES),) and counts.sum() == 16
    np.testing.assert_array_equal(counts, np.bincount([int(ds[i]["label"]) for i in range(16)], minlength=4))


def test_dataset_cache_and_loader():
    ds = SyntheticLayoutDataset(8, size=64, seed=6, cache=True)
    a = ds[3]
    a["rgb"].zero_()  # callers mutating an item must not corrupt the cache
    b = ds[3]
    assert b["rgb"].abs().sum() > 0
    assert torch.equal(b["rgb"], SyntheticLayoutDataset(8, size=64, seed=6)[3]["rgb"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["rgb"].shape == (4, 3, 64, 64) and batch["segmentation"].shape == (4, 64, 64)
    assert batch["label"].shape == (4,) and batch["control"].shape == (4, 1, 64, 64)
    assert batch["is_empty"].dtype == torch.bool
