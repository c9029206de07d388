"""Tests for layoutgen.kernels.fuse_group_norm_silu: GroupNorm -> SiLU pairs become GroupNormSiLU in place, with the
same parameters, state_dict keys and outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layoutgen.kernels import GroupNormSiLU, fuse_group_norm_silu
from layoutgen.models.components.blocks import ResNetBlock


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def user_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.GroupNorm(4, 16, eps=1e-6),
        nn.SiLU(),
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(8, 16), nn.SiLU(inplace=True)),  # nested
        nn.GroupNorm(4, 16, affine=False),   # a GroupNorm not followed by SiLU
        nn.ReLU(),
        nn.Conv2d(16, 8, 1),
        nn.GroupNorm(2, 8),
        nn.SiLU(),                           # the last pair
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm) and m.affine:
                m.weight.normal_()
                m.bias.normal_()
    return model


def test_pairs_are_fused_and_outputs_kept():
    model = user_model()
    x = randn(2, 3, 8, 8, seed=1)
    expected = model(x)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    params = {id(p) for p in model.parameters()}
    assert fuse_group_norm_silu(model) is model
    assert isinstance(model[1], GroupNormSiLU) and model[1].activation == "silu" and model[1].eps == 1e-6
    assert isinstance(model[2], nn.Identity)
    assert isinstance(model[3][1], GroupNormSiLU) and isinstance(model[3][2], nn.Identity)
    assert isinstance(model[4], nn.GroupNorm)   # no SiLU after it: untouched by default
    assert isinstance(model[7], GroupNormSiLU) and isinstance(model[8], nn.Identity)
    # Same state_dict keys and values, and the very same Parameter objects (optimizers keep working).
    assert list(model.state_dict()) == list(keys)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, keys[k], rtol=0, atol=0)
    assert {id(p) for p in model.parameters()} == params
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_plain_group_norm_option():
    model = user_model()
    x = randn(2, 3, 8, 8, seed=2)
    expected = model(x)
    fuse_group_norm_silu(model, plain_group_norm=True)
    assert isinstance(model[4], GroupNormSiLU) and model[4].activation is None and not model[4].affine
    assert not any(isinstance(m, nn.GroupNorm) for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    bare = nn.GroupNorm(2, 8)
    fused = fuse_group_norm_silu(bare, plain_group_norm=True)
    assert isinstance(fused, GroupNormSiLU) and fused.weight is bare.weight


def test_group_norm_silu_without_activation_followed_by_silu():
    model = nn.Sequential(GroupNormSiLU(2, 8, activation=None), nn.SiLU())
    x = randn(1, 8, 4, 4, seed=3)
    expected = model(x)
    fuse_group_norm_silu(model)
    assert model[0].activation == "silu" and isinstance(model[1], nn.Identity)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_training_mode_and_frozen_parameters_are_kept():
    model = nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU()).eval()
    model[0].weight.requires_grad_(False)
    fuse_group_norm_silu(model)
    assert not model[0].training
    assert not model[0].weight.requires_grad


def test_project_blocks_have_nothing_left_to_fuse():
    block = ResNetBlock(8, 16, norm_groups=4)
    before = [type(m) for m in block.modules()]
    fuse_group_norm_silu(block)
    assert [type(m) for m in block.modules()] == before
    assert sum(isinstance(m, GroupNormSiLU) for m in block.modules()) == 2


@pytest.mark.parametrize("bad", [nn.Sequential(nn.SiLU(), nn.GroupNorm(2, 8)), nn.Sequential(nn.GroupNorm(2, 8))])
def test_no_pair_no_change(bad):
    before = [type(m) for m in bad]
    fuse_group_norm_silu(bad)
    assert [type(m) for m in bad] == before
