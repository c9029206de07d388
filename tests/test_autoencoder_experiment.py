"""Autoencoder experiments on the Trainer: exact resume, manifest data (torch and DALI loaders), weighted sampling
kept through the Trainer, and the validation metrics computed from sums."""
import copy
import csv
import math

import pytest
import yaml
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from layoutgen import metrics
from layoutgen.models.autoencoder import Autoencoder
from layoutgen.models.datasets.synthetic import SyntheticLayoutDataset, write_synthetic_dataset
from layoutgen.models.losses.base_loss import build_loss
from layoutgen.training.autoencoder import evaluate
from layoutgen.training.experiment import AutoencoderExperiment
from layoutgen.training.run import build_loaders, check_data, run_experiment
from layoutgen.training.trainer import Trainer

from tiny_configs import LOSS, autoencoder as tiny_autoencoder

# 12 synthetic items, 3 for validation: 9 training items -> 2 full batches of 4 per epoch (drop_last), 6 steps.
TINY = {
    "autoencoder": tiny_autoencoder(),
    "loss": LOSS,
    "data": {"num_samples": 12, "image_size": 32, "val_fraction": 0.25},
    "training": {"epochs": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "device": "cpu",
                 "preview_every": None},
}


def experiment(**sections) -> AutoencoderExperiment:
    exp = copy.deepcopy(TINY)
    for section, changes in sections.items():
        # a manifest section replaces the synthetic one (their keys differ); other changes are merged
        exp[section] = dict(changes) if "manifest" in changes else {**exp[section], **changes}
    return AutoencoderExperiment.from_dict(exp)


def losses(out_dir) -> list[float]:
    with open(out_dir / "metrics.csv", newline="") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh) if r.get("loss")]


def assert_same_run(a, b) -> None:
    """Bit-identical training: the same logged losses and the same saved weights."""
    assert losses(a) == losses(b)
    wa, wb = load_file(str(a / "autoencoder.safetensors")), load_file(str(b / "autoencoder.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return str(write_synthetic_dataset(tmp_path_factory.mktemp("synth"), num=14, size=32, seed=2))


def test_stop_and_resume_equals_one_run_with_ema(tmp_path):
    exp = experiment(training={"ema_decay": 0.9})
    full = run_experiment("autoencoder", exp, str(tmp_path / "full"), progress=False)
    assert full["steps"] == 6 and full["resumed_from"] is None
    stopped = run_experiment("autoencoder", exp, str(tmp_path / "cut"), progress=False, stop_at_step=3)
    assert stopped["interrupted"] and stopped["steps"] == 3          # mid-epoch 1
    assert not (tmp_path / "cut" / "autoencoder.safetensors").exists()
    resumed = run_experiment("autoencoder", exp, str(tmp_path / "cut"), resume=True, progress=False)
    assert resumed["resumed_from"] == 3 and resumed["steps"] == 6
    assert_same_run(tmp_path / "full", tmp_path / "cut")
    for key in ("rgb_psnr", "segmentation_pixel_accuracy", "segmentation_mean_iou", "classification_accuracy"):
        assert resumed[key] == full[key]
    assert (tmp_path / "cut" / "reconstructions.png").is_file()


def test_summary_metrics_are_those_of_the_saved_weights(tmp_path):
    exp = experiment(training={"epochs": 1, "ema_decay": 0.5})
    summary = run_experiment("autoencoder", exp, str(tmp_path), progress=False)
    model = Autoencoder.from_checkpoint(summary["checkpoint"])
    train, val = build_loaders(check_data(exp.data), exp.training, "autoencoder")
    batch = next(iter(DataLoader(val.dataset, batch_size=len(val.dataset))))
    model.eval()
    with torch.no_grad():
        out = model(batch["rgb"])
    # the EMA weights were saved and evaluated: the returned metrics are theirs
    assert summary["rgb_psnr"] == pytest.approx(metrics.psnr(out["rgb"], batch["rgb"]), rel=1e-9)
    assert summary["segmentation_mean_iou"] == pytest.approx(
        metrics.mean_iou(out["segmentation"], batch["segmentation"]), rel=1e-9)
    assert summary["val_rgb_psnr"] == summary["rgb_psnr"]


def test_manifest_data_trains_with_the_default_autoencoder_outputs(manifest, tmp_path):
    exp = experiment(data={"manifest": manifest, "val_fraction": 0.25, "image_size": 32}, training={"epochs": 1})
    assert exp.data.loader == "torch"
    train, val = build_loaders(check_data(exp.data), exp.training, "autoencoder")
    assert {"rgb", "segmentation", "label"} <= set(next(iter(train)))
    summary = run_experiment("autoencoder", exp, str(tmp_path), progress=False)
    for key in ("rgb_psnr", "segmentation_mean_iou", "classification_accuracy"):
        assert math.isfinite(summary[key])
    # a typo in the manifest section names its key
    with pytest.raises(ValueError, match=r"data\.loadr"):
        experiment(data={"manifest": manifest, "loadr": "dali"})
    with pytest.raises(ValueError, match=r"data\.loader"):
        experiment(data={"manifest": manifest, "loader": "fast"})


def test_weighted_sampling_is_kept_by_the_trainer_and_resumes_exactly(manifest, tmp_path):
    exp = experiment(data={"manifest": manifest, "val_fraction": 0.25, "weighted_sampling": True,
                           "sampling_power": 1.0})
    train, val = build_loaders(check_data(exp.data), exp.training, "autoencoder")
    trainer = Trainer(Autoencoder.from_config(exp.autoencoder), build_loss(exp.loss), train, val,
                      config=exp.training, out_dir=str(tmp_path / "probe"), progress=False)
    assert trainer._loader is None                       # not replaced by an EpochSampler loader
    # each epoch draws its own weighted sample: the trainer sets the epoch on the loader's batch sampler
    first = [b["index"].tolist() for b in trainer._epoch_batches(0, 0)]
    second = [b["index"].tolist() for b in trainer._epoch_batches(1, 0)]
    assert first != second
    assert [b["index"].tolist() for b in trainer._epoch_batches(1, 1)] == second[1:]
    run_experiment("autoencoder", exp, str(tmp_path / "full"), progress=False)
    run_experiment("autoencoder", exp, str(tmp_path / "cut"), progress=False, stop_at_step=4)
    run_experiment("autoencoder", exp, str(tmp_path / "cut"), resume=True, progress=False)
    assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_dali_loader_trains_like_the_torch_loader_and_resumes(manifest, tmp_path):
    pytest.importorskip("nvidia.dali")
    data = {"manifest": manifest, "val_fraction": 0.25}
    torch_run = run_experiment("autoencoder", experiment(data=data), str(tmp_path / "torch"), progress=False)
    exp = experiment(data={**data, "loader": "dali", "dali_threads": 1})
    train, _ = build_loaders(check_data(exp.data), exp.training, "autoencoder")
    assert type(train).__name__ == "DaliLoader"
    del train
    dali_run = run_experiment("autoencoder", exp, str(tmp_path / "dali"), progress=False)
    assert dali_run["steps"] == torch_run["steps"]
    # the same rows in the same order, decoded to the same values: the same training
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "dali")), torch.tensor(losses(tmp_path / "torch")),
                               rtol=1e-5, atol=1e-6)
    run_experiment("autoencoder", exp, str(tmp_path / "cut"), progress=False, stop_at_step=3)
    run_experiment("autoencoder", exp, str(tmp_path / "cut"), resume=True, progress=False)
    assert_same_run(tmp_path / "dali", tmp_path / "cut")


def test_evaluate_sums_add_up_over_batches():
    """evaluate reduces sums, so any batching gives the metrics of the whole set (what DDP relies on)."""
    torch.manual_seed(0)
    model = Autoencoder.from_config(experiment().autoencoder)
    data = SyntheticLayoutDataset(7, size=32, seed=4)
    whole = evaluate(model, DataLoader(data, batch_size=7), torch.device("cpu"))
    for size in (1, 3):
        parts = evaluate(model, DataLoader(data, batch_size=size), torch.device("cpu"))
        assert parts.keys() == whole.keys()
        for key in whole:
            # (the model itself gives float32 outputs that differ slightly with the batch size)
            assert parts[key] == pytest.approx(whole[key], rel=1e-6), key


def test_a_manifest_experiments_saved_config_reloads_and_a_split_is_refused():
    exp = AutoencoderExperiment.from_dict({"autoencoder": tiny_autoencoder(),
                                           "data": {"manifest": "data/manifest.csv", "val_fraction": 0.2}})
    assert AutoencoderExperiment.from_dict(yaml.safe_load(exp.to_yaml())) == exp   # carries split: all
    with pytest.raises(ValueError, match=r"data\.split"):
        AutoencoderExperiment.from_dict({"data": {"manifest": "data/manifest.csv", "split": "train"}})
