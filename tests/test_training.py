"""Autoencoder experiments through run_experiment (the Trainer) on a tiny experiment: what a run writes, what it
returns, steps, NaN skipping, the LR schedule, the train/validation split, evaluation and AMP."""
import copy
import csv
import math

import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

import layoutgen.training.run as run_module
from layoutgen import metrics
from layoutgen.models.autoencoder import Autoencoder
from layoutgen.models.datasets.synthetic import SyntheticLayoutDataset
from layoutgen.training.autoencoder import CHECKPOINT_NAME, evaluate, split_indices, warmup_cosine
from layoutgen.training.experiment import AutoencoderExperiment, load_experiment
from layoutgen.training.run import run_experiment

CODEC = dict(latent_channels=4, base_channels=8, norm_groups=4)
HEADS = [
    {"type": "RGBHead", "name": "rgb", "out_channels": 3},
    {"type": "SegmentationHead", "name": "segmentation", "num_classes": 11},
    {"type": "ClassificationHead", "name": "classification", "num_classes": 4},
]
TINY = {
    "autoencoder": {
        "encoder": dict(downsampling_steps=2, **CODEC),
        "decoder": dict(upsampling_steps=2, heads=HEADS, **CODEC),
    },
    "loss": [
        {"type": "MSELoss", "key": "rgb", "target": "rgb"},
        {"type": "CrossEntropyLoss", "key": "segmentation", "target": "segmentation", "weight": 0.05},
        {"type": "CrossEntropyLoss", "key": "classification", "target": "label", "weight": 0.01},
        {"type": "LatentStandardizationLoss", "key": "latent", "weight": 0.001},
    ],
    # 12 samples, 1 for validation: 11 training items -> 2 full batches of 4 per epoch, so 2 epochs make 4 steps
    # and max_steps=3 cuts them short.
    "data": {"num_samples": 12, "image_size": 32, "val_fraction": 0.1},
    "training": {"epochs": 2, "batch_size": 4, "max_steps": 3, "warmup_steps": 1, "log_every": 2, "device": "cpu"},
}


def train_autoencoder(experiment: dict, out_dir: str, progress: bool = False) -> dict:
    return run_experiment("autoencoder", AutoencoderExperiment.from_dict(experiment), out_dir, progress=progress)


def tiny(**sections) -> dict:
    """The tiny experiment with some keys of some sections changed: tiny(training={"amp": "bf16"})."""
    exp = copy.deepcopy(TINY)
    for section, changes in sections.items():
        exp[section].update(changes)
    return exp


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    results = train_autoencoder(TINY, str(out), progress=False)
    return out, results


# ----------------------------------------------------------------------------------------------- what a run writes
def test_run_writes_a_loadable_checkpoint_with_the_config(run):
    out, results = run
    path = out / CHECKPOINT_NAME
    assert path.is_file()
    assert results["checkpoint"] == str(path)
    model = Autoencoder.from_checkpoint(str(path))
    assert isinstance(model, Autoencoder)
    expected = Autoencoder.from_config(AutoencoderExperiment.from_dict(TINY).autoencoder)
    assert model.config == expected.config
    # the weights are finite and trained: they differ from the initial model (the loop seeds torch first)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    torch.manual_seed(AutoencoderExperiment.from_dict(TINY).training.seed)
    initial = Autoencoder.from_config(AutoencoderExperiment.from_dict(TINY).autoencoder)
    assert any(not torch.equal(a, b) for a, b in zip(initial.parameters(), model.parameters()))


def test_run_writes_metrics_csv(run):
    out, results = run
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows = [r for r in rows if r.get("loss")]   # training rows (the others: validation at each epoch's end)
    assert rows, "metrics.csv has no rows"
    assert {"step", "loss", "lr"} <= set(rows[0])
    # log_every=2 and the last step: rows at steps 2 and 3
    assert [int(r["step"]) for r in rows] == [2, results["steps"]]
    for row in rows:
        assert math.isfinite(float(row["loss"]))
        for part in ("rgb", "segmentation", "classification"):
            assert math.isfinite(float(row[part]))


def test_run_writes_a_config_that_reloads_to_an_equal_experiment(run):
    out, _ = run
    reloaded = load_experiment(str(out / "config.yaml"))
    assert reloaded == AutoencoderExperiment.from_dict(TINY)
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["max_steps"] == 3


def test_run_writes_a_readable_reconstruction_grid(run):
    out, _ = run
    with Image.open(out / "reconstructions.png") as image:
        image.load()
        assert image.format == "PNG"
        width, height = image.size
        mode = image.mode
    size = TINY["data"]["image_size"]
    assert mode == "RGB"
    # input, RGB reconstruction and segmentation colour map side by side: at least 3 tiles wide, 1 row high
    assert width >= 3 * size and height >= size


def test_run_returns_metrics_of_every_head_and_the_step_counts(run):
    _, results = run
    for key in ("rgb_psnr", "segmentation_pixel_accuracy", "segmentation_mean_iou", "classification_accuracy"):
        assert key in results
        assert isinstance(results[key], float)
    assert 0.0 <= results["segmentation_pixel_accuracy"] <= 1.0
    assert 0.0 <= results["classification_accuracy"] <= 1.0
    assert 0.0 <= results["segmentation_mean_iou"] <= 1.0
    assert math.isfinite(results["rgb_psnr"])
    assert results["steps"] == TINY["training"]["max_steps"]   # 4 steps in 2 epochs, cut to max_steps
    assert results["skipped_steps"] == 0
    assert results["seconds"] > 0


def test_without_max_steps_it_runs_every_epoch(tmp_path):
    results = train_autoencoder(tiny(training={"max_steps": None, "epochs": 1}), str(tmp_path), progress=False)
    assert results["steps"] == 2            # 11 training items, batch 4, drop_last -> 2 steps per epoch


def test_max_steps_cuts_within_the_first_epoch(tmp_path):
    results = train_autoencoder(tiny(training={"max_steps": 1}), str(tmp_path), progress=False)
    assert results["steps"] == 1


# ------------------------------------------------------------------------------------------------------ NaN losses
def _nan_on_calls(monkeypatch, bad_calls: set):
    """Makes the loss NaN on the given (0-based) training calls; returns the list of call indices seen."""
    real_build_loss = run_module.build_loss
    seen = []

    class NanOnSomeCalls(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, outputs, batch):
            total, logs = self.inner(outputs, batch)
            if not torch.is_grad_enabled():   # a validation call (no_grad), not a training step
                return total, logs
            call = len(seen)
            seen.append(call)
            if call in bad_calls:
                total = total * float("nan")
            return total, logs

    monkeypatch.setattr(run_module, "build_loss", lambda config: NanOnSomeCalls(real_build_loss(config)))
    return seen


def test_a_nan_loss_step_is_skipped(tmp_path, monkeypatch):
    seen = _nan_on_calls(monkeypatch, {1})
    results = train_autoencoder(TINY, str(tmp_path), progress=False)
    assert len(seen) == 3
    assert results["skipped_steps"] == 1
    assert results["steps"] == 3
    model = Autoencoder.from_checkpoint(str(tmp_path / CHECKPOINT_NAME))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(results["rgb_psnr"])


def test_nan_losses_never_change_the_weights(tmp_path, monkeypatch):
    _nan_on_calls(monkeypatch, {0, 1, 2})
    results = train_autoencoder(TINY, str(tmp_path), progress=False)
    assert results["skipped_steps"] == 3
    trained = Autoencoder.from_checkpoint(str(tmp_path / CHECKPOINT_NAME))
    # the loop seeds torch with training.seed before building the model: rebuild that initial model
    torch.manual_seed(AutoencoderExperiment.from_dict(TINY).training.seed)
    initial = Autoencoder.from_config(AutoencoderExperiment.from_dict(TINY).autoencoder)
    for (name, a), b in zip(initial.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), f"{name} changed although every loss was NaN"


def test_a_finite_loss_with_non_finite_gradients_is_skipped(tmp_path, monkeypatch):
    # The loss stays finite, but a hook makes one parameter's gradient NaN on the second backward.
    real_init = Autoencoder.__init__
    backward_calls = []

    def init_with_nan_hook(self, *args, **kwargs):
        real_init(self, *args, **kwargs)

        def hook(grad):
            backward_calls.append(1)
            return grad * float("nan") if len(backward_calls) == 2 else grad
        self.encoder.conv_in.weight.register_hook(hook)

    monkeypatch.setattr(Autoencoder, "__init__", init_with_nan_hook)
    results = train_autoencoder(TINY, str(tmp_path), progress=False)
    assert len(backward_calls) == 3
    assert results["skipped_steps"] == 1
    trained = Autoencoder.from_checkpoint(str(tmp_path / CHECKPOINT_NAME))
    assert all(torch.isfinite(p).all() for p in trained.parameters())


# -------------------------------------------------------------------------------------------------- LR schedule
@pytest.mark.parametrize("warmup, total", [(5, 20), (1, 10), (10, 11), (4, 100)])
def test_warmup_cosine(warmup, total):
    factor = warmup_cosine(warmup, total)
    values = [factor(s) for s in range(total + 1)]
    # linear warmup: (s + 1) / warmup, reaching 1.0 at the last warmup step
    for s in range(warmup):
        assert values[s] == pytest.approx((s + 1) / warmup)
    assert values[warmup - 1] == pytest.approx(1.0)
    assert values[warmup] == pytest.approx(1.0)          # the cosine starts at 1
    assert values[total] == pytest.approx(0.0, abs=1e-12)  # and ends at 0
    after = values[warmup:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))   # monotone decrease after warmup
    assert all(0.0 <= v <= 1.0 + 1e-12 for v in values)
    # half-way through the decay the cosine is at 0.5
    if (total - warmup) % 2 == 0:
        assert factor(warmup + (total - warmup) // 2) == pytest.approx(0.5)
    # past the end it stays at 0
    assert factor(total + 5) == pytest.approx(0.0, abs=1e-12)


def test_warmup_cosine_without_warmup_starts_at_one():
    factor = warmup_cosine(0, 10)
    assert factor(0) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------ train/val split
@pytest.mark.parametrize("n, val_fraction", [(12, 0.1), (100, 0.25), (2, 0.5), (7, 0.0), (5, 0.01), (3, 0.9)])
def test_split_indices(n, val_fraction):
    train, val = split_indices(n, val_fraction, seed=3)
    assert (train, val) == split_indices(n, val_fraction, seed=3)       # deterministic
    assert not set(train) & set(val)                                   # disjoint
    assert sorted(train + val) == list(range(n))                       # covering
    if val_fraction > 0:
        assert len(val) >= 1
        assert len(train) >= 1
    else:
        assert val == []
    if n >= 20:
        assert len(val) == round(n * val_fraction)


def test_split_indices_depends_on_the_seed():
    assert split_indices(50, 0.2, seed=0) != split_indices(50, 0.2, seed=1)


def test_a_tiny_dataset_with_a_large_val_fraction_still_trains(tmp_path):
    results = train_autoencoder(tiny(data={"num_samples": 3, "val_fraction": 0.9}, training={"max_steps": 1}),
                                str(tmp_path), progress=False)
    assert results["steps"] == 1


# ------------------------------------------------------------------------------------------------------- evaluate
def test_evaluate_matches_the_metrics_of_the_models_outputs():
    torch.manual_seed(0)
    model = Autoencoder.from_config(AutoencoderExperiment.from_dict(TINY).autoencoder)
    model.train()
    data = SyntheticLayoutDataset(6, size=32, seed=1)
    loader = DataLoader(data, batch_size=4)
    results = evaluate(model, loader, torch.device("cpu"))
    assert model.training, "evaluate must restore training mode"
    assert set(results) == {"rgb_psnr", "segmentation_pixel_accuracy", "segmentation_mean_iou",
                            "classification_accuracy"}
    batch = next(iter(DataLoader(data, batch_size=6)))
    model.eval()
    with torch.no_grad():
        out = model(batch["rgb"])
    assert results["rgb_psnr"] == pytest.approx(metrics.psnr(out["rgb"], batch["rgb"]), rel=1e-5)
    assert results["segmentation_pixel_accuracy"] == pytest.approx(
        metrics.pixel_accuracy(out["segmentation"], batch["segmentation"]))
    assert results["segmentation_mean_iou"] == pytest.approx(metrics.mean_iou(out["segmentation"],
                                                                              batch["segmentation"]))
    assert results["classification_accuracy"] == pytest.approx(metrics.accuracy(out["classification"],
                                                                                batch["label"]))


def test_evaluate_only_reports_the_heads_a_model_has():
    model = Autoencoder(encoder=dict(downsampling_steps=2, **CODEC),
                        decoder=dict(upsampling_steps=2, heads=HEADS[:1], **CODEC))
    results = evaluate(model, DataLoader(SyntheticLayoutDataset(2, size=32), batch_size=2), torch.device("cpu"))
    assert set(results) == {"rgb_psnr"}


# ------------------------------------------------------------------------------------------------------------ AMP
def test_fp16_amp_on_the_cpu_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"training\.amp"):
        train_autoencoder(tiny(training={"amp": "fp16", "max_steps": 1}), str(tmp_path), progress=False)


def test_bf16_amp_on_the_cpu_runs(tmp_path):
    results = train_autoencoder(tiny(training={"amp": "bf16", "max_steps": 2}), str(tmp_path), progress=False)
    assert results["steps"] == 2
    assert results["skipped_steps"] == 0
    model = Autoencoder.from_checkpoint(str(tmp_path / CHECKPOINT_NAME))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_cuda_device_without_cuda_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match=r"training\.device"):
        train_autoencoder(tiny(training={"device": "cuda"}), str(tmp_path), progress=False)
