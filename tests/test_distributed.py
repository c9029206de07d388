"""DDP: the helpers without a process group, the sharded EpochSampler, and a real 2-process gloo run on the CPU whose
losses, final weights and validation results (split across the ranks) match one process over the same global batch,
for a plain model and for an autoencoder experiment."""
import csv
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset

from layoutgen.models.autoencoder import Autoencoder
from layoutgen.training import distributed as dist_utils
from layoutgen.training.experiment import AutoencoderExperiment
from layoutgen.training.run import run_experiment
from layoutgen.training.trainer import EpochSampler, Trainer


class Pairs(Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class TwoPart(nn.Module):
    """A frozen first layer (outside the optimizer) and a trainable head; no batch-dependent layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(6, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x):
        return self.head(torch.tanh(self.frozen(x)))

    def trainable_parameters(self):
        return self.head.parameters()


class NoisyRegressor(TwoPart):
    """Diffusion-style: training_loss adds generator noise (a different stream per rank) and calls submodules."""

    def training_loss(self, batch, generator):
        x = batch["x"] + 0.1 * torch.randn(batch["x"].shape, generator=generator, device=batch["x"].device)
        loss = nn.functional.mse_loss(self.head(torch.tanh(self.frozen(x))), batch["y"])
        return loss, {}


def mse(out, batch):
    loss = nn.functional.mse_loss(out, batch["y"])
    return loss, {"mse": loss.detach()}


CONFIG = dict(device="cpu", epochs=3, lr=1e-2, warmup_steps=1, log_every=1, grad_clip=1.0, input_key="x")
CODEC = dict(latent_channels=4, base_channels=8, norm_groups=4)
# 12 synthetic layouts, 3 for validation (2 batches of 2: split over 2 ranks), 9 for training: with 2 per rank, each
# step's global batch is the single process's batch of 4 (losses are means over samples, so the updates match).
AUTOENCODER = {
    "autoencoder": {"encoder": dict(downsampling_steps=2, **CODEC),
                    "decoder": dict(upsampling_steps=2, heads=[
                        {"type": "RGBHead", "name": "rgb", "out_channels": 3},
                        {"type": "SegmentationHead", "name": "segmentation", "num_classes": 11},
                        {"type": "ClassificationHead", "name": "classification", "num_classes": 4}], **CODEC)},
    "loss": [{"type": "MSELoss", "key": "rgb", "target": "rgb"},
             {"type": "CrossEntropyLoss", "key": "segmentation", "target": "segmentation", "weight": 0.05}],
    "data": {"num_samples": 12, "image_size": 32, "val_fraction": 0.25},
    "training": {"epochs": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "device": "cpu",
                 "preview_every": None},
}
METRICS = ("val_loss", "rgb_psnr", "segmentation_pixel_accuracy", "segmentation_mean_iou")


def autoencoder_experiment(batch_size: int) -> AutoencoderExperiment:
    return AutoencoderExperiment.from_dict({**AUTOENCODER, "training": {**AUTOENCODER["training"],
                                                                        "batch_size": batch_size}})


def validation(out_dir, noisy: bool = False) -> dict:
    """A fixed model's validation over 5 items in 3 batches (2 on rank 0, 1 on rank 1): no training."""
    model = NoisyRegressor() if noisy else TwoPart()
    trainer = Trainer(model, None if noisy else mse, DataLoader(Pairs(), batch_size=4), DataLoader(Pairs(5),
                      batch_size=2), config=CONFIG, out_dir=out_dir, progress=False)
    return trainer.validate()


def run(out_dir, batch_size, stop_at_step=None, resume=False):
    model = TwoPart()
    loader = DataLoader(Pairs(), batch_size=batch_size, shuffle=True)
    trainer = Trainer(model, mse, loader, None, config=CONFIG, out_dir=out_dir, resume=resume, progress=False)
    summary = trainer.fit(stop_at_step=stop_at_step)
    losses = [row["loss"] for row in trainer.history if "loss" in row]
    return summary, [float(v) for v in losses], {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank, world, port, out_dirs, result_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert dist_utils.init_from_env(timeout_s=60)
    try:
        assert dist_utils.world_size() == world and dist_utils.is_main() == (rank == 0)
        mean = dist_utils.all_reduce_mean(torch.tensor([float(rank)]))
        # tiny buckets (several all_reduces); a grad missing on rank 1 counts as zeros there; none anywhere stays None
        grads = [nn.Parameter(torch.zeros(n)) for n in (3, 5, 2, 4)]
        for i, p in enumerate(grads[:3]):
            if not (rank == 1 and i == 1):
                p.grad = torch.full_like(p, float(rank + 1 + i))
        dist_utils.all_reduce_gradients(grads, bucket_mb=1e-5)
        synced = [None if p.grad is None else p.grad.clone() for p in grads]
        _, losses, weights = run(out_dirs[rank], batch_size=2)                       # 16 items: 4 steps/epoch
        _, first, _ = run(out_dirs[2], batch_size=2, stop_at_step=5)           # interrupted mid-epoch 1 ...
        _, rest, resumed = run(out_dirs[2], batch_size=2, resume=True)        # ... and resumed by all ranks
        # a model trained through training_loss(batch, generator) calling its submodules (no DDP forward involved)
        noisy = NoisyRegressor()
        loader = DataLoader(Pairs(), batch_size=2, shuffle=True)
        Trainer(noisy, None, loader, None, config={**CONFIG, "epochs": 1}, out_dir=out_dirs[3],
                progress=False).fit()
        # validation split over the ranks (batch-strided), sums reduced: the single-process values
        val = validation(out_dirs[4]), validation(out_dirs[4], noisy=True)
        summary = run_experiment("autoencoder", autoencoder_experiment(2), out_dirs[5], progress=False)
        torch.save({"mean": mean, "losses": losses, "weights": weights, "resumed": resumed,
                    "synced": synced, "noisy": {k: v.detach().clone() for k, v in noisy.state_dict().items()},
                    "val": val, "ae": {k: summary[k] for k in METRICS + ("steps",)}},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist_utils.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_helpers_without_a_process_group():
    assert not dist_utils.is_distributed()
    assert dist_utils.world_size() == 1 and dist_utils.rank() == 0 and dist_utils.is_main()
    dist_utils.barrier()
    t = torch.tensor([1.0, 2.0])
    assert dist_utils.all_reduce_mean(t) is t
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    dist_utils.all_reduce_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    dist_utils.cleanup()


def test_init_from_env_without_torchrun_vars_is_a_no_op(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist_utils.init_from_env() is False
    assert not dist_utils.is_distributed()


def test_sharded_epoch_sampler_slices_one_global_order():
    full = EpochSampler(10, seed=4)
    shards = [EpochSampler(10, seed=4, num_replicas=3, rank=r) for r in range(3)]
    for s in [full, *shards]:
        s.set_epoch(2)
    order = list(full)
    padded = order + order[:2]
    assert [list(s) for s in shards] == [padded[r::3] for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    shards[1].set_epoch(2, start=1)
    assert list(shards[1]) == padded[1::3][1:] and len(shards[1]) == 3
    with pytest.raises(ValueError):
        EpochSampler(10, num_replicas=2, rank=2)


def test_two_gloo_processes_match_one_process_with_the_global_batch(tmp_path):
    out_dirs = [str(tmp_path / name) for name in ("ddp0", "ddp1", "shared", "noisy", "val", "ae")]
    result_dir = str(tmp_path / "results")
    os.makedirs(result_dir)
    mp.spawn(_worker, args=(2, _free_port(), out_dirs, result_dir), nprocs=2, join=True)
    ranks = [torch.load(os.path.join(result_dir, f"rank{r}.pt")) for r in range(2)]

    _, single_losses, single_weights = run(str(tmp_path / "single"), batch_size=4)
    assert len(single_losses) == 12
    assert float(ranks[0]["mean"]) == 0.5
    for r in ranks:
        # the logged loss is the mean over ranks: the loss over the global batch of 4
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(single_losses), rtol=1e-5, atol=1e-7)
        for k, v in single_weights.items():
            torch.testing.assert_close(r["weights"][k], v, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r["resumed"][k], v, rtol=1e-5, atol=1e-6)   # stop at step 5 + resume
    for r in ranks:
        g = r["synced"]
        assert torch.equal(g[0], torch.full((3,), 1.5)) and torch.equal(g[1], torch.full((5,), 1.0))
        assert torch.equal(g[2], torch.full((2,), 3.5)) and g[3] is None
    # the gradients were averaged: both ranks hold the same weights, which moved, frozen part untouched
    for k, v in ranks[0]["noisy"].items():
        torch.testing.assert_close(ranks[1]["noisy"][k], v, rtol=0, atol=0)
    assert not torch.equal(ranks[0]["noisy"]["head.0.weight"], TwoPart().state_dict()["head.0.weight"])
    assert torch.equal(ranks[0]["noisy"]["frozen.weight"], TwoPart().state_dict()["frozen.weight"])
    # only rank 0 wrote checkpoints and metrics.csv
    for main in (out_dirs[0], out_dirs[2]):
        assert os.path.isfile(os.path.join(main, "metrics.csv"))
        assert os.path.isfile(os.path.join(main, "checkpoints", "latest.safetensors"))
    assert [f for _, _, files in os.walk(out_dirs[1]) for f in files] == []
    with open(os.path.join(out_dirs[0], "metrics.csv"), newline="") as fh:
        logged = [float(row["loss"]) for row in csv.DictReader(fh) if row.get("loss")]
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(single_losses), rtol=1e-5, atol=1e-7)
    # validation: each rank evaluated its share, the reduced sums give one process's results (noise per batch too)
    single_val = validation(str(tmp_path / "single_val")), validation(str(tmp_path / "single_val"), noisy=True)
    for r in ranks:
        for got, want in zip(r["val"], single_val):
            assert abs(got["val_loss"] - want["val_loss"]) <= 1e-6 * max(1.0, abs(want["val_loss"]))
    # the autoencoder experiment under DDP: rank 0 wrote its files, both ranks report one process's results
    single = run_experiment("autoencoder", autoencoder_experiment(4), str(tmp_path / "ae_single"), progress=False)
    for r in ranks:
        assert r["ae"]["steps"] == single["steps"] == 4
        for key in METRICS:
            assert r["ae"][key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
    for name in ("autoencoder.safetensors", "reconstructions.png", "config.yaml", "metrics.csv"):
        assert os.path.isfile(os.path.join(out_dirs[5], name)), name
    ddp_model = Autoencoder.from_checkpoint(os.path.join(out_dirs[5], "autoencoder.safetensors"))
    single_model = Autoencoder.from_checkpoint(single["checkpoint"])
    for (name, a), b in zip(ddp_model.state_dict().items(), single_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
