"""`layoutgen train` for every experiment kind, `sample`, `eval`, and their error cases (tiny models, 32x32)."""
import json

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from layoutgen.cli import main
from layoutgen.models.controlnet_diffusion import ControlNetDiffusion
from layoutgen.models.diffusion import DiffusionModel
from layoutgen.training.experiment import AutoencoderExperiment, load_any_experiment, load_experiment
from layoutgen.training.run import ControlNetExperiment, DiffusionExperiment

from tiny_configs import UNET, autoencoder as tiny_autoencoder

AUTOENCODER = {
    "autoencoder": tiny_autoencoder(),
    "loss": [{"type": "MSELoss", "key": "rgb", "target": "rgb"}],
    "data": {"num_samples": 8, "image_size": 32},
    "training": {"epochs": 1, "max_steps": 2, "batch_size": 4, "device": "cpu"},
}
MODEL = {"unet": UNET, "scheduler": {"type": "CosineScheduler", "num_steps": 50}, "latent_size": [8, 8],
         "sample_steps": 3, "guidance_scale": 1.0}
TRAINING = {"epochs": 2, "max_steps": 2, "batch_size": 4, "device": "cpu", "warmup_steps": 1, "log_every": 1}


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _train(config, out, *extra):
    return main(["train", "--config", config, "--out", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trains the three kinds in a chain (autoencoder -> diffusion on its latents -> controlnet over both)."""
    root = tmp_path_factory.mktemp("runs")
    ae_config = _write(root / "ae.yaml", AUTOENCODER)
    assert _train(ae_config, root / "ae") == 0
    ae = root / "ae" / "autoencoder.safetensors"
    diffusion = {"diffusion": {**MODEL, "autoencoder_checkpoint": str(ae)},
                 "data": {"num_samples": 12, "image_size": 32, "val_fraction": 0.25}, "training": TRAINING}
    diffusion_config = _write(root / "diffusion.yaml", diffusion)
    assert _train(diffusion_config, root / "diffusion") == 0
    base = root / "diffusion" / "diffusion.safetensors"
    controlnet = {"controlnet_diffusion": {**MODEL, "autoencoder_checkpoint": str(ae), "base_checkpoint": str(base),
                                           "controlnet": {"downsampling_factor": 4, "hint_channels": [8, 8, 8]}},
                  "data": {"num_samples": 8, "image_size": 32}, "training": TRAINING}
    controlnet_config = _write(root / "controlnet.yaml", controlnet)
    assert _train(controlnet_config, root / "controlnet") == 0
    return {"root": root, "ae": ae, "ae_config": ae_config, "diffusion": base, "diffusion_config": diffusion_config,
            "controlnet": root / "controlnet" / "controlnet.safetensors", "controlnet_config": controlnet_config}


def test_load_any_experiment_kinds(runs):
    kind, exp = load_any_experiment(runs["ae_config"])
    assert kind == "autoencoder" and isinstance(exp, AutoencoderExperiment)
    assert isinstance(load_experiment(runs["ae_config"]), AutoencoderExperiment)
    kind, exp = load_any_experiment(runs["diffusion_config"], ["training.ema_decay=0.9"])
    assert kind == "diffusion" and isinstance(exp, DiffusionExperiment) and exp.training.ema_decay == 0.9
    kind, exp = load_any_experiment(runs["controlnet_config"])
    assert kind == "controlnet" and isinstance(exp, ControlNetExperiment)


def test_every_kind_trains_and_saves_its_checkpoint(runs):
    assert runs["ae"].is_file()
    model = DiffusionModel.from_checkpoint(str(runs["diffusion"]))
    assert model.autoencoder is not None and torch.isfinite(model.latent_scale)
    assert (runs["root"] / "diffusion" / "checkpoints" / "latest.safetensors").is_file()
    assert (runs["root"] / "diffusion" / "metrics.csv").is_file()
    controlnet = ControlNetDiffusion.from_checkpoint(str(runs["controlnet"]))
    assert controlnet.cfg.base_checkpoint == str(runs["diffusion"])
    assert (runs["root"] / "controlnet" / "checkpoints" / "latest.safetensors").is_file()


def test_resume_continues(runs, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(runs["diffusion_config"], out, "--set", "training.max_steps=1") == 0
    capsys.readouterr()
    assert _train(runs["diffusion_config"], out, "--resume", "--set", "training.max_steps=2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert ["resumed_from", "1"] in [line.split() for line in lines]
    assert ["steps", "2"] in [line.split() for line in lines]


def test_autoencoder_resume_continues(runs, tmp_path, capsys):
    out = tmp_path / "ae"
    epochs = "training.epochs=3"   # 7 training items, batch 4: one step per epoch
    assert _train(runs["ae_config"], out, "--set", epochs, "--set", "training.max_steps=1") == 0
    capsys.readouterr()
    assert _train(runs["ae_config"], out, "--resume", "--set", epochs, "--set", "training.max_steps=2") == 0
    results = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()
               if len(line.split()) == 2}
    assert results["resumed_from"] == "1" and results["steps"] == "2"
    assert float(results["rgb_psnr"]) > 0 and results["checkpoint"] == str(out / "autoencoder.safetensors")
    assert (out / "checkpoints" / "latest.safetensors").is_file() and (out / "reconstructions.png").is_file()


def test_sample_writes_a_grid_and_latents(runs, tmp_path):
    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(runs["diffusion"]), "--num", "5", "--labels", "0,3", "--steps", "2",
                 "--sampler", "ddpm", "--guidance", "2", "--seed", "1", "--device", "cpu", "--out", str(out)]) == 0
    grid = Image.open(out / "samples.png")
    # 5 images of 32x32 in 3 columns and 2 rows, 2-pixel padding
    assert grid.size == (3 * 34 + 2, 2 * 34 + 2)
    tensors = load_file(str(out / "latents.safetensors"))
    assert tensors["latents"].shape == (5, 4, 8, 8)
    assert tensors["labels"].tolist() == [0, 3, 0, 3, 0]


def test_eval_autoencoder_and_diffusion(runs, tmp_path, capsys):
    out = tmp_path / "ae_eval"
    assert main(["eval", "--checkpoint", str(runs["ae"]), "--num", "4", "--size", "32", "--device", "cpu",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"rgb_psnr", "classification_accuracy"} <= set(metrics)
    out = tmp_path / "gen_eval"
    assert main(["eval", "--checkpoint", str(runs["diffusion"]), "--num", "4", "--steps", "2", "--device", "cpu",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"palette_fidelity", "room_rectangularity", "class_conditional_accuracy"} <= set(metrics)
    assert "palette_fidelity" in capsys.readouterr().out


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_unknown_section_exits_2(tmp_path, capsys):
    config = _write(tmp_path / "x.yaml", {"difusion": MODEL, "training": TRAINING})
    assert _train(config, tmp_path / "run") == 2
    _one_line_error(capsys, "no model section")
    config = _write(tmp_path / "y.yaml", {"diffusion": MODEL, "trainig": TRAINING})
    assert _train(config, tmp_path / "run") == 2
    _one_line_error(capsys, "trainig")


def test_bad_key_exits_2_naming_it(runs, tmp_path, capsys):
    assert _train(runs["diffusion_config"], tmp_path / "run", "--set", "diffusion.unet.base_chanels=8") == 2
    _one_line_error(capsys, "diffusion.unet.base_chanels")
    assert _train(runs["diffusion_config"], tmp_path / "run", "--set", "data.image_sise=8") == 2
    _one_line_error(capsys, "data.image_sise")


def test_missing_checkpoints_exit_2(runs, tmp_path, capsys):
    missing = str(tmp_path / "nope.safetensors")
    assert _train(runs["controlnet_config"], tmp_path / "run", "--set",
                  f"controlnet_diffusion.base_checkpoint={missing}") == 2
    _one_line_error(capsys, "controlnet_diffusion.base_checkpoint", "nope.safetensors")
    assert main(["sample", "--checkpoint", missing, "--out", str(tmp_path / "s")]) == 2
    _one_line_error(capsys, "nope.safetensors")
    assert main(["eval", "--checkpoint", missing, "--out", str(tmp_path / "e")]) == 2
    _one_line_error(capsys, "nope.safetensors")
    assert main(["sample", "--checkpoint", str(runs["ae"]), "--out", str(tmp_path / "s")]) == 2
    _one_line_error(capsys, "not a DiffusionModel")


def test_diffusion_and_controlnet_from_an_embedded_manifest(runs, tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path / "syn"), "--num", "8", "--size", "32"]) == 0
    assert main(["embed", "--autoencoder", str(runs["ae"]), "--manifest", str(tmp_path / "syn" / "manifest.csv"),
                 "--out", str(tmp_path / "lat"), "--no-progress"]) == 0
    data = {"manifest": str(tmp_path / "lat" / "manifest.csv"), "val_fraction": 0.25}
    config = _write(tmp_path / "d.yaml", {"diffusion": MODEL, "data": data, "training": TRAINING})
    assert _train(config, tmp_path / "d") == 0
    base = tmp_path / "d" / "diffusion.safetensors"
    controlnet = {**MODEL, "base_checkpoint": str(base),
                  "controlnet": {"downsampling_factor": 4, "hint_channels": [8, 8, 8]}}
    config = _write(tmp_path / "c.yaml", {"controlnet_diffusion": controlnet, "data": data, "training": TRAINING})
    assert _train(config, tmp_path / "c") == 0
    assert (tmp_path / "c" / "controlnet.safetensors").is_file()
