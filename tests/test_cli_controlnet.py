"""`layoutgen sample/eval --control` for ControlNet checkpoints, its error cases, and the run folder's previews."""
import json

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

from layoutgen.cli import main
from layoutgen.models.datasets.synthetic import SyntheticLayoutDataset

from tiny_configs import HEADS, UNET, autoencoder as tiny_autoencoder

AUTOENCODER = {
    "autoencoder": tiny_autoencoder(heads=[HEADS[0], HEADS[2]]),   # rgb and classification
    "loss": [{"type": "MSELoss", "key": "rgb", "target": "rgb"}],
    "data": {"num_samples": 8, "image_size": 32},
    "training": {"epochs": 1, "max_steps": 1, "batch_size": 4, "device": "cpu"},
}
MODEL = {"unet": UNET, "scheduler": {"type": "CosineScheduler", "num_steps": 50}, "latent_size": [8, 8],
         "sample_steps": 2, "guidance_scale": 1.0}
TRAINING = {"epochs": 2, "batch_size": 4, "device": "cpu", "warmup_steps": 1, "log_every": 1}


def _train(root, name, config):
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--out", str(root / name), "--no-progress"]) == 0
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """autoencoder -> diffusion over its latents -> ControlNet over both (synthetic 32x32 layouts, 2 epochs)."""
    root = tmp_path_factory.mktemp("runs")
    ae = _train(root, "ae", AUTOENCODER) / "autoencoder.safetensors"
    data = {"num_samples": 8, "image_size": 32, "val_fraction": 0.25}
    diffusion = _train(root, "diffusion", {"diffusion": {**MODEL, "autoencoder_checkpoint": str(ae)}, "data": data,
                                           "training": TRAINING})
    controlnet = _train(root, "controlnet", {
        "controlnet_diffusion": {**MODEL, "autoencoder_checkpoint": str(ae),
                                 "base_checkpoint": str(diffusion / "diffusion.safetensors"),
                                 "controlnet": {"downsampling_factor": 4, "hint_channels": [8, 8, 8]}},
        "data": data, "training": {**TRAINING, "tensorboard": True}})
    return {"root": root, "diffusion_run": diffusion, "controlnet_run": controlnet,
            "diffusion": str(diffusion / "diffusion.safetensors"),
            "controlnet": str(controlnet / "controlnet.safetensors")}


def _size(path):
    with Image.open(path) as image:
        image.load()
        return image.size


def _error(capsys, *needles):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_training_runs_leave_previews_loss_curves_and_tensorboard(runs):
    for run in (runs["diffusion_run"], runs["controlnet_run"]):
        assert sorted(p.name for p in (run / "previews").iterdir()) == ["epoch_0000.png", "epoch_0001.png"]
        assert _size(run / "loss_curves.png")[0] >= 400
    # diffusion: 2 samples of each of the 4 classes, a column per class
    assert _size(runs["diffusion_run"] / "previews" / "epoch_0001.png") == (4 * 34 + 2, 2 * 34 + 2)
    # ControlNet: control | sample for the 2 validation layouts
    assert _size(runs["controlnet_run"] / "previews" / "epoch_0001.png") == (2 * 34 + 2, 2 * 34 + 2)
    assert list((runs["controlnet_run"] / "tensorboard").glob("events.out.tfevents.*"))
    assert not (runs["diffusion_run"] / "tensorboard").exists()


def test_sample_with_synthetic_controls(runs, tmp_path):
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", runs["controlnet"], "--control", "synthetic", "--num", "3",
                 "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    # 3 (control, sample) pairs, 2 pairs per row: 4 tiles wide, 2 rows
    assert _size(out / "samples.png") == (4 * 34 + 2, 2 * 34 + 2)
    tensors = load_file(str(out / "latents.safetensors"))
    assert tensors["latents"].shape == (3, 4, 8, 8) and tensors["control"].shape == (3, 1, 32, 32)
    expected = SyntheticLayoutDataset(3, size=32, seed=0, empty_prob=0.0)[1]["control"]
    assert (tensors["control"][1] == expected).all()   # the outlines ControlNet training draws
    with Image.open(out / "samples.png") as grid:      # the first tile is the first control, white inside
        tile = np.array(grid.convert("L"))[2:34, 2:34]
    assert (tile == (tensors["control"][0, 0].numpy() * 255)).all()


def test_sample_from_a_folder_of_outlines(runs, tmp_path):
    folder = tmp_path / "outlines"
    folder.mkdir()
    for i in range(2):
        outline = SyntheticLayoutDataset(2, size=32, seed=5, empty_prob=0.0).layout(i).outline
        Image.fromarray(outline, mode="L").save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", runs["controlnet"], "--control", str(folder), "--num", "16",
                 "--steps", "1", "--device", "cpu", "--out", str(out)]) == 0
    tensors = load_file(str(out / "latents.safetensors"))
    assert tensors["latents"].shape[0] == 2   # one sample per image, fewer than --num
    assert set(tensors["control"].unique().tolist()) <= {0.0, 1.0}


def test_eval_reports_control_adherence(runs, tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "syn"), "--num", "3", "--size", "32"]) == 0
    for control in (str(tmp_path / "syn" / "manifest.csv"), "synthetic"):
        out = tmp_path / ("eval_" + control[-4:])
        assert main(["eval", "--checkpoint", runs["controlnet"], "--control", control, "--num", "3", "--steps", "2",
                     "--device", "cpu", "--out", str(out)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["kind"] == "controlnet" and metrics["num_samples"] == 3
        assert 0.0 <= metrics["control_adherence_iou"] <= 1.0
        assert {"palette_fidelity", "room_rectangularity", "class_conditional_accuracy"} <= set(metrics)
        assert _size(out / "samples.png") == (4 * 34 + 2, 2 * 34 + 2)
    assert "control_adherence_iou" in capsys.readouterr().out


def test_control_errors_exit_2_naming_the_option(runs, tmp_path, capsys):
    out = str(tmp_path / "o")
    base = ["--steps", "1", "--device", "cpu", "--out", out]
    assert main(["sample", "--checkpoint", runs["diffusion"], "--control", "synthetic", *base]) == 2
    _error(capsys, "--control", "DiffusionModel", "not a ControlNetDiffusion")
    assert main(["eval", "--checkpoint", runs["diffusion"], "--control", "synthetic", *base]) == 2
    _error(capsys, "--control", "not a ControlNetDiffusion")
    for command in ("sample", "eval"):
        assert main([command, "--checkpoint", runs["controlnet"], *base]) == 2
        _error(capsys, "--control: missing")
    assert main(["sample", "--checkpoint", runs["controlnet"], "--control", str(tmp_path / "nowhere"), *base]) == 2
    _error(capsys, "--control", "nowhere")

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png at all")
    assert main(["sample", "--checkpoint", runs["controlnet"], "--control", str(folder), *base]) == 2
    _error(capsys, "--control", "cannot read image", "broken.png")

    (folder / "broken.png").unlink()
    Image.new("L", (16, 24)).save(folder / "small.png")
    assert main(["sample", "--checkpoint", runs["controlnet"], "--control", str(folder), *base]) == 2
    _error(capsys, "--control", "small.png", "16x24", "(24, 16)", "32x32")

    (folder / "small.png").unlink()
    assert main(["sample", "--checkpoint", runs["controlnet"], "--control", str(folder), *base]) == 2
    _error(capsys, "--control", "no images")
    (folder / "m.csv").write_text("layout_path\na.png\n")
    assert main(["eval", "--checkpoint", runs["controlnet"], "--control", str(folder / "m.csv"), *base]) == 2
    _error(capsys, "--control", "control_path")
