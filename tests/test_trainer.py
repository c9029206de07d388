"""The general Trainer: the three model kinds, frozen parts, exact resume, accumulation, NaN guard, early stop, EMA."""
import csv
import math

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from layoutgen.models.autoencoder import Autoencoder
from layoutgen.models.controlnet_diffusion import ControlNetDiffusion
from layoutgen.models.datasets.synthetic import SyntheticLayoutDataset
from layoutgen.models.diffusion import DiffusionModel
from layoutgen.models.losses.base_loss import build_loss
from layoutgen.training.checkpointing import load_training_state, read_training_metadata
from layoutgen.training.trainer import EpochSampler, Trainer, TrainerConfig

from tiny_configs import CODEC, HEADS, LOSS

UNET = dict(in_channels=4, base_channels=8, depth=2, num_res_blocks=1, time_dim=16, norm_groups=4, num_heads=2,
            num_classes=3)
BASE = dict(device="cpu", warmup_steps=1, lr=1e-3, log_every=1)


def autoencoder(dropout: float = 0.0, heads=HEADS) -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder.from_config({"encoder": dict(downsampling_steps=2, dropout=dropout, **CODEC),
                                    "decoder": dict(upsampling_steps=2, heads=heads, dropout=dropout, **CODEC)})


@pytest.fixture(scope="module")
def layouts():
    return SyntheticLayoutDataset(16, size=32, seed=0, empty_prob=0.0)


def loaders(data, n_train=12, batch=4, n_val=4):
    train = DataLoader(Subset(data, range(n_train)), batch_size=batch, shuffle=True)
    val = DataLoader(Subset(data, range(n_train, n_train + n_val)), batch_size=4) if n_val else None
    return train, val


class Latents(Dataset):
    """Pre-embedded random latents with labels and 32x32 control images."""

    def __init__(self, n: int, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.latent = torch.randn(n, 4, 8, 8, generator=g)
        self.label = torch.randint(0, 3, (n,), generator=g)
        self.control = torch.rand(n, 1, 32, 32, generator=g).round()

    def __len__(self) -> int:
        return len(self.latent)

    def __getitem__(self, i):
        return {"latent": self.latent[i], "label": self.label[i], "control": self.control[i]}


def diffusion() -> DiffusionModel:
    torch.manual_seed(0)
    return DiffusionModel(unet=UNET, scheduler={"type": "CosineScheduler", "num_steps": 50}, latent_size=[8, 8],
                          latent_scale=1.0)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------------ three model kinds
def test_autoencoder_trains_with_a_composite_loss(layouts, tmp_path):
    model = autoencoder()
    before = params(model)
    train, val = loaders(layouts)
    trainer = Trainer(model, build_loss(LOSS), train, val, config=dict(BASE, epochs=1), out_dir=tmp_path,
                      progress=False)
    summary = trainer.fit()
    assert summary["steps"] == 3 and summary["optimizer_steps"] == 3 and summary["skipped_steps"] == 0
    assert math.isfinite(summary["val_loss"]) and "val_rgb_psnr" in summary and "val_segmentation_mean_iou" in summary
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    rows = read_csv(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows if r.get("loss")] == ["1", "2", "3"]
    assert any(r.get("val_loss") for r in rows)
    assert summary["latest"] and summary["best"]


def test_diffusion_trains_on_latents_with_labels(tmp_path):
    model = diffusion()
    before = params(model)
    train = DataLoader(Latents(8), batch_size=4, shuffle=True)
    val = DataLoader(Latents(4, seed=2), batch_size=4)
    summary = Trainer(model, None, train, val, config=dict(BASE, epochs=2), out_dir=tmp_path,
                      progress=False).fit()
    assert summary["optimizer_steps"] == 4 and math.isfinite(summary["val_loss"])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_controlnet_trains_only_the_adapter(tmp_path):
    base = diffusion()
    torch.nn.init.normal_(base.unet.conv_out.weight, std=0.1)  # a non-zero base output passes gradients back
    model = ControlNetDiffusion.from_base(base, control_channels=1, downsampling_factor=4, hint_channels=[8, 8])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and adapter
    train = DataLoader(Latents(8), batch_size=4, shuffle=True)
    trainer = Trainer(model, None, train, None, config=dict(BASE, epochs=1), out_dir=tmp_path, progress=False)
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(id(p) in in_optimizer for p in model.unet.parameters())
    summary = trainer.fit()
    assert summary["optimizer_steps"] == 2
    named = dict(model.named_parameters())
    assert all(torch.equal(named[n], v) for n, v in frozen.items())
    assert any(not torch.equal(named[n], v) for n, v in adapter.items())


# ------------------------------------------------------------------------------------------------ exact resume
def test_stop_and_resume_is_bit_identical(layouts, tmp_path):
    config = dict(BASE, epochs=2)
    loss = [LOSS[0]]

    def run(out, stop=None, resume=False):
        torch.manual_seed(123)  # the RNG the dropout draws from; a resumed run restores it from the checkpoint
        train, val = loaders(layouts)
        model = autoencoder(dropout=0.2)
        trainer = Trainer(model, build_loss(loss), train, val, config=config, out_dir=out, resume=resume,
                          progress=False)
        return model, trainer.fit(stop_at_step=stop)

    straight, s_summary = run(tmp_path / "a")
    _, stopped = run(tmp_path / "b", stop=4)
    assert stopped["interrupted"] and stopped["steps"] == 4
    meta = read_training_metadata(tmp_path / "b" / "checkpoints" / "latest.safetensors")
    assert '"batch_in_epoch": 1' in meta["extra"] and meta["epoch"] == "1"
    torch.manual_seed(999)  # a different RNG state before resuming must not matter
    resumed, r_summary = run(tmp_path / "b", resume=True)
    assert r_summary["resumed_from"] == 4 and r_summary["steps"] == 6
    a = [r["loss"] for r in read_csv(tmp_path / "a" / "metrics.csv") if r.get("loss")]
    b = [r["loss"] for r in read_csv(tmp_path / "b" / "metrics.csv") if r.get("loss")]
    assert len(a) == 6 and a == b
    assert r_summary["val_loss"] == s_summary["val_loss"]
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    s = EpochSampler(10, seed=3)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert sorted(first) == list(range(10)) and first != second
    s.set_epoch(1, start=4)
    assert list(s) == second[4:]
    assert list(EpochSampler(10, seed=3)) == first


# ------------------------------------------------------------------------------------------------ accumulation
def test_grad_accumulation_matches_the_bigger_batch(layouts, tmp_path):
    loss = [LOSS[0]]  # per-sample losses only; GroupNorm has no batch dependence
    results = {}
    for name, batch, accum in (("big", 4, 1), ("accum", 2, 2)):
        train, _ = loaders(layouts, n_train=8, batch=batch, n_val=0)
        model = autoencoder(heads=HEADS[:1])
        summary = Trainer(model, build_loss(loss), train, None, config=dict(BASE, epochs=2, grad_accumulation=accum),
                          out_dir=tmp_path / name, progress=False).fit()
        results[name] = (model, summary)
    assert results["big"][1]["optimizer_steps"] == results["accum"][1]["optimizer_steps"] == 4
    big, acc = results["big"][0].state_dict(), results["accum"][0].state_dict()
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-4, atol=1e-5)


def test_grad_accumulation_steps_half_as_often(layouts, tmp_path):
    train, _ = loaders(layouts, n_train=8, batch=2, n_val=0)
    summary = Trainer(autoencoder(heads=HEADS[:1]), build_loss([LOSS[0]]), train, None,
                      config=dict(BASE, epochs=1, grad_accumulation=2), out_dir=tmp_path, progress=False).fit()
    assert summary["optimizer_steps"] == 2  # 4 batches


# ------------------------------------------------------------------------------------------------ NaN guard
class NaNOn:
    """A loss that is NaN on the given calls (1-based)."""

    def __init__(self, calls):
        self.loss, self.calls, self.n = build_loss([LOSS[0]]), set(calls), 0

    def __call__(self, out, batch):
        self.n += 1
        loss, logs = self.loss(out, batch)
        return (loss * float("nan") if self.n in self.calls else loss), logs


def test_a_nan_step_is_skipped_and_the_run_goes_on(layouts, tmp_path):
    train, _ = loaders(layouts)
    model = autoencoder(heads=HEADS[:1])
    summary = Trainer(model, NaNOn({2}), train, None, config=dict(BASE, epochs=1), out_dir=tmp_path,
                      progress=False).fit()
    assert summary["steps"] == 3 and summary["skipped_steps"] == 1 and summary["optimizer_steps"] == 2
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_nan_steps_in_a_row_stop_the_run_and_never_overwrite_latest(layouts, tmp_path):
    train, _ = loaders(layouts, n_train=16, batch=2, n_val=0)  # 8 steps per epoch
    model = autoencoder(heads=HEADS[:1])
    trainer = Trainer(model, NaNOn({3, 4, 5, 6}), train, None,
                      config=dict(BASE, epochs=1, max_nonfinite=3, checkpoint_every=1), out_dir=tmp_path,
                      progress=False)
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row"):
        trainer.fit()
    assert trainer.step == 5 and trainer.skipped == 3
    latest = tmp_path / "checkpoints" / "latest.safetensors"
    assert read_training_metadata(latest)["step"] == "2"  # the last good step
    fresh = autoencoder(heads=HEADS[:1])
    load_training_state(latest, model=fresh, restore_rng=False)
    assert all(torch.isfinite(v).all() for v in fresh.state_dict().values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------------ early stopping
def test_early_stopping_when_the_val_loss_stops_improving(layouts, tmp_path):
    train, val = loaders(layouts, n_train=8, batch=4)
    summary = Trainer(autoencoder(heads=HEADS[:1]), build_loss([LOSS[0]]), train, val,
                      config=dict(BASE, lr=0.0, epochs=10, early_stopping_patience=2), out_dir=tmp_path,
                      progress=False).fit()
    # lr=0: the val loss never changes, so epochs 2 and 3 do not improve on epoch 1
    assert summary["stopped_early"] and summary["epochs"] == 3 and summary["steps"] == 6


# ------------------------------------------------------------------------------------------------ EMA
def test_saved_weights_are_the_ema_weights(layouts, tmp_path):
    train, val = loaders(layouts, n_train=8, batch=4)
    model = autoencoder(heads=HEADS[:1])
    trainer = Trainer(model, build_loss([LOSS[0]]), train, val, config=dict(BASE, lr=1e-2, epochs=2, ema_decay=0.9),
                      out_dir=tmp_path, progress=False)
    trainer.fit()
    ema_model, live = autoencoder(heads=HEADS[:1]), model.state_dict()
    trainer.ema.copy_to(ema_model)
    for name in ("latest", "best"):
        saved = autoencoder(heads=HEADS[:1])
        load_training_state(tmp_path / "checkpoints" / f"{name}.safetensors", model=saved, restore_rng=False)
        state = saved.state_dict()
        assert any(not torch.equal(state[k], live[k]) for k in live)  # not the live weights
        if name == "latest":
            for k, v in ema_model.state_dict().items():
                assert torch.equal(state[k], v), k
    # resuming puts the live weights back (not the EMA ones)
    resumed = autoencoder(heads=HEADS[:1])
    Trainer(resumed, build_loss([LOSS[0]]), *loaders(layouts, n_train=8, batch=4),
            config=dict(BASE, lr=1e-2, epochs=2, ema_decay=0.9), out_dir=tmp_path, resume=True, progress=False)
    for k, v in live.items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        TrainerConfig.from_dict({"grad_accumulation": 0})
    assert TrainerConfig.from_dict({"ema_decay": None}).ema_decay is None


def test_bf16_autocast_trains_with_a_progress_bar_and_fp16_needs_cuda(tmp_path, capsys):
    train = DataLoader(Latents(8), batch_size=4, shuffle=True)
    summary = Trainer(diffusion(), None, train, None, config=dict(BASE, epochs=1, amp="bf16"), out_dir=tmp_path,
                      progress=True).fit()
    assert summary["optimizer_steps"] == 2 and summary["skipped_steps"] == 0
    err = capsys.readouterr().err
    assert "loss=" in err and "sps=" in err
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
            Trainer(diffusion(), None, train, None, config=dict(BASE, amp="fp16"), out_dir=tmp_path)
