"""The quickstart's pieces: its config and the stage experiments built from it, the data stage's resume rule, the
per-class sample grid and the printed evaluation. (The whole pipeline runs at a tiny size in test_cli.py.)"""
import os

import numpy as np
import pytest
import torch

from layoutgen.training.images import class_rows_grid
from layoutgen.training.quickstart import (QuickstartConfig, _write_data, format_results, load_quickstart_config)


def test_packaged_config_builds_both_stages():
    cfg = load_quickstart_config()
    ae = cfg.autoencoder_experiment("data/manifest.csv")
    assert ae.data.manifest == "data/manifest.csv"
    assert ae.data.val_fraction == cfg.data.val_fraction and ae.data.split_seed == cfg.data.seed
    diff = cfg.diffusion_experiment("latents/manifest.csv", "ae.safetensors", [4, 16, 16], latent_scale=1.7)
    model = diff.diffusion
    assert model.unet.in_channels == 4 and model.latent_size == [16, 16]
    assert model.autoencoder_checkpoint == "ae.safetensors"
    assert model.latent_scale == pytest.approx(1.7)
    assert model.unet.num_classes == 4                      # one class per layout type
    assert diff.data["outputs"] == ["latent", "label"]
    # the same split for both stages: the diffusion model never trains on the autoencoder's validation layouts
    assert (diff.data["val_fraction"], diff.data["split_seed"]) == (ae.data.val_fraction, ae.data.split_seed)


def test_a_configured_latent_scale_wins():
    cfg = load_quickstart_config(overrides=["diffusion.diffusion.latent_scale=0.5"])
    diff = cfg.diffusion_experiment("m.csv", "ae.safetensors", [8, 4, 4], latent_scale=3.0)
    assert diff.diffusion.latent_scale == 0.5
    assert diff.diffusion.unet.in_channels == 8 and diff.diffusion.latent_size == [4, 4]


@pytest.mark.parametrize("override, key", [
    ("autoencoder.training.lr=-1", "autoencoder.training.lr"),
    ("diffusion.diffusion.sampler=euler", "diffusion.diffusion.sampler"),
    ("sample.per_class=0", "sample.per_class"),
    ("data.image_sise=32", "data.image_sise"),
])
def test_bad_overrides_name_their_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_quickstart_config(overrides=[override])


def test_stage_data_sections_are_refused():
    with pytest.raises(ValueError, match=r"diffusion\.data"):
        QuickstartConfig.from_dict({"diffusion": {"data": {"manifest": "x.csv"}}})


def test_data_stage_keeps_a_matching_dataset_only_when_resuming(tmp_path):
    cfg = load_quickstart_config(overrides=["data.num_samples=3", "data.image_size=32"]).data
    manifest = _write_data(cfg, str(tmp_path), resume=False)
    image = tmp_path / "images" / "00000.png"
    os.utime(image, (1, 1))
    assert _write_data(cfg, str(tmp_path), resume=True) == manifest
    assert image.stat().st_mtime == 1                       # kept
    _write_data(cfg, str(tmp_path), resume=False)
    assert image.stat().st_mtime != 1                       # rewritten without --resume
    os.utime(image, (1, 1))
    other = load_quickstart_config(overrides=["data.num_samples=3", "data.image_size=48"]).data
    _write_data(other, str(tmp_path), resume=True)
    assert image.stat().st_mtime != 1                       # other settings: made anew
    from PIL import Image
    assert Image.open(image).size == (48, 48)


def test_class_rows_grid_puts_each_class_on_its_row():
    images = torch.full((6, 3, 8, 8), -1.0)                 # black tiles
    images[3:] = 1.0                                        # second row white
    grid = class_rows_grid(images, per_row=3, pad=2)
    assert grid.shape == (2 * (8 + 2) + 2, 3 * (8 + 2) + 2, 3) and grid.dtype == np.uint8
    assert (grid[2:10, 2:10] == 0).all() and (grid[12:20, 2:10] == 255).all()
    labelled = class_rows_grid(images, per_row=3, row_names=["apartment", "house"], pad=2)
    assert labelled.shape[0] == grid.shape[0] and labelled.shape[1] > grid.shape[1]
    assert (labelled[:, : labelled.shape[1] - grid.shape[1]] < 128).any()   # the names are drawn
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        class_rows_grid(torch.zeros(2, 1, 8, 8), per_row=2)


def test_format_results_sets_samples_beside_their_ceilings():
    metrics = {"palette_fidelity": 0.93, "room_rectangularity": 0.88}
    results = {"samples": {**metrics, "memorisation_mean_distance": 2.0, "memorisation_training_distance": 3.0,
                           "memorisation_ratio": 0.67},
               "reconstructed": {"palette_fidelity": 0.95, "room_rectangularity": 0.9},
               "real": {"palette_fidelity": 1.0, "room_rectangularity": 0.94}}
    text = format_results(results)
    row = next(line for line in text.splitlines() if "palette_fidelity" in line)
    assert row.split()[1:4] == ["0.930", "0.950", "1.000"] and ">= 0.9" in row
    assert "ratio 0.67" in text
