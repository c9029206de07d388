"""layoutgen.evaluation: generation / ControlNet metrics and connected-component labelling."""
import math
import time
from collections import deque

import numpy as np
import pytest
import torch

from layoutgen.evaluation import (
    class_conditional_accuracy,
    connected_components,
    control_adherence_iou,
    evaluate_generation,
    memorisation_distances,
    palette_fidelity,
    region_stats,
    room_rectangularity,
)
from layoutgen.models.datasets.synthetic import (
    BACKGROUND,
    BEDROOM,
    KITCHEN,
    PALETTE,
    WALL,
    generate_layouts,
)


@pytest.fixture(scope="module")
def layouts():
    lays = generate_layouts(24, size=128, seed=3, empty_prob=0.0)
    rgb_u8 = np.stack([lay.rgb for lay in lays])  # [N, H, W, 3] uint8
    rgb = torch.from_numpy(rgb_u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [N, 3, H, W] in [-1, 1]
    seg = torch.from_numpy(np.stack([lay.segmentation for lay in lays]).astype(np.int64))
    outline = np.stack([lay.outline for lay in lays])  # [N, H, W] uint8 {0, 255}
    return {"rgb": rgb, "rgb_u8": rgb_u8, "seg": seg, "outline": outline}


def _smooth_noise(n=8, size=128, seed=0):
    """Low-frequency random colours: blobby, irregular regions after palette segmentation."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)


def _to_float_images(seg: torch.Tensor) -> torch.Tensor:
    """Class map [N, H, W] -> float [N, 3, H, W] in [-1, 1] (the model convention)."""
    rgb = torch.from_numpy(PALETTE)[seg].float()
    return rgb.permute(0, 3, 1, 2) / 127.5 - 1.0


# -------------------------------------------------------------------------------------------------- palette fidelity
def test_palette_fidelity_is_one_on_generated_layouts(layouts):
    assert palette_fidelity(layouts["rgb"]) == 1.0
    assert palette_fidelity(layouts["rgb_u8"]) == 1.0  # uint8 channels-last gives the same


def test_palette_fidelity_is_low_on_noise():
    noise = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert palette_fidelity(noise) < 0.2


def test_palette_fidelity_tolerance_on_a_hand_made_image():
    base = PALETTE[BEDROOM].astype(np.int64)  # (80, 130, 230)
    img = np.stack([base, base + (10, 0, 0), base + (20, 20, 0)]).astype(np.uint8)[None, None]  # [1, 1, 3, 3]
    # distances 0, 10, sqrt(800) = 28.28
    assert palette_fidelity(img, tolerance=5.0) == pytest.approx(1 / 3)
    assert palette_fidelity(img, tolerance=24.0) == pytest.approx(2 / 3)
    assert palette_fidelity(img, tolerance=30.0) == 1.0
    assert palette_fidelity(img, tolerance=10.0) == pytest.approx(2 / 3)  # the bound is inclusive


def test_palette_fidelity_rejects_bad_shapes():
    with pytest.raises(ValueError, match="palette_fidelity"):
        palette_fidelity(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="3 colour channels"):
        palette_fidelity(torch.zeros(2, 4, 8, 8))


# ---------------------------------------------------------------------------------------------- connected components
def _bfs_count(seg: np.ndarray, mask: np.ndarray) -> int:
    """Reference: number of 4-connected same-class components of masked pixels, by breadth-first search."""
    h, w = seg.shape
    seen = np.zeros_like(mask)
    count = 0
    for y in range(h):
        for x in range(w):
            if not mask[y, x] or seen[y, x]:
                continue
            count += 1
            seen[y, x] = True
            queue = deque([(y, x)])
            while queue:
                cy, cx = queue.popleft()
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx] and seg[ny, nx] == seg[cy, cx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
    return count


def test_connected_components_small_hand_made_case():
    seg = torch.tensor(
        [
            [2, 2, 0, 2],
            [2, 0, 0, 2],
            [0, 0, 3, 3],
            [2, 0, 3, 0],
        ]
    )
    labels, count = connected_components(seg, mask=seg >= 2)
    # class 2: the top-left L, the right column pair, the lone bottom-left pixel; class 3: one region
    assert count == 4
    assert labels[0, 0] == labels[0, 1] == labels[1, 0] != 0
    assert labels[0, 3] == labels[1, 3] != labels[0, 0]
    assert labels[3, 0] not in (labels[0, 0], labels[0, 3])
    assert labels[2, 2] == labels[2, 3] == labels[3, 2]
    assert labels[2, 2] not in (labels[0, 0], labels[0, 3], labels[3, 0])
    assert (labels[seg < 2] == 0).all()
    assert sorted(labels.unique().tolist()) == [0, 1, 2, 3, 4]


def test_connected_components_diagonal_is_not_connected_and_images_are_separate():
    seg = torch.tensor([[[5, 0], [0, 5]], [[5, 5], [0, 0]]])
    labels, count = connected_components(seg, mask=seg == 5)
    assert count == 3  # the diagonal pair is two regions; the second image's pair is one, not joined to the first
    assert labels[0, 0, 0] != labels[0, 1, 1]
    assert labels[1, 0, 0] == labels[1, 0, 1]


def test_connected_components_matches_breadth_first_search_on_random_maps():
    rng = np.random.default_rng(0)
    for trial in range(5):
        seg = rng.integers(0, 3, size=(20, 23))
        mask = seg > 0
        _, count = connected_components(torch.from_numpy(seg), mask=torch.from_numpy(mask))
        assert count == _bfs_count(seg, mask)


def test_connected_components_long_snake_is_one_region():
    # a serpentine corridor: plain label propagation would need ~H*W/2 steps; the union-find finishes quickly
    h, w = 41, 40
    seg = np.zeros((h, w), dtype=np.int64)
    seg[::2, :] = 1
    for i, y in enumerate(range(1, h, 2)):
        seg[y, w - 1 if i % 2 == 0 else 0] = 1
    labels, count = connected_components(torch.from_numpy(seg), mask=torch.from_numpy(seg == 1))
    assert count == 1
    assert int((labels == 1).sum()) == int((seg == 1).sum())


# -------------------------------------------------------------------------------------------------- rectangularity
def test_rectangularity_is_high_on_generated_layouts_and_low_on_noise(layouts):
    generated = room_rectangularity(layouts["rgb"])
    # rooms are rectangles; door gaps (filled with a room's floor) and same-class rooms joined by a door bring the
    # measured value a little under 1
    assert generated > 0.9
    assert room_rectangularity(layouts["seg"]) == pytest.approx(generated)  # class map input gives the same
    noise = room_rectangularity(_smooth_noise())
    assert noise < generated - 0.2
    pixel_noise = room_rectangularity(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    assert math.isnan(pixel_noise) or pixel_noise < generated - 0.2


def test_rectangularity_of_hand_drawn_rooms():
    seg = torch.full((1, 32, 32), BACKGROUND, dtype=torch.int64)
    seg[0, 2:12, 3:20] = KITCHEN  # a 10x17 rectangle
    assert room_rectangularity(_to_float_images(seg)) == 1.0

    k = 8  # an L of three k x k unit squares in a 2k x 2k box: 3/4
    seg = torch.full((1, 32, 32), BACKGROUND, dtype=torch.int64)
    seg[0, 4 : 4 + 2 * k, 4 : 4 + 2 * k] = BEDROOM
    seg[0, 4 + k : 4 + 2 * k, 4 + k : 4 + 2 * k] = WALL
    assert room_rectangularity(seg) == 0.75
    assert room_rectangularity(_to_float_images(seg)) == 0.75

    # plain mean over regions: the rectangle (1.0) and the L (0.75) average to 0.875
    seg[0, 25:30, 20:30] = KITCHEN
    assert room_rectangularity(seg) == pytest.approx(0.875)
    # regions under min_area are ignored; nothing left -> nan
    assert room_rectangularity(seg, min_area=100) == pytest.approx(0.75)
    assert math.isnan(room_rectangularity(seg, min_area=1000))
    assert math.isnan(room_rectangularity(torch.zeros(1, 8, 8, dtype=torch.int64)))


def test_region_stats_of_the_l_shape():
    seg = torch.zeros(1, 6, 6, dtype=torch.int64)
    seg[0, 1:5, 1:5] = BEDROOM
    seg[0, 3:5, 3:5] = 0
    labels, count = connected_components(seg, mask=seg == BEDROOM)
    stats = region_stats(seg, labels, count)
    assert count == 1
    assert stats.area.tolist() == [12] and stats.bbox_area.tolist() == [16]
    assert stats.cls.tolist() == [BEDROOM] and stats.image.tolist() == [0]


def test_rectangularity_is_fast_enough():
    lays = generate_layouts(64, size=128, seed=1)
    rgb = torch.from_numpy(np.stack([lay.rgb for lay in lays])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    start = time.perf_counter()
    value = room_rectangularity(rgb)
    elapsed = time.perf_counter() - start
    assert value > 0.9
    assert elapsed < 5.0, f"64 images of 128x128 took {elapsed:.2f} s"


# ------------------------------------------------------------------------------------ class-conditional accuracy
def test_class_conditional_accuracy_with_a_fake_classifier():
    num_classes = 4
    images = torch.zeros(6, 3, 8, 8)
    predicted = torch.tensor([0, 1, 2, 3, 1, 2])
    images[:, 0, 0, 0] = predicted.float()  # the fake classifier reads its answer from the first pixel
    calls = []

    def classifier(x):
        calls.append(x.shape[0])
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), num_classes).float()

    labels = torch.tensor([0, 1, 2, 3, 0, 0])  # 4 of 6 right
    assert class_conditional_accuracy(classifier, images, labels, batch_size=4) == pytest.approx(4 / 6)
    assert calls == [4, 2]
    assert class_conditional_accuracy(classifier, images, predicted) == 1.0
    with pytest.raises(ValueError, match="labels"):
        class_conditional_accuracy(classifier, images, labels[:5])
    with pytest.raises(ValueError, match="logits"):
        class_conditional_accuracy(lambda x: torch.zeros(x.shape[0]), images, labels)


# -------------------------------------------------------------------------------------------------- memorisation
def test_memorisation_copies_give_zero_distance_and_ratio():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(50, 4, 4, 4, generator=g)
    idx = torch.tensor([3, 17, 17, 42, 0])
    out = memorisation_distances(train[idx], train, batch=7)
    assert torch.equal(out["nearest_distance"], torch.zeros(5, dtype=torch.float64))
    assert out["nearest_index"].tolist() == idx.tolist()
    assert out["mean_nearest_distance"] == 0.0
    assert out["ratio"] == 0.0
    assert out["mean_training_nearest_distance"] > 0


def test_memorisation_fresh_samples_give_a_ratio_near_one_or_above():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(200, 16, 2, 2, generator=g)
    fresh = torch.randn(64, 16, 2, 2, generator=g)
    out = memorisation_distances(fresh, train)
    assert out["ratio"] > 0.85
    # a near-copy (small noise on training latents) is flagged
    near = train[:64] + 0.01 * torch.randn(64, 16, 2, 2, generator=g)
    assert memorisation_distances(near, train)["ratio"] < 0.05


def test_memorisation_chunking_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    train = torch.randn(30, 5, generator=g)
    gen = torch.randn(11, 5, generator=g)
    out = memorisation_distances(gen, train, batch=4)
    d = torch.cdist(gen.double(), train.double())
    assert torch.allclose(out["nearest_distance"], d.min(1).values)
    assert out["nearest_index"].tolist() == d.argmin(1).tolist()
    dt = torch.cdist(train.double(), train.double())
    dt.fill_diagonal_(math.inf)
    assert torch.allclose(out["training_nearest_distance"], dt.min(1).values)
    assert out["ratio"] == pytest.approx(d.min(1).values.mean().item() / dt.min(1).values.mean().item())


def test_memorisation_shape_errors():
    with pytest.raises(ValueError, match="same per-sample shape"):
        memorisation_distances(torch.zeros(3, 4), torch.zeros(5, 6))
    with pytest.raises(ValueError, match="at least 2"):
        memorisation_distances(torch.zeros(3, 4), torch.zeros(1, 4))


# ---------------------------------------------------------------------------------------------- control adherence
def test_control_adherence_is_one_against_the_own_outline(layouts):
    assert control_adherence_iou(layouts["rgb"], layouts["outline"]) == 1.0  # [N, H, W] in {0, 255}
    control = torch.from_numpy(layouts["outline"] > 0).float()[:, None]  # [N, 1, H, W] in {0, 1}, as the dataset
    assert control_adherence_iou(layouts["rgb_u8"], control) == 1.0
    shifted = torch.roll(control, shifts=9, dims=-1)
    assert control_adherence_iou(layouts["rgb"], shifted) < 0.95


def test_control_adherence_hand_computed_iou():
    seg = torch.zeros(2, 4, 4, dtype=torch.int64)
    seg[0, 0:2, 0:2] = BEDROOM  # footprint: 4 pixels
    seg[0, 0, 0] = WALL  # walls are part of the footprint
    outline = torch.zeros(2, 4, 4)
    outline[0, 1:3, 0:3] = 1  # 6 pixels; overlap with the footprint: row 1, columns 0..1 -> 2 pixels
    # image 0: 2 / (4 + 6 - 2) = 0.25; image 1: both empty -> 1
    assert control_adherence_iou(seg, outline) == pytest.approx((0.25 + 1.0) / 2)
    assert control_adherence_iou(_to_float_images(seg), (outline * 255).to(torch.uint8)) == pytest.approx(0.625)


def test_control_adherence_shape_errors_are_named():
    seg = torch.zeros(2, 8, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"outlines .*do not match"):
        control_adherence_iou(seg, torch.zeros(2, 8, 7))
    with pytest.raises(ValueError, match=r"outlines must be \[N, 1, H, W\]"):
        control_adherence_iou(seg, torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="control_adherence_iou"):
        control_adherence_iou(torch.zeros(8, 8), torch.zeros(8, 8))


# ---------------------------------------------------------------------------------------------- evaluate_generation
def test_evaluate_generation_returns_the_keys_for_the_inputs_given(layouts):
    rgb = layouts["rgb"][:6]
    base = evaluate_generation(rgb)
    assert set(base) == {"palette_fidelity", "room_rectangularity"}
    assert base["palette_fidelity"] == 1.0
    assert base["room_rectangularity"] == pytest.approx(room_rectangularity(rgb))

    labels = torch.arange(6) % 4
    latents = torch.randn(6, 4, 8, 8)
    full = evaluate_generation(
        rgb,
        labels=labels,
        classifier=lambda x: torch.nn.functional.one_hot(labels[: x.shape[0]], 4).float(),
        outlines=layouts["outline"][:6],
        generated_latents=latents[:3],
        training_latents=latents,
    )
    assert set(full) == {
        "palette_fidelity",
        "room_rectangularity",
        "class_conditional_accuracy",
        "control_adherence_iou",
        "memorisation_mean_distance",
        "memorisation_training_distance",
        "memorisation_ratio",
    }
    assert all(isinstance(v, float) for v in full.values())
    assert full["class_conditional_accuracy"] == 1.0
    assert full["control_adherence_iou"] == 1.0
    assert full["memorisation_ratio"] == 0.0

    with pytest.raises(ValueError, match="labels and classifier"):
        evaluate_generation(rgb, labels=labels)
    with pytest.raises(ValueError, match="training_latents"):
        evaluate_generation(rgb, generated_latents=latents)
