"""The autoencoder learns a handful of layouts, and every parameter receives a gradient."""
import pytest
import torch

from layoutgen.models.autoencoder import Autoencoder
from layoutgen.models.datasets.synthetic import NUM_CLASSES, SyntheticLayoutDataset
from layoutgen.models.losses.base_loss import build_loss

HEADS = [
    {"type": "RGBHead", "name": "rgb", "out_channels": 3},
    {"type": "SegmentationHead", "name": "segmentation", "num_classes": NUM_CLASSES},
    {"type": "ClassificationHead", "name": "classification", "num_classes": 4, "hidden_channels": 16},
]
LOSSES = [
    {"type": "MSELoss", "key": "rgb", "target": "rgb"},
    {"type": "CrossEntropyLoss", "key": "segmentation", "target": "segmentation", "weight": 0.05},
    {"type": "CrossEntropyLoss", "key": "classification", "target": "label", "weight": 0.05},
]


def _model(variational: bool) -> Autoencoder:
    codec = dict(latent_channels=4, base_channels=16, norm_groups=4, channel_multipliers=[1, 2, 2], mid_attention=True)
    return Autoencoder(encoder=dict(downsampling_steps=2, variational=variational, **codec),
                       decoder=dict(upsampling_steps=2, heads=HEADS, **codec))


def _batch(n: int, size: int = 32) -> dict:
    data = SyntheticLayoutDataset(n, size=size, seed=7, empty_prob=0.0)
    items = [data[i] for i in range(n)]
    return {k: torch.stack([torch.as_tensor(item[k]) for item in items]) for k in ("rgb", "segmentation", "label")}


@pytest.mark.parametrize("variational", [False, True])
def test_every_parameter_gets_a_gradient(variational):
    torch.manual_seed(0)
    model = _model(variational)
    losses = LOSSES + ([{"type": "KLDLoss", "weight": 1e-3}] if variational else [])
    batch = _batch(4)
    loss, _ = build_loss(losses)(model(batch["rgb"]), batch)
    loss.backward()
    without = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert without == [], f"parameters without gradient: {without}"


@pytest.mark.slow
def test_autoencoder_overfits_a_few_layouts():
    torch.manual_seed(0)
    model = _model(variational=False)
    batch = _batch(8)
    loss_fn = build_loss(LOSSES)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(250):
        loss, logs = loss_fn(model(batch["rgb"]), batch)
        first = first if first is not None else float(logs["rgb"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(batch["rgb"])
    mse = torch.mean((out["rgb"] - batch["rgb"]) ** 2).item()
    seg_acc = (out["segmentation"].argmax(1) == batch["segmentation"]).float().mean().item()
    assert mse < 0.05 * first, (mse, first)
    assert seg_acc > 0.9
    assert torch.equal(out["classification"].argmax(1), batch["label"])
