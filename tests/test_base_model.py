"""Tests for BaseModel: load_state errors, freezing, parameter counts, configs and checkpoint_exclude."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from torch import nn

from layoutgen.config import Config, option
from layoutgen.models.autoencoder import Autoencoder
from layoutgen.models.components.base_model import BaseModel, LoadReport
from layoutgen.models.decoder import Decoder
from layoutgen.models.encoder import Encoder
from layoutgen.utils.checkpoint import CheckpointError, load_checkpoint_file

TINY_ENC = {"base_channels": 8, "downsampling_steps": 2, "latent_channels": 4, "norm_groups": 4}
TINY_DEC = {"base_channels": 8, "upsampling_steps": 2, "latent_channels": 4, "norm_groups": 4}


@dataclasses.dataclass
class MlpTestConfig(Config):
    section = "mlp"

    width: int = option(4, min=1)
    depth: int = option(2, min=1)
    dropout: float = option(0.5, min=0.0, max=0.99)


class MlpTestModel(BaseModel):
    """A small BaseModel with parameters, buffers (BatchNorm) and dropout."""

    config_class = MlpTestConfig

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        w = self.cfg.width
        self.body = nn.Sequential(*[nn.Linear(w, w) for _ in range(self.cfg.depth)])
        self.norm = nn.BatchNorm1d(w)
        self.drop = nn.Dropout(self.cfg.dropout)
        self.out = nn.Linear(w, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.norm(self.body(x))))


class MlpWithTeacherTestModel(MlpTestModel):
    """Keeps a 'teacher' sub-network that its checkpoints leave out."""

    checkpoint_exclude = ("teacher.",)

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        self.teacher = nn.Linear(self.cfg.width, self.cfg.width)
        self.register_buffer("teacher_scale", torch.ones(3))  # same prefix text, no dot: kept


def tiny_autoencoder(seed: int = 0) -> Autoencoder:
    torch.manual_seed(seed)
    return Autoencoder(encoder=TINY_ENC, decoder=TINY_DEC)


def randomized(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand_like(tensor) + 0.5)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor))
    return model


# ------------------------------------------------------------------------------------------------ load_state
def test_load_state_round_trip():
    source = randomized(MlpTestModel(), 1)
    target = MlpTestModel()
    report = target.load_state(source.state_dict())
    assert report == LoadReport(missing=[], unexpected=[])
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name


def test_load_state_names_missing_unexpected_and_misshaped_keys_together():
    model = MlpTestModel()
    state = dict(randomized(MlpTestModel(), 1).state_dict())
    del state["body.1.bias"]
    state["body.9.weight"] = torch.zeros(4, 4)
    state["out.weight"] = torch.zeros(3, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        model.load_state(state, source="my_weights.safetensors")
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert msg.startswith("my_weights.safetensors:")
    assert "MlpTestModel" in msg
    assert "missing key body.1.bias" in msg
    assert "unexpected key body.9.weight" in msg
    assert "shape mismatch out.weight" in msg and "(3, 4)" in msg and "(2, 4)" in msg
    # nothing was loaded
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_load_state_lists_every_offending_key():
    model = MlpTestModel(depth=3)
    state = dict(MlpTestModel(depth=3).state_dict())
    for key in ("body.0.weight", "body.2.bias", "norm.running_mean"):
        del state[key]
    msg = _load_error(model, state)
    for key in ("body.0.weight", "body.2.bias", "norm.running_mean"):
        assert f"missing key {key}" in msg


def test_load_state_truncates_very_long_lists():
    model = Autoencoder(encoder=TINY_ENC, decoder=TINY_DEC)
    msg = _load_error(model, {})
    n = len(model.state_dict())
    assert n > 20
    assert msg.count("missing key") == 20
    assert f"and {n - 20} more" in msg


def _load_error(model: BaseModel, state) -> str:
    with pytest.raises(CheckpointError) as info:
        model.load_state(state)
    return str(info.value)


def test_load_state_non_strict_reports_and_loads_the_rest():
    source = randomized(MlpTestModel(), 1)
    target = randomized(MlpTestModel(), 2)
    original_bias = target.body[1].bias.detach().clone()
    state = dict(source.state_dict())
    del state["body.1.bias"]
    state["extra.weight"] = torch.zeros(1)
    report = target.load_state(state, strict=False)
    assert report.missing == ["body.1.bias"]
    assert report.unexpected == ["extra.weight"]
    for name, tensor in target.state_dict().items():
        expected = original_bias if name == "body.1.bias" else source.state_dict()[name]
        assert torch.equal(tensor, expected), name


def test_load_state_non_strict_still_rejects_shape_mismatch():
    target = MlpTestModel()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = dict(randomized(MlpTestModel(), 1).state_dict())
    state["body.0.weight"] = torch.zeros(5, 4)
    with pytest.raises(CheckpointError) as info:
        target.load_state(state, strict=False)
    assert "shape mismatch body.0.weight" in str(info.value) and "(5, 4)" in str(info.value)
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_load_state_file_non_strict(tmp_path):
    small = randomized(MlpTestModel(depth=1), 1)
    path = tmp_path / "small.safetensors"
    small.save_checkpoint(path)
    big = MlpTestModel(depth=2)
    with pytest.raises(CheckpointError) as info:
        big.load_state_file(path)
    assert str(path) in str(info.value) and "missing key body.1.weight" in str(info.value)
    report = big.load_state_file(path, strict=False)
    assert report.missing == ["body.1.bias", "body.1.weight"] and report.unexpected == []
    assert torch.equal(big.body[0].weight, small.body[0].weight)


def test_from_checkpoint_non_strict_is_passed_on(tmp_path):
    model = randomized(MlpTestModel(), 1)
    path = tmp_path / "mlp.safetensors"
    model.save_checkpoint(path)
    loaded = BaseModel.from_checkpoint(path)
    assert type(loaded) is MlpTestModel
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


# -------------------------------------------------------------------------------------------------- freezing
def test_freeze_stops_gradients_and_sets_eval():
    model = MlpTestModel().train()
    returned = model.freeze()
    assert returned is model
    assert model.is_frozen
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert model.num_parameters(trainable_only=True) == 0


def test_frozen_model_stays_in_eval_when_parent_trains():
    frozen = randomized(MlpTestModel(dropout=0.9), 1).freeze()
    sibling = nn.Dropout(0.5)
    parent = nn.ModuleDict({"frozen": frozen, "sibling": sibling})
    parent.train()
    assert parent.training and sibling.training
    assert not frozen.training
    assert all(not m.training for m in frozen.modules())
    # and it behaves like it: dropout off, BatchNorm statistics untouched
    x = torch.randn(8, 4)
    running_mean = frozen.norm.running_mean.clone()
    assert torch.equal(frozen(x), frozen(x))
    assert torch.equal(frozen.norm.running_mean, running_mean)
    # .train() called on the frozen model itself is ignored too
    frozen.train()
    assert not frozen.training


def test_frozen_submodel_of_a_model_stays_in_eval():
    model = tiny_autoencoder()
    model.encoder.freeze()
    model.train()
    assert model.training and model.decoder.training
    assert not model.encoder.training
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())


def test_unfreeze_restores_gradients_and_training():
    model = MlpTestModel().train()
    model.freeze()
    returned = model.unfreeze()
    assert returned is model
    assert not model.is_frozen
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    assert model.training and all(m.training for m in model.modules())
    assert model.num_parameters(trainable_only=True) == model.num_parameters()


def test_unfreeze_also_releases_submodels_frozen_on_their_own():
    model = tiny_autoencoder()
    model.encoder.freeze()
    model.unfreeze()
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    assert model.encoder.training and not model.encoder.is_frozen


def test_freeze_marks_submodels_frozen():
    model = tiny_autoencoder()
    model.freeze()
    assert model.encoder.is_frozen and model.decoder.is_frozen
    model.encoder.train()
    assert not model.encoder.training


def test_frozen_model_gets_no_gradient_in_training():
    model = tiny_autoencoder()
    model.encoder.freeze()
    model.train()
    out = model(torch.randn(1, 3, 16, 16))
    out["rgb"].sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())


# ------------------------------------------------------------------------------------------- num_parameters
def test_num_parameters_matches_a_manual_count():
    model = MlpTestModel(width=4, depth=2)
    manual = 2 * (4 * 4 + 4) + (4 + 4) + (4 * 2 + 2)  # two Linear(4, 4), BatchNorm affine, Linear(4, 2)
    assert model.num_parameters() == manual
    assert model.num_parameters(trainable_only=True) == manual
    ae = tiny_autoencoder()
    assert ae.num_parameters() == sum(p.numel() for p in ae.parameters())
    assert ae.num_parameters() == ae.encoder.num_parameters() + ae.decoder.num_parameters()


def test_num_parameters_trainable_only_after_freezing_a_submodule():
    ae = tiny_autoencoder()
    total = ae.num_parameters()
    ae.encoder.freeze()
    assert ae.num_parameters() == total
    assert ae.num_parameters(trainable_only=True) == sum(p.numel() for p in ae.decoder.parameters())
    assert ae.num_parameters(trainable_only=True) == total - ae.encoder.num_parameters()
    # a plain requires_grad_ counts as well
    ae.decoder.conv_in.weight.requires_grad_(False)
    assert ae.num_parameters(trainable_only=True) == (
        total - ae.encoder.num_parameters() - ae.decoder.conv_in.weight.numel())


def test_buffers_are_not_parameters():
    model = MlpTestModel()
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert "norm.running_mean" in model.state_dict()
    assert model.num_parameters() < sum(t.numel() for t in model.state_dict().values())


# ----------------------------------------------------------------------------------------------------- config
def assert_plain(value) -> None:
    if isinstance(value, dict):
        assert type(value) is dict
        for k, v in value.items():
            assert isinstance(k, str)
            assert_plain(v)
    elif isinstance(value, list):
        assert type(value) is list
        for v in value:
            assert_plain(v)
    else:
        assert value is None or type(value) in (str, int, float, bool), type(value)


def test_config_is_a_plain_dict_with_defaults():
    model = tiny_autoencoder()
    config = model.config
    assert_plain(config)
    assert config["encoder"]["base_channels"] == 8
    # defaults filled in
    assert config["encoder"]["num_res_blocks"] == 1
    assert config["encoder"]["dropout"] == 0.0
    assert config["encoder"]["variational"] is False
    assert config["encoder"]["in_channels"] == 3
    assert config["decoder"]["heads"][0]["name"] == "rgb"
    # round-trips through YAML and JSON
    assert yaml.safe_load(yaml.safe_dump(config)) == config
    assert json.loads(json.dumps(config)) == config
    assert Autoencoder.from_config(yaml.safe_load(yaml.safe_dump(config))).config == config


def test_config_is_a_copy():
    model = MlpTestModel()
    config = model.config
    config["width"] = 99
    assert model.config["width"] == 4
    assert model.cfg.width == 4


def test_overrides_and_from_config_agree():
    a = MlpTestModel(width=6, dropout=0.1)
    b = MlpTestModel.from_config({"width": 6, "dropout": 0.1})
    c = MlpTestModel({"width": 6}, dropout=0.1)
    d = MlpTestModel.from_config(MlpTestConfig(width=6, dropout=0.1))
    assert a.config == b.config == c.config == d.config == {"width": 6, "depth": 2, "dropout": 0.1}
    assert type(b) is MlpTestModel
    ae1 = Autoencoder(encoder=TINY_ENC, decoder=TINY_DEC)
    ae2 = Autoencoder.from_config({"encoder": TINY_ENC, "decoder": TINY_DEC})
    assert ae1.config == ae2.config
    assert [tuple(t.shape) for t in ae1.state_dict().values()] == [tuple(t.shape) for t in ae2.state_dict().values()]


def test_overrides_take_precedence_over_the_config():
    model = MlpTestModel({"width": 6, "depth": 3}, depth=1)
    assert model.config["depth"] == 1 and len(model.body) == 1


def test_from_config_rejects_bad_configs_naming_the_key():
    with pytest.raises(ValueError) as info:
        Autoencoder.from_config({"encoder": {**TINY_ENC, "lattent_channels": 4}, "decoder": TINY_DEC})
    assert "autoencoder.encoder.lattent_channels" in str(info.value)
    with pytest.raises(ValueError) as info:
        MlpTestModel(width=0)
    assert str(info.value).startswith("mlp.width:") and ">= 1" in str(info.value)
    with pytest.raises(ValueError) as info:
        Encoder(latent_channels=True)
    assert str(info.value).startswith("encoder.latent_channels:")


def test_submodels_keep_their_own_config():
    ae = tiny_autoencoder()
    assert isinstance(ae.encoder, Encoder) and isinstance(ae.decoder, Decoder)
    assert ae.encoder.config == ae.config["encoder"]
    assert ae.decoder.config == ae.config["decoder"]


# ------------------------------------------------------------------------------------------ checkpoint_exclude
def test_checkpoint_exclude_leaves_tensors_out(tmp_path):
    model = randomized(MlpWithTeacherTestModel(), 1)
    assert "teacher.weight" in model.state_dict()
    saved = model.checkpoint_state_dict()
    assert not any(k.startswith("teacher.") for k in saved)
    assert "teacher_scale" in saved and "body.0.weight" in saved
    path = tmp_path / "student.safetensors"
    model.save_checkpoint(path)
    tensors, meta = load_checkpoint_file(path)
    assert sorted(tensors) == sorted(saved)
    assert meta["model_class"] == "MlpWithTeacherTestModel"


def test_load_state_does_not_ask_for_excluded_tensors(tmp_path):
    model = randomized(MlpWithTeacherTestModel(), 1)
    path = tmp_path / "student.safetensors"
    model.save_checkpoint(path)

    target = randomized(MlpWithTeacherTestModel(), 2)
    teacher_before = target.teacher.weight.detach().clone()
    report = target.load_state_file(path)
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(target.teacher.weight, teacher_before)  # not touched
    assert torch.equal(target.body[0].weight, model.body[0].weight)
    assert torch.equal(target.teacher_scale, model.teacher_scale)

    loaded = MlpWithTeacherTestModel.from_checkpoint(path)
    assert torch.equal(loaded.out.weight, model.out.weight)
    assert loaded.config == model.config


def test_load_state_still_checks_kept_keys_with_exclusions():
    model = MlpWithTeacherTestModel()
    state = model.checkpoint_state_dict()
    del state["out.bias"]
    with pytest.raises(CheckpointError) as info:
        model.load_state(state)
    msg = str(info.value)
    assert "missing key out.bias" in msg
    assert "teacher" not in msg


def test_a_full_state_dict_with_excluded_tensors_loads_strictly_and_sets_them():
    source = randomized(MlpWithTeacherTestModel(), 1)
    target = randomized(MlpWithTeacherTestModel(), 2)
    report = target.load_state(source.state_dict())
    assert report.missing == [] and report.unexpected == []
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


def test_excluded_tensors_given_with_the_wrong_shape_are_named():
    model = MlpWithTeacherTestModel()
    state = model.state_dict()
    state["teacher.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"shape mismatch teacher\.weight: checkpoint \(3, 3\)"):
        model.load_state(state, strict=False)
