"""Preview grids: the shared grid layout, the preview functions, and the Trainer writing previews, loss curves and
TensorBoard events."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from layoutgen.models.autoencoder import Autoencoder
from layoutgen.models.controlnet_diffusion import ControlNetDiffusion
from layoutgen.models.datasets.synthetic import SyntheticLayoutDataset
from layoutgen.models.diffusion import DiffusionModel
from layoutgen.models.losses.base_loss import build_loss
from layoutgen.training.images import column_grid, save_reconstruction_grid
from layoutgen.training.previews import (controlnet_preview, diffusion_preview, preview_fn_for, preview_image)
from layoutgen.training.trainer import Trainer

CODEC = dict(latent_channels=4, base_channels=8, norm_groups=4)
HEADS = [{"type": "RGBHead", "name": "rgb", "out_channels": 3},
         {"type": "SegmentationHead", "name": "segmentation", "num_classes": 11}]
UNET = dict(in_channels=4, base_channels=8, depth=2, num_res_blocks=1, time_dim=16, norm_groups=4, num_heads=2,
            num_classes=3)
TRAINING = dict(device="cpu", warmup_steps=1, lr=1e-3, log_every=1, batch_size=4)


def tile(n):   # rows or columns of 32-pixel tiles with 2-pixel padding
    return n * 34 + 2


def autoencoder() -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder.from_config({"encoder": dict(downsampling_steps=2, **CODEC),
                                    "decoder": dict(upsampling_steps=2, heads=HEADS, **CODEC)})


def diffusion(num_classes=3) -> DiffusionModel:
    torch.manual_seed(0)
    return DiffusionModel(unet={**UNET, "num_classes": num_classes},
                          scheduler={"type": "CosineScheduler", "num_steps": 20}, latent_size=[8, 8],
                          latent_scale=1.0, sample_steps=2)


@pytest.fixture(scope="module")
def loaders():
    data = SyntheticLayoutDataset(12, size=32, seed=0)
    train = DataLoader(Subset(data, range(8)), batch_size=4, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(Subset(data, range(8, 12)), batch_size=4)
    return train, val


@pytest.fixture(scope="module")
def latents():
    """Pre-embedded latents (the diffusion model here has no autoencoder)."""
    g = torch.Generator().manual_seed(1)
    items = [{"latent": torch.randn(4, 8, 8, generator=g), "label": torch.tensor(i % 3)} for i in range(8)]
    return DataLoader(items, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ grid layout
def test_column_grid_rows_columns_and_enlarged_tiles():
    big = torch.ones(3, 3, 32, 32)
    small = -torch.ones(2, 3, 8, 8)           # e.g. a latent preview beside full-size images
    grid = column_grid({"a": big, "b": small})
    assert grid.shape == (tile(3), tile(2), 3) and grid.dtype == np.uint8
    assert (grid[2:34, 2:34] == 255).all()                 # a: white (+1)
    assert (grid[2:34, 36:68] == 0).all()                  # b, enlarged to 32x32: black (-1)
    assert (grid[70:102, 36:68] == 255).all()              # b has no third image: the cell stays white
    assert column_grid({"a": big}, max_rows=1).shape == (tile(1), tile(1), 3)
    with pytest.raises(ValueError, match="'b'"):
        column_grid({"a": big, "b": torch.ones(2, 1, 8, 8)})


def test_reconstruction_grid_keeps_its_layout(tmp_path):
    inputs = torch.zeros(5, 3, 32, 32)
    outputs = {"rgb": torch.zeros(5, 3, 32, 32), "segmentation": torch.randn(5, 11, 32, 32)}
    save_reconstruction_grid(str(tmp_path / "r.png"), inputs, outputs, HEADS, max_rows=4)
    with Image.open(tmp_path / "r.png") as image:
        assert image.size == (tile(3), tile(4))   # input | rgb | segmentation, 4 rows


def test_preview_image_accepts_a_pil_image_and_rejects_others():
    assert preview_image(Image.new("RGB", (7, 5))).shape == (5, 7, 3)
    with pytest.raises(TypeError, match="preview_fn"):
        preview_image(torch.zeros(1, 3, 8, 8))


# ------------------------------------------------------------------------------------------------ preview functions
def test_diffusion_preview_a_column_per_class_and_the_same_draw_every_time():
    model = diffusion()
    preview = diffusion_preview(per_class=2, steps=2)
    with torch.no_grad():
        first, second = preview(model, 0), preview(model, 1)
    assert list(first) == ["class 0", "class 1", "class 2"]
    assert all(v.shape == (2, 3, 8, 8) for v in first.values())   # no autoencoder: the latent preview
    assert all(torch.equal(first[k], second[k]) for k in first)
    with torch.no_grad():
        assert list(diffusion_preview(per_class=3, steps=1)(diffusion(0), 0)) == ["samples"]


def test_controlnet_preview_control_beside_sample():
    model = ControlNetDiffusion.from_base(diffusion(), control_channels=1, downsampling_factor=4,
                                          hint_channels=[8, 8, 8])
    control = (torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    with torch.no_grad():
        out = controlnet_preview(control, labels=torch.tensor([0, 1, 2]), steps=2)(model, 0)
    assert list(out) == ["control", "sample"]
    assert out["control"].shape == (3, 3, 32, 32) and out["sample"].shape == (3, 3, 8, 8)
    assert torch.equal(out["control"][:, 0], control[:, 0] * 2 - 1)
    assert column_grid(out).shape == (tile(3), tile(2), 3)


def test_preview_fn_for_needs_control_images_for_a_controlnet():
    model = ControlNetDiffusion.from_base(diffusion(), control_channels=1, downsampling_factor=4,
                                          hint_channels=[8, 8, 8], control_key="outline")
    loader = DataLoader(SyntheticLayoutDataset(2, size=32), batch_size=2)
    with pytest.raises(ValueError, match="'outline'"):
        preview_fn_for(model, loader)


# ------------------------------------------------------------------------------------------------ the Trainer
def test_trainer_writes_previews_loss_curves_and_tensorboard(loaders, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, val = loaders
    model = autoencoder()
    trainer = Trainer(model, build_loss({"type": "MSELoss", "key": "rgb", "target": "rgb"}), train, val,
                      config={**TRAINING, "epochs": 2, "ema_decay": 0.9, "tensorboard": True}, out_dir=str(tmp_path),
                      progress=False, preview_fn=preview_fn_for(model, train, val))
    trainer.fit()
    for epoch in (0, 1):
        with Image.open(tmp_path / "previews" / f"epoch_{epoch:04d}.png") as image:
            assert image.size == (tile(3), tile(4))   # input | rgb | segmentation for the 4 validation images
    with Image.open(tmp_path / "loss_curves.png") as image:
        assert image.format == "PNG" and image.size[0] >= 400
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "val/loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert len(events.Images("preview")) == 2


def test_preview_every_and_the_last_epoch(latents, tmp_path, monkeypatch):
    monkeypatch.setattr("layoutgen.training.trainer.PLOT_INTERVAL_S", 0.0)   # redraw the curves at every epoch end
    train = latents
    epochs_seen = []

    def preview_fn(model, epoch):
        epochs_seen.append(epoch)
        assert not model.training and not torch.is_grad_enabled()
        assert (tmp_path / "loss_curves.png").is_file()   # drawn at the epoch end, before the preview
        return {"x": torch.zeros(1, 3, 4, 4)}
    model = diffusion()
    Trainer(model, None, train, config={**TRAINING, "epochs": 3, "preview_every": 2}, out_dir=str(tmp_path),
            progress=False, preview_fn=preview_fn).fit()
    assert epochs_seen == [1, 2]   # every second epoch, and the last one
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["epoch_0001.png", "epoch_0002.png"]
    assert model.training


def test_preview_leaves_the_global_rng_alone_and_uses_the_ema_weights(latents, tmp_path):
    train = latents
    seen = {}

    def preview_fn(model, epoch):
        torch.randn(100)   # a preview that draws from the global generator
        seen["weights"] = model.unet.conv_out.weight.detach().clone()
        return {"x": torch.zeros(1, 3, 4, 4)}
    trainer = Trainer(diffusion(), None, train, config={**TRAINING, "epochs": 1, "ema_decay": 0.5},
                      out_dir=str(tmp_path), progress=False, preview_fn=preview_fn)
    trainer.fit()
    live = trainer.model.unet.conv_out.weight.detach().clone()
    with trainer.ema.average_parameters(trainer.model):
        averaged = trainer.model.unet.conv_out.weight.detach().clone()
    assert not torch.equal(live, averaged)
    assert torch.equal(seen["weights"], averaged)
    state = torch.random.get_rng_state()
    trainer._write_preview(5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert (tmp_path / "previews" / "epoch_0005.png").is_file()


def test_tensorboard_missing_names_the_option(latents, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import now raises ImportError
    with pytest.raises(ValueError, match=r"training\.tensorboard.*pip install tensorboard"):
        Trainer(diffusion(), None, latents, config={**TRAINING, "tensorboard": True}, out_dir=str(tmp_path),
                progress=False)
