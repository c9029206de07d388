"""Tests for layoutgen.models.components.heads: output shapes, activations and head-config validation."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from layoutgen.models.components.heads import (
    HEAD_REGISTRY,
    HEAD_SOURCES,
    ClassificationHead,
    RGBHead,
    SegmentationHead,
    build_head,
    normalize_head_config,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


# ---------------------------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_channels", [1, 3, 4])
def test_rgb_head_shape(out_channels):
    torch.manual_seed(0)
    head = RGBHead(16, out_channels)
    y = head(randn(2, 16, 7, 5, seed=1))
    assert y.shape == (2, out_channels, 7, 5)
    assert head.name == "rgb" and head.source == "decoder"


def test_rgb_head_tanh_bounds():
    torch.manual_seed(0)
    raw = RGBHead(8, 3)
    squashed = RGBHead(8, 3, activation="tanh")
    squashed.load_state_dict(raw.state_dict())
    x = randn(2, 8, 6, 6, seed=2) * 50  # large inputs push the raw output well outside [-1, 1]
    y_raw, y = raw(x), squashed(x)
    assert y_raw.abs().max() > 1.5
    assert y.min() >= -1.0 and y.max() <= 1.0
    torch.testing.assert_close(y, torch.tanh(y_raw))


def test_rgb_head_bad_activation():
    with pytest.raises(ValueError, match="activation"):
        RGBHead(8, 3, activation="sigmoid")


@pytest.mark.parametrize("hidden", [0, 12])
def test_segmentation_head_shape(hidden):
    torch.manual_seed(0)
    head = SegmentationHead(16, num_classes=5, hidden_channels=hidden)
    y = head(randn(3, 16, 9, 4, seed=3))
    assert y.shape == (3, 5, 9, 4)
    first = head.layers[0]
    assert first.out_channels == (hidden or 16)
    assert head.name == "segmentation" and head.source == "decoder"


@pytest.mark.parametrize("size", [(4, 4), (7, 5), (1, 1), (16, 12)])
def test_classification_head_shape_independent_of_size(size):
    torch.manual_seed(0)
    head = ClassificationHead(16, num_classes=6, hidden_channels=16, norm_groups=4)
    y = head(randn(2, 16, *size, seed=4))
    assert y.shape == (2, 6)
    assert head.source == "decoder_mid" and head.name == "classification"


def test_classification_head_pools_per_sample():
    """Global average pooling per sample: a sample's logits do not depend on the other samples in the batch."""
    torch.manual_seed(0)
    head = ClassificationHead(8, num_classes=4, hidden_channels=8, norm_groups=4).eval()
    x = randn(3, 8, 6, 6, seed=5)
    full = head(x)
    for i in range(3):
        torch.testing.assert_close(head(x[i:i + 1]), full[i:i + 1], rtol=1e-5, atol=1e-6)
    # Pooling: output equals fc applied to the spatial mean of the normalised conv features.
    pooled = head.norm(head.conv(x)).mean(dim=(2, 3))
    torch.testing.assert_close(full, head.fc(pooled))


def test_classification_head_dropout_only_in_train():
    torch.manual_seed(0)
    head = ClassificationHead(8, num_classes=4, hidden_channels=8, norm_groups=4, dropout=0.5)
    x = randn(2, 8, 5, 5, seed=6)
    head.eval()
    torch.testing.assert_close(head(x), head(x), rtol=0, atol=0)
    head.train()
    torch.manual_seed(1)
    a = head(x)
    torch.manual_seed(2)
    b = head(x)
    assert not torch.allclose(a, b)


def test_classification_head_bad_args():
    with pytest.raises(ValueError, match="hidden_channels"):
        ClassificationHead(8, num_classes=4, hidden_channels=12, norm_groups=8)
    with pytest.raises(ValueError, match="dropout"):
        ClassificationHead(8, num_classes=4, hidden_channels=8, dropout=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        ClassificationHead(8, num_classes=0, hidden_channels=8)


def test_head_bad_source_and_name():
    with pytest.raises(ValueError, match="source"):
        RGBHead(8, 3, source="encoder")
    with pytest.raises(ValueError, match="name"):
        SegmentationHead(8, num_classes=3, name="")


# ---------------------------------------------------------------------------------------------------------------------
# normalize_head_config / build_head
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_type", list(HEAD_REGISTRY))
def test_normalize_fills_every_constructor_default(head_type):
    head_cls = HEAD_REGISTRY[head_type]
    params = {n: p for n, p in inspect.signature(head_cls.__init__).parameters.items()
              if n not in ("self", "in_channels")}
    config = {"type": head_type}
    if head_type != "RGBHead":
        config["num_classes"] = 7
    normalized = normalize_head_config(config, "decoder.heads[0]")
    assert set(normalized) == {"type", *params}
    for key, param in params.items():
        if key == "num_classes":
            assert normalized[key] == 7
        else:
            assert normalized[key] == param.default, key
    assert normalized["source"] in HEAD_SOURCES
    # The input mapping is not modified.
    assert set(config) <= {"type", "num_classes"}


def test_normalize_keeps_given_values():
    normalized = normalize_head_config(
        {"type": "RGBHead", "name": "img", "out_channels": 1, "activation": "tanh"}, "where")
    assert normalized == {"type": "RGBHead", "name": "img", "out_channels": 1, "activation": "tanh",
                          "source": "decoder"}
    # Idempotent.
    assert normalize_head_config(normalized, "where") == normalized


def test_normalize_rejects_unknown_key():
    with pytest.raises(ValueError) as info:
        normalize_head_config({"type": "RGBHead", "out_chanels": 3}, "decoder.heads[0]")
    message = str(info.value)
    assert "decoder.heads[0].out_chanels" in message
    for valid in ("out_channels", "name", "activation", "source"):
        assert valid in message


@pytest.mark.parametrize("bad_type", ["RgbHead", None, 3])
def test_normalize_rejects_unknown_type(bad_type):
    config = {"name": "x"} if bad_type is None else {"type": bad_type}
    with pytest.raises(ValueError) as info:
        normalize_head_config(config, "decoder.heads[2]")
    message = str(info.value)
    assert "decoder.heads[2].type" in message
    for valid in HEAD_REGISTRY:
        assert valid in message


@pytest.mark.parametrize("head_type", ["SegmentationHead", "ClassificationHead"])
def test_normalize_requires_num_classes(head_type):
    with pytest.raises(ValueError, match=r"heads\[1\]\.num_classes: missing"):
        normalize_head_config({"type": head_type}, "heads[1]")


@pytest.mark.parametrize("config,key", [
    ({"type": "RGBHead", "out_channels": "3"}, "out_channels"),
    ({"type": "RGBHead", "out_channels": 3.0}, "out_channels"),
    ({"type": "SegmentationHead", "num_classes": True}, "num_classes"),
    ({"type": "ClassificationHead", "num_classes": 4, "dropout": "high"}, "dropout"),
    ({"type": "RGBHead", "name": 5}, "name"),
])
def test_normalize_rejects_wrong_value_type(config, key):
    with pytest.raises(ValueError, match=rf"h\.{key}: expected"):
        normalize_head_config(config, "h")


def test_normalize_rejects_non_mapping():
    with pytest.raises(ValueError, match="mapping"):
        normalize_head_config(["RGBHead"], "h")


def test_build_head_from_normalized_config():
    torch.manual_seed(0)
    config = normalize_head_config({"type": "SegmentationHead", "name": "seg", "num_classes": 4}, "h")
    head = build_head(config, in_channels=8)
    assert isinstance(head, SegmentationHead) and head.name == "seg"
    assert head(randn(1, 8, 5, 5, seed=7)).shape == (1, 4, 5, 5)
    assert isinstance(head.layers[0], nn.Conv2d) and head.layers[0].in_channels == 8
