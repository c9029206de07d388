"""layoutgen.metrics: PSNR, pixel accuracy, mean IoU and accuracy on small hand-computed examples."""
import math

import pytest
import torch

from layoutgen import metrics


def _one_hot_logits(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices [N, ...] -> logits [N, K, ...] whose arg-max is `classes`."""
    logits = torch.nn.functional.one_hot(classes, num_classes).float()
    return logits.movedim(-1, 1)


# ------------------------------------------------------------------------------------------------------------- psnr
def test_psnr_identical_is_inf():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert metrics.psnr(x, x.clone()) == math.inf


@pytest.mark.parametrize("value_range", [(-1.0, 1.0), (0.0, 1.0), (0.0, 255.0)])
@pytest.mark.parametrize("error", [0.01, 0.1, 0.5])
def test_psnr_matches_closed_form(value_range, error):
    low, high = value_range
    target = torch.full((2, 3, 4, 4), (low + high) / 2, dtype=torch.float64)
    prediction = target + error  # MSE = error**2 everywhere, inside the range
    expected = 10 * math.log10((high - low) ** 2 / error ** 2)
    assert metrics.psnr(prediction, target, value_range=value_range) == pytest.approx(expected, rel=1e-9)


def test_psnr_of_a_mixed_error_uses_the_mean_squared_error():
    target = torch.zeros(1, 1, 2, 2)
    prediction = torch.tensor([[[[0.0, 0.2], [0.4, -0.4]]]])
    mse = (0.0 + 0.04 + 0.16 + 0.16) / 4
    assert metrics.psnr(prediction, target) == pytest.approx(10 * math.log10(4.0 / mse), rel=1e-6)


def test_psnr_is_a_python_float_and_decreases_with_error():
    target = torch.rand(1, 3, 8, 8) * 2 - 1
    small = metrics.psnr(target + 0.01, target)
    large = metrics.psnr(target + 0.1, target)
    assert isinstance(small, float) and isinstance(large, float)
    assert small > large


def test_psnr_clips_predictions_to_the_value_range():
    target = torch.zeros(1, 1, 4, 4)
    wild = torch.full_like(target, 1e6)
    # Clipped to [-1, 1] as a saved image would be: MSE = 1 -> 10 * log10(4 / 1).
    assert metrics.psnr(wild, target) == pytest.approx(10 * math.log10(4.0), abs=1e-9)
    assert metrics.psnr(-wild, target) == pytest.approx(10 * math.log10(4.0), abs=1e-9)
    # Values inside the range are not touched.
    assert metrics.psnr(torch.full_like(target, 0.5), target) == pytest.approx(10 * math.log10(4.0 / 0.25), rel=1e-9)


def test_psnr_shape_mismatch_raises():
    with pytest.raises(ValueError, match="psnr"):
        metrics.psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))


# --------------------------------------------------------------------------------------------------- pixel accuracy
def test_pixel_accuracy_hand_computed():
    target = torch.tensor([[[0, 1], [2, 2]]])             # [1, 2, 2]
    predicted = torch.tensor([[[0, 1], [1, 2]]])          # 3 of 4 right
    assert metrics.pixel_accuracy(_one_hot_logits(predicted, 3), target) == pytest.approx(0.75)
    assert metrics.pixel_accuracy(_one_hot_logits(target, 3), target) == 1.0


def test_pixel_accuracy_over_a_batch():
    target = torch.tensor([[[0, 0], [0, 0]], [[1, 1], [1, 1]]])
    predicted = torch.tensor([[[0, 0], [0, 0]], [[0, 0], [0, 1]]])   # 4 + 1 of 8
    assert metrics.pixel_accuracy(_one_hot_logits(predicted, 2), target) == pytest.approx(5 / 8)


# --------------------------------------------------------------------------------------------------------- mean IoU
def test_mean_iou_hand_computed():
    target = torch.tensor([[[0, 0], [1, 1]]])
    predicted = torch.tensor([[[0, 1], [1, 1]]])
    # class 0: intersection 1, union 2 -> 0.5; class 1: intersection 2, union 3 -> 2/3
    expected = (0.5 + 2 / 3) / 2
    assert metrics.mean_iou(_one_hot_logits(predicted, 2), target) == pytest.approx(expected)


def test_mean_iou_ignores_classes_absent_from_prediction_and_target():
    target = torch.tensor([[[0, 0], [3, 3]]])
    predicted = torch.tensor([[[0, 0], [3, 3]]])
    # Classes 1, 2 and 4 appear nowhere: they must not count as IoU 0 (nor 1).
    assert metrics.mean_iou(_one_hot_logits(predicted, 5), target) == pytest.approx(1.0)
    predicted = torch.tensor([[[0, 0], [0, 3]]])
    # class 0: 2 / 3; class 3: 1 / 2; nothing else counts.
    assert metrics.mean_iou(_one_hot_logits(predicted, 5), target) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_mean_iou_counts_a_class_present_only_in_the_prediction_as_zero():
    target = torch.tensor([[[0, 0], [0, 0]]])
    predicted = torch.tensor([[[0, 0], [0, 2]]])
    # class 0: 3 / 4; class 2: predicted once, never in the target -> 0.
    assert metrics.mean_iou(_one_hot_logits(predicted, 3), target) == pytest.approx((3 / 4 + 0.0) / 2)


def test_mean_iou_num_classes_limits_the_classes_scored():
    target = torch.tensor([[[0, 1], [2, 2]]])
    predicted = torch.tensor([[[0, 1], [2, 0]]])
    logits = _one_hot_logits(predicted, 3)
    full = metrics.mean_iou(logits, target)               # 0: 1/2, 1: 1, 2: 1/2
    assert full == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert metrics.mean_iou(logits, target, num_classes=2) == pytest.approx((0.5 + 1.0) / 2)


# --------------------------------------------------------------------------------------------------------- accuracy
def test_accuracy_hand_computed():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 0])                 # third is wrong
    value = metrics.accuracy(logits, labels)
    assert isinstance(value, float)
    assert value == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------------------- shape checks
@pytest.mark.parametrize("logits, labels", [
    (torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long)),   # would broadcast to [4, 4]
    (torch.zeros(4, 3), torch.zeros(3, dtype=torch.long)),
])
def test_accuracy_shape_mismatch_raises(logits, labels):
    with pytest.raises(ValueError, match="accuracy"):
        metrics.accuracy(logits, labels)


@pytest.mark.parametrize("fn", [metrics.pixel_accuracy, metrics.mean_iou])
@pytest.mark.parametrize("target_shape", [(1, 4, 4), (2, 4, 5), (2, 1, 4, 4)])
def test_segmentation_metrics_shape_mismatch_raises(fn, target_shape):
    logits = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=fn.__name__):
        fn(logits, torch.zeros(target_shape, dtype=torch.long))
