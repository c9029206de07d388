"""The `layoutgen` command, in-process through layoutgen.cli.main and once as `python -m layoutgen`."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import layoutgen
from layoutgen.cli import main
from layoutgen.models.autoencoder import Autoencoder

REPO = Path(__file__).resolve().parents[1]
CODEC = dict(latent_channels=4, base_channels=8, norm_groups=4)
TINY = {
    "autoencoder": {
        "encoder": dict(downsampling_steps=2, **CODEC),
        "decoder": dict(upsampling_steps=2, heads=[
            {"type": "RGBHead", "name": "rgb", "out_channels": 3},
            {"type": "SegmentationHead", "name": "segmentation", "num_classes": 11},
        ], **CODEC),
    },
    "loss": [
        {"type": "MSELoss", "key": "rgb", "target": "rgb"},
        {"type": "CrossEntropyLoss", "key": "segmentation", "target": "segmentation", "weight": 0.05},
    ],
    "data": {"num_samples": 8, "image_size": 32},
    "training": {"epochs": 3, "batch_size": 4, "device": "cpu"},
}
# The quickstart's pipeline made tiny: 24 layouts of 32x32, two training steps per stage, two samples per class.
QUICKSTART_TINY = [
    "data.num_samples=24", "data.image_size=32", "data.val_fraction=0.2", "sample.per_class=2", "sample.reference=4",
    "autoencoder.training.max_steps=2", "autoencoder.training.batch_size=4", "autoencoder.training.device=cpu",
    *(f"autoencoder.autoencoder.{part}.{key}" for part in ("encoder", "decoder")
      for key in ("base_channels=8", "norm_groups=4")),
    "diffusion.diffusion.unet.base_channels=8", "diffusion.diffusion.unet.norm_groups=4",
    "sample.steps=2", "diffusion.training.max_steps=2", "diffusion.training.batch_size=4",
    "diffusion.training.device=cpu",
]


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY, sort_keys=False))
    return path


def _sets(pairs):
    return [arg for pair in pairs for arg in ("--set", pair)]


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    assert f"layoutgen {layoutgen.__version__}" in out


def test_info_names_the_group_norm_path(capsys, monkeypatch):
    """With the Triton kernels selected, `info` says which chunked kernels the large groups take (the environment's
    choice); with the reference it says reference."""
    monkeypatch.setenv("LAYOUTGEN_KERNEL_BACKEND", "triton")
    monkeypatch.setenv("LAYOUTGEN_GN_CHUNKED", "one-pass")
    assert main(["info"]) == 0
    assert "triton (groups too large for registers: one-pass kernels)" in capsys.readouterr().out
    monkeypatch.setenv("LAYOUTGEN_KERNEL_BACKEND", "reference")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "group_norm_silu on" in out and "reference (PyTorch)" in out and "one-pass" not in out


def test_info_says_when_triton_is_asked_for_but_missing(capsys, monkeypatch):
    """`info` asks the ops' own rule (use_triton), so backend 'triton' without triton installed shows the ops' refusal
    instead of claiming the kernels run, and info itself still succeeds."""
    from layoutgen.kernels import backend
    monkeypatch.setattr(backend, "TRITON_INSTALLED", False)
    monkeypatch.setenv("LAYOUTGEN_KERNEL_BACKEND", "triton")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "group_norm_silu on" in out and "refused: " in out and "triton is not installed" in out
    assert "groups too large for registers" not in out


def test_info_as_a_module():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "layoutgen", "info"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert torch.__version__ in proc.stdout
    assert "Traceback" not in proc.stderr


def test_train(tmp_path, tiny_config, capsys):
    out = tmp_path / "run"
    code = main(["train", "--config", str(tiny_config), "--out", str(out), "--no-progress",
                 "--set", "training.max_steps=2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "results:" in captured.out
    assert "rgb_psnr" in captured.out and "segmentation_mean_iou" in captured.out
    steps = [line.split() for line in captured.out.splitlines() if line.split()[:1] == ["steps"]]
    assert steps == [["steps", "2"]]
    checkpoint = out / "autoencoder.safetensors"
    assert checkpoint.is_file()
    assert Autoencoder.from_checkpoint(str(checkpoint)).cfg.encoder.base_channels == 8
    for name in ("metrics.csv", "config.yaml", "reconstructions.png"):
        assert (out / name).is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["max_steps"] == 2


def test_train_with_a_missing_config_exits_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "does_not_exist.yaml"
    code = main(["train", "--config", str(missing), "--out", str(tmp_path / "run"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert str(missing) in lines[0]
    assert "Traceback" not in captured.err
    assert not (tmp_path / "run").exists()


def test_train_with_an_unknown_key_exits_2_naming_it(tmp_path, tiny_config, capsys):
    code = main(["train", "--config", str(tiny_config), "--out", str(tmp_path / "run"), "--no-progress",
                 "--set", "training.lerning_rate=1"])
    captured = capsys.readouterr()
    assert code == 2
    assert "training.lerning_rate" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("bad", ["foo", "training.device=[cpu"])
def test_train_with_a_malformed_override_exits_2(tmp_path, tiny_config, capsys, bad):
    code = main(["train", "--config", str(tiny_config), "--out", str(tmp_path / "run"), "--no-progress",
                 "--set", bad])
    captured = capsys.readouterr()
    assert code == 2
    assert bad.split("=")[0] in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_train_with_malformed_yaml_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {epochs: 1\n")
    code = main(["train", "--config", str(bad), "--out", str(tmp_path / "run"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert str(bad) in lines[0] and "YAML" in lines[0]


def test_quickstart_tiny(tmp_path, capsys):
    out = tmp_path / "quick"
    code = main(["quickstart", "--out", str(out), "--no-progress", *_sets(QUICKSTART_TINY)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for stage in ("[1/5] data", "[2/5] autoencoder", "[3/5] embed", "[4/5] diffusion", "[5/5] sample"):
        assert stage in captured.out
    for key in ("palette_fidelity", "room_rectangularity", "class_conditional_accuracy", "memorisation"):
        assert key in captured.out
    for path in ("data/manifest.csv", "autoencoder/autoencoder.safetensors", "latents/manifest.csv",
                 "diffusion/diffusion.safetensors", "samples.png", "samples.safetensors", "metrics.json",
                 "config.yaml"):
        assert (out / path).is_file(), path
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["autoencoder"]["autoencoder"]["encoder"]["base_channels"] == 8
    assert config["autoencoder"]["autoencoder"]["encoder"]["downsampling_steps"] == 2  # the quickstart's own setting
    assert config["data"]["image_size"] == 32
    # one row of 2 samples per layout type: 4 rows of 32-pixel tiles
    from PIL import Image
    width, height = Image.open(out / "samples.png").size
    assert height == 4 * (32 + 2) + 2 and width > 2 * (32 + 2)


def test_quickstart_bad_key_is_one_line_naming_it(tmp_path, capsys):
    code = main(["quickstart", "--out", str(tmp_path / "q"), "--set", "diffusion.training.epoks=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "diffusion.training.epoks" in err[0]


def test_no_subcommand_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err.lower()


def test_train_requires_config(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train"])
    assert info.value.code == 2
    assert "--config" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# layoutgen data synth / layoutgen embed
# ----------------------------------------------------------------------------------------------------------------------


def test_data_synth_writes_a_deterministic_manifest(tmp_path, capsys):
    import pandas as pd

    for name in ("a", "b"):
        assert main(["data", "synth", "--out", str(tmp_path / name), "--num", "6", "--size", "32", "--seed", "3"]) == 0
    assert "wrote 6 layouts of 32x32" in capsys.readouterr().out
    frame = pd.read_csv(tmp_path / "a" / "manifest.csv")
    assert len(frame) == 6 and {"layout_path", "seg_path", "control_path", "type", "is_empty", "room_count"} <= set(
        frame.columns)
    for column in ("layout_path", "seg_path", "control_path"):
        for rel in frame[column]:
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert main(["data", "synth", "--out", str(tmp_path / "c"), "--num", "6", "--size", "32", "--seed", "4"]) == 0
    assert (tmp_path / "c" / "images" / "00000.png").read_bytes() != (tmp_path / "a" / "images" / "00000.png").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--num", "0"], "--num must be >= 1"),
    (["--size", "8"], "--size must be >= 32"),
    (["--empty-prob", "2"], "--empty-prob must be in [0, 1]"),
])
def test_data_synth_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, message):
    code = main(["data", "synth", "--out", str(tmp_path / "d"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_embed_command_and_resume(tmp_path, capsys):
    from layoutgen.models.datasets import write_synthetic_dataset

    manifest = write_synthetic_dataset(tmp_path / "data", num=5, size=32, seed=1)
    Autoencoder.from_config(TINY["autoencoder"]).save_checkpoint(tmp_path / "ae.safetensors")
    args = ["embed", "--autoencoder", str(tmp_path / "ae.safetensors"), "--manifest", str(manifest),
            "--out", str(tmp_path / "lat"), "--batch-size", "2", "--no-progress"]
    assert main(args) == 0
    assert "embedded 5 images (0 already done" in capsys.readouterr().out
    assert main(args) == 0
    assert "embedded 0 images (5 already done" in capsys.readouterr().out
    assert (tmp_path / "lat" / "manifest.csv").is_file()


@pytest.mark.parametrize("which", ["autoencoder", "manifest", "checkpoint"])
def test_embed_user_mistakes_exit_2_with_one_line(tmp_path, capsys, which):
    from layoutgen.models.datasets import write_synthetic_dataset

    manifest = write_synthetic_dataset(tmp_path / "data", num=2, size=32)
    checkpoint = tmp_path / "ae.safetensors"
    Autoencoder.from_config(TINY["autoencoder"]).save_checkpoint(checkpoint)
    if which == "autoencoder":
        checkpoint = tmp_path / "missing.safetensors"
    elif which == "manifest":
        manifest = tmp_path / "missing.csv"
    else:
        checkpoint.write_bytes(b"not a checkpoint at all")
    code = main(["embed", "--autoencoder", str(checkpoint), "--manifest", str(manifest), "--out",
                 str(tmp_path / "lat"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert ("missing" in err) if which != "checkpoint" else ("checkpoint" in err or "safetensors" in err)
