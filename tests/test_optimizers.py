"""`training.optimizer` (auto, adamw, fused_adamw, apex_fused_adam) and `training.compile` on the CPU, with the
apex and CUDA paths checked where they exist."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from layoutgen.training import optimizers
from layoutgen.training.optimizers import apex_available, build_optimizer, resolve_optimizer
from layoutgen.training.trainer import Trainer, TrainerConfig

CPU = torch.device("cpu")


class Pairs(Dataset):
    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def mse(out, batch):
    return nn.functional.mse_loss(out, batch["y"]), {}


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def params():
    return [nn.Parameter(torch.randn(3))]


def test_cpu_choices():
    assert resolve_optimizer("auto", CPU) == "adamw"
    assert resolve_optimizer("adamw", CPU) == "adamw"
    plain = build_optimizer("auto", params(), 1e-3, 0.01, CPU)
    assert type(plain) is torch.optim.AdamW and not plain.defaults["fused"]
    assert plain.defaults["weight_decay"] == 0.01 and plain.defaults["lr"] == 1e-3
    fused = build_optimizer("fused_adamw", params(), 1e-3, 0.0, CPU)
    assert type(fused) is torch.optim.AdamW and fused.defaults["fused"]


def test_auto_on_cuda_prefers_apex_then_fused_adamw(monkeypatch):
    cuda = torch.device("cuda")     # resolve_optimizer only looks at the device type: no GPU needed
    monkeypatch.setattr(optimizers, "apex_available", lambda: True)
    assert resolve_optimizer("auto", cuda) == "apex_fused_adam"
    monkeypatch.setattr(optimizers, "apex_available", lambda: False)
    assert resolve_optimizer("auto", cuda) == "fused_adamw"


def test_apex_refused_on_the_cpu_or_without_apex(monkeypatch):
    with pytest.raises(ValueError, match=r"training\.optimizer.*CUDA"):
        resolve_optimizer("apex_fused_adam", CPU)
    monkeypatch.setattr(optimizers, "apex_available", lambda: False)
    with pytest.raises(ValueError, match=r"training\.optimizer.*apex"):
        resolve_optimizer("apex_fused_adam", torch.device("cuda"))
    with pytest.raises(ValueError, match=r"training\.optimizer"):
        resolve_optimizer("sgd", CPU)
    with pytest.raises(ValueError, match=r"training\.optimizer"):
        TrainerConfig.from_dict({"optimizer": "sgd"})


def test_trainer_uses_the_chosen_optimizer(tmp_path):
    config = dict(device="cpu", epochs=1, batch_size=4, input_key="x", optimizer="fused_adamw")
    trainer = Trainer(tiny_model(), mse, DataLoader(Pairs(), batch_size=4, shuffle=True), None, config=config,
                      out_dir=str(tmp_path), progress=False)
    assert trainer.optimizer.defaults["fused"]
    assert trainer.fit()["optimizer_steps"] == 2
    with pytest.raises(ValueError, match=r"training\.optimizer"):
        Trainer(tiny_model(), mse, DataLoader(Pairs(), batch_size=4), None,
                config={**config, "optimizer": "apex_fused_adam"}, out_dir=str(tmp_path / "x"), progress=False)


@pytest.mark.cuda
def test_apex_fused_adam_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not apex_available():
        pytest.skip("NVIDIA apex is not installed")
    from apex.optimizers import FusedAdam

    config = dict(device="cuda", epochs=1, batch_size=4, input_key="x", optimizer="auto")
    trainer = Trainer(tiny_model(), mse, DataLoader(Pairs(), batch_size=4), None, config=config,
                      out_dir=str(tmp_path), progress=False)
    assert isinstance(trainer.optimizer, FusedAdam)
    assert trainer.fit()["skipped_steps"] == 0


def test_compile_modes_are_checked():
    assert TrainerConfig.from_dict({"compile": "max-autotune"}).compile == "max-autotune"
    assert TrainerConfig.from_dict({"compile": True}).compile is True
    with pytest.raises(ValueError, match=r"training\.compile"):
        TrainerConfig.from_dict({"compile": "fastest"})


@pytest.mark.slow
def test_compiled_training_keeps_clean_checkpoints(tmp_path):
    """compile=true trains (torch.compile needs the C++ compiler on the CPU) and its checkpoints load into an
    uncompiled model: no `_orig_mod.` prefixes."""
    from layoutgen.training.checkpointing import CheckpointManager

    config = dict(device="cpu", epochs=1, batch_size=4, input_key="x", compile=True, log_every=1)
    model = tiny_model()
    trainer = Trainer(model, mse, DataLoader(Pairs(), batch_size=4, shuffle=True), DataLoader(Pairs(4), batch_size=4),
                      config=config, out_dir=str(tmp_path), progress=False)
    summary = trainer.fit()
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert all("_orig_mod" not in key for key in model.state_dict())
    plain = tiny_model()
    CheckpointManager(str(tmp_path / "checkpoints")).resume(model=plain)
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    assert not torch.equal(plain.state_dict()["0.weight"], tiny_model().state_dict()["0.weight"])   # it trained


class NoisyRegressor(nn.Module):
    """Trained through training_loss(batch, generator), as the diffusion models are."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_model()

    def training_loss(self, batch, generator):
        noise = torch.randn(batch["x"].shape, generator=generator, device=batch["x"].device)
        return nn.functional.mse_loss(self.net(batch["x"] + 0.1 * noise), batch["y"]), {}


@pytest.mark.slow
def test_compiled_training_loss_trains_like_the_eager_one(tmp_path):
    config = dict(device="cpu", epochs=1, batch_size=4, log_every=1)
    runs = {}
    for compiled in (False, True):
        model = NoisyRegressor()
        trainer = Trainer(model, None, DataLoader(Pairs(), batch_size=4, shuffle=True), None,
                          config={**config, "compile": compiled}, out_dir=str(tmp_path / str(compiled)),
                          progress=False)
        trainer.fit()
        runs[compiled] = ([row["loss"] for row in trainer.history], model.state_dict())
    assert all("_orig_mod" not in key for key in runs[True][1])
    torch.testing.assert_close(torch.tensor(runs[True][0]), torch.tensor(runs[False][0]), rtol=1e-5, atol=1e-6)
    for key, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], value, rtol=1e-5, atol=1e-6)
