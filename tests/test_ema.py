"""EMA of model weights: the recurrence, warmup, update schedule, swapping, state and frozen/half-precision cases."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from layoutgen.training.ema import EMA


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _perturb(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype))


def test_matches_hand_computed_recurrence_without_warmup():
    model = _model()
    ema = EMA(model, decay=0.9, warmup=False)
    expected = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    for i in range(4):
        _perturb(model, i)
        ema.update(model)
        for n, p in model.named_parameters():
            expected[n] = 0.9 * expected[n] + 0.1 * p.detach().double()
    for n in expected:
        torch.testing.assert_close(ema.shadow[n].double(), expected[n], rtol=1e-6, atol=1e-6)
        assert ema.shadow[n].dtype == torch.float32
    assert ema.step == 4 and ema.num_updates == 4


def test_warmup_decay_values_and_recurrence():
    model = _model()
    ema = EMA(model, decay=0.5, warmup=True)
    # decay_t = min(decay, (1 + t) / (10 + t)), t = averaging updates already applied
    assert ema.get_decay(0) == pytest.approx(0.1)
    assert ema.get_decay(1) == pytest.approx(2 / 11)
    assert ema.get_decay(5) == pytest.approx(6 / 15)
    assert ema.get_decay(20) == pytest.approx(0.5)  # capped at decay
    assert EMA(model, decay=0.9999, warmup=False).get_decay(0) == 0.9999

    w = model[0].weight
    expected = w.detach().clone().double()
    for t in range(3):
        _perturb(model, 10 + t)
        ema.update(model)
        d = min(0.5, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * w.detach().double()
    torch.testing.assert_close(ema.shadow["0.weight"].double(), expected, rtol=1e-6, atol=1e-6)


def test_update_after_step_and_update_every():
    model = _model()
    ema = EMA(model, decay=0.9, warmup=False, update_after_step=2, update_every=2)
    w = model[0].weight
    # steps 1, 2: the shadow copies the weights
    for i in range(2):
        _perturb(model, i)
        ema.update(model)
        assert torch.equal(ema.shadow["0.weight"], w.detach())
    assert ema.num_updates == 0
    copied = w.detach().clone()
    _perturb(model, 5)
    ema.update(model)  # step 3: (3 - 2) % 2 != 0, nothing
    assert torch.equal(ema.shadow["0.weight"], copied)
    _perturb(model, 6)
    ema.update(model)  # step 4: averages
    torch.testing.assert_close(ema.shadow["0.weight"], 0.9 * copied + 0.1 * w.detach())
    assert ema.step == 4 and ema.num_updates == 1


def test_integer_buffers_are_copied_and_float_buffers_averaged():
    model = _model()
    ema = EMA(model, decay=0.9, warmup=False)
    model.train()
    model(torch.randn(6, 4))  # updates BatchNorm running stats and num_batches_tracked
    ema.update(model)
    assert ema.shadow["1.num_batches_tracked"].dtype == torch.long
    assert int(ema.shadow["1.num_batches_tracked"]) == 1
    expected = 0.9 * torch.zeros(8) + 0.1 * model[1].running_mean
    torch.testing.assert_close(ema.shadow["1.running_mean"], expected)


def test_swap_in_and_back_restores_bit_exactly():
    model = _model()
    ema = EMA(model, decay=0.7, warmup=False)
    for i in range(3):
        _perturb(model, i)
        ema.update(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.average_parameters(model):
        assert torch.equal(model[0].weight, ema.shadow["0.weight"])
        assert not torch.equal(model[0].weight, before["0.weight"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    # also restored when the block raises
    with pytest.raises(RuntimeError, match="boom"), ema.average_parameters(model):
        raise RuntimeError("boom")
    assert torch.equal(model[0].weight, before["0.weight"])

    ema.store(model)
    ema.copy_to(model)
    assert torch.equal(model[3].bias, ema.shadow["3.bias"])
    ema.restore(model)
    assert torch.equal(model[3].bias, before["3.bias"])
    with pytest.raises(RuntimeError, match="nothing stored"):
        ema.restore(model)


def test_state_dict_round_trip_and_mismatch_errors():
    model = _model()
    ema = EMA(model, decay=0.8, warmup=True)
    for i in range(3):
        _perturb(model, i)
        ema.update(model)
    state = ema.state_dict()
    other = EMA(_model(seed=1), decay=0.8)
    other.load_state_dict(state)
    assert other.step == 3 and other.num_updates == 3 and other.decay == 0.8
    for name, tensor in ema.shadow.items():
        assert torch.equal(other.shadow[name], tensor)
    # the state is a copy: updating the EMA later leaves it alone
    ema.update(model)
    assert not torch.equal(state["shadow"]["0.weight"], ema.shadow["0.weight"])

    bad = ema.state_dict()
    bad["shadow"]["0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"shape mismatch for '0\.weight'"):
        other.load_state_dict(bad)
    missing = ema.state_dict()
    del missing["shadow"]["3.bias"]
    with pytest.raises(ValueError, match=r"missing key '3\.bias'"):
        other.load_state_dict(missing)
    unexpected = ema.state_dict()
    unexpected["shadow"]["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected key 'extra\.weight'"):
        other.load_state_dict(unexpected)


def test_frozen_parameters_are_skipped_and_untouched():
    model = _model()
    for p in model[0].parameters():
        p.requires_grad_(False)
    for p in model[1].parameters():  # a frozen BatchNorm: its buffers are left out too
        p.requires_grad_(False)
    ema = EMA(model, decay=0.5, warmup=False)
    assert "0.weight" not in ema.shadow and "1.running_mean" not in ema.shadow
    assert "3.weight" in ema.shadow
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("0.", "1."))}
    for i in range(3):
        _perturb(model, i)
        ema.update(model)
    ema.copy_to(model)
    for k, v in frozen.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert "0.weight" in EMA(model, include_frozen=True).shadow


def test_half_precision_model_keeps_float32_shadows():
    model = _model().half()
    ema = EMA(model, decay=0.9, warmup=False)
    assert all(t.dtype == torch.float32 for n, t in ema.shadow.items() if "num_batches" not in n)
    w0 = ema.shadow["0.weight"].clone()
    _perturb(model, 1)
    ema.update(model)
    assert ema.shadow["0.weight"].dtype == torch.float32
    torch.testing.assert_close(ema.shadow["0.weight"], 0.9 * w0 + 0.1 * model[0].weight.float())
    assert model[0].weight.dtype == torch.float16
    with ema.average_parameters(model):
        assert model[0].weight.dtype == torch.float16
        assert torch.equal(model[0].weight, ema.shadow["0.weight"].half())


def test_shape_mismatch_with_model_named():
    ema = EMA(_model(), decay=0.9)
    other = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        ema.update(other)


def test_constant_buffer_is_kept_exactly():
    # lerp of equal values is exact: a buffer that never changes is not perturbed by rounding
    model = _model()
    model.register_buffer("table", torch.linspace(0.1, 7.3, 11))
    ema = EMA(model, decay=0.9999, warmup=True)
    for i in range(5):
        _perturb(model, i)
        ema.update(model)
    assert torch.equal(ema.shadow["table"], model.table)


def test_lazily_set_buffer_is_copied_once_set_then_averaged():
    # e.g. the diffusion model's latent_scale: NaN until the first training batch measures it
    model = _model()
    model.register_buffer("scale", torch.tensor(float("nan")))
    ema = EMA(model, decay=0.9, warmup=False)
    ema.update(model)                      # still unset: nothing to copy
    assert torch.isnan(ema.shadow["scale"])
    model.scale.fill_(2.0)
    ema.update(model)
    assert float(ema.shadow["scale"]) == 2.0
    model.scale.fill_(4.0)
    ema.update(model)                      # finite from now on: averaged like any float buffer
    assert float(ema.shadow["scale"]) == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    with ema.average_parameters(model):
        assert float(model.scale) == pytest.approx(2.2)
