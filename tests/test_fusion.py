"""Tests for layoutgen.models.components.fusion: the ControlNet fusion modes (add, concat, FiLM, cross-attention)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layoutgen.models.components.fusion import (
    FUSION_MODES,
    AddFusion,
    ConcatFusion,
    CrossAttentionFusion,
    FiLMFusion,
    Fusion,
    build_fusion,
)

CHANNELS = 16
SHAPE = (2, CHANNELS, 6, 5)  # odd, non-square spatial size
MODE_KWARGS = {"add": {}, "concat": {}, "film": {}, "cross_attention": {"num_heads": 4, "norm_groups": 4}}
# The parameters each mode initialises at zero (what makes it the identity at initialisation).
ZERO_INIT = {
    "add": ["conv.weight", "conv.bias"],
    "concat": ["proj.weight", "proj.bias"],
    "film": ["conv.weight", "conv.bias"],
    "cross_attention": ["gate"],
}
MODES = sorted(FUSION_MODES)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def make(mode: str, seed: int = 0) -> Fusion:
    torch.manual_seed(seed)
    return build_fusion(mode, CHANNELS, **MODE_KWARGS[mode])


def perturb_zero_init_(fusion: Fusion, mode: str, seed: int = 1) -> Fusion:
    """Gives the zero-initialised parameters random values, as training would."""
    g = torch.Generator().manual_seed(seed)
    params = dict(fusion.named_parameters())
    with torch.no_grad():
        for name in ZERO_INIT[mode]:
            p = params[name]
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.5 if p.dim() == 0 else 0.0))
    return fusion


# ---------------------------------------------------------------------------------------------------------------------
# Initialisation: the identity, bit for bit
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_identity_at_init_for_any_control_and_scale(mode):
    fusion = make(mode)
    skip = randn(*SHAPE, seed=2)
    for seed, magnitude in [(3, 1.0), (4, 100.0), (5, 1e-3)]:
        control = randn(*SHAPE, seed=seed) * magnitude
        for scale in [1.0, 0.5, 2.0, 0.0, -1.3]:
            out = fusion(skip, control, scale)
            assert out.shape == skip.shape and out.dtype == skip.dtype
            assert torch.equal(out, skip), (mode, seed, scale)


@pytest.mark.parametrize("mode", MODES)
def test_zero_init_parameters_are_zero_and_the_rest_are_not(mode):
    fusion = make(mode)
    params = dict(fusion.named_parameters())
    for name in ZERO_INIT[mode]:
        assert torch.count_nonzero(params[name]) == 0, name
    if mode == "cross_attention":
        # The output projection must not start at zero too, or the gate would get no gradient (see below).
        assert torch.count_nonzero(fusion.proj.weight) > 0


@pytest.mark.parametrize("mode", MODES)
def test_identity_at_init_in_bfloat16(mode):
    fusion = make(mode).to(torch.bfloat16)
    skip, control = randn(*SHAPE, seed=6).bfloat16(), randn(*SHAPE, seed=7).bfloat16()
    out = fusion(skip, control, 0.8)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, skip)


# ---------------------------------------------------------------------------------------------------------------------
# Gradients at initialisation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_zero_init_parameters_at_init(mode):
    fusion = make(mode)
    skip, control, weight = randn(*SHAPE, seed=8), randn(*SHAPE, seed=9), randn(*SHAPE, seed=10)
    (fusion(skip, control, 0.7) * weight).sum().backward()
    params = dict(fusion.named_parameters())
    for name in ZERO_INIT[mode]:
        grad = params[name].grad
        assert grad is not None and torch.count_nonzero(grad) > 0, name


def test_add_fusion_weight_gradient_is_scale_times_control_times_output_gradient():
    fusion = make("add")
    skip, control, weight = randn(*SHAPE, seed=11), randn(*SHAPE, seed=12), randn(*SHAPE, seed=13)
    scale = 0.7
    (fusion(skip, control, scale) * weight).sum().backward()
    expected_w = scale * torch.einsum("nohw,nihw->oi", weight.double(), control.double())
    torch.testing.assert_close(fusion.conv.weight.grad[:, :, 0, 0].double(), expected_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fusion.conv.bias.grad.double(), scale * weight.double().sum((0, 2, 3)),
                               rtol=1e-5, atol=1e-5)


def test_cross_attention_gate_gradient_at_init_is_scale_times_the_attention_output():
    fusion = make("cross_attention")
    skip, control, weight = randn(*SHAPE, seed=14), randn(*SHAPE, seed=15), randn(*SHAPE, seed=16)
    scale = 1.5
    (fusion(skip, control, scale) * weight).sum().backward()
    with torch.no_grad():
        out = fusion.attend(skip, control)
    assert out.abs().max() > 0
    # d tanh(g) / dg = 1 at g = 0.
    torch.testing.assert_close(fusion.gate.grad.double(), scale * (weight.double() * out.double()).sum(),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# After training has moved the zero-initialised parameters
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_perturbed_fusion_differs_from_skip_and_depends_on_control(mode):
    fusion = perturb_zero_init_(make(mode), mode)
    skip = randn(*SHAPE, seed=17)
    control_a, control_b = randn(*SHAPE, seed=18), randn(*SHAPE, seed=19)
    out_a, out_b = fusion(skip, control_a, 1.0), fusion(skip, control_b, 1.0)
    assert out_a.shape == skip.shape
    assert (out_a - skip).abs().max() > 1e-3
    assert (out_a - out_b).abs().max() > 1e-3
    # scale 0 switches the control off exactly, whatever the weights.
    assert torch.equal(fusion(skip, control_a, 0.0), skip)


@pytest.mark.parametrize("mode", ["add", "concat", "cross_attention"])
def test_correction_is_linear_in_scale(mode):
    # fused - skip = scale * f(skip, control) for the additive modes.
    fusion = perturb_zero_init_(make(mode), mode)
    skip, control = randn(*SHAPE, seed=20), randn(*SHAPE, seed=21)
    unit = fusion(skip, control, 1.0) - skip
    assert unit.abs().max() > 1e-3
    for scale in [0.5, 2.0, -1.0, 3.25]:
        torch.testing.assert_close(fusion(skip, control, scale) - skip, scale * unit, rtol=1e-5, atol=1e-5)


def test_add_fusion_matches_formula():
    fusion = perturb_zero_init_(make("add"), "add")
    skip, control = randn(*SHAPE, seed=22, dtype=torch.float64), randn(*SHAPE, seed=23, dtype=torch.float64)
    fusion = fusion.double()
    expected = skip + 0.6 * F.conv2d(control, fusion.conv.weight, fusion.conv.bias)
    torch.testing.assert_close(fusion(skip, control, 0.6), expected, rtol=0, atol=1e-12)


def test_concat_fusion_sees_the_skip_too():
    fusion = perturb_zero_init_(make("concat"), "concat").double()
    skip, control = randn(*SHAPE, seed=24, dtype=torch.float64), randn(*SHAPE, seed=25, dtype=torch.float64)
    w, b = fusion.proj.weight[:, :, 0, 0], fusion.proj.bias
    expected = skip + 0.9 * (torch.einsum("oi,nihw->nohw", w[:, :CHANNELS], skip)
                             + torch.einsum("oi,nihw->nohw", w[:, CHANNELS:], control) + b[None, :, None, None])
    torch.testing.assert_close(fusion(skip, control, 0.9), expected, rtol=0, atol=1e-12)
    # Unlike "add", the correction changes with the skip for a fixed control.
    other_skip = randn(*SHAPE, seed=26, dtype=torch.float64)
    delta_a = fusion(skip, control, 1.0) - skip
    delta_b = fusion(other_skip, control, 1.0) - other_skip
    assert (delta_a - delta_b).abs().max() > 1e-3


def test_film_fusion_matches_hand_written_formula():
    fusion = perturb_zero_init_(make("film"), "film")
    skip, control = randn(*SHAPE, seed=27), randn(*SHAPE, seed=28)
    w = fusion.conv.weight[:, :, 0, 0].double()
    b = fusion.conv.bias.double()
    for scale in [1.0, 0.4, -2.0]:
        film = torch.einsum("oi,nihw->nohw", w, control.double()) + b[None, :, None, None]
        gamma, beta = film[:, :CHANNELS], film[:, CHANNELS:]
        expected = skip.double() * (1 + scale * gamma) + scale * beta
        torch.testing.assert_close(fusion(skip, control, scale).double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Cross-attention against a float64 reference
# ---------------------------------------------------------------------------------------------------------------------


def cross_attention_reference(fusion: CrossAttentionFusion, skip: torch.Tensor, control: torch.Tensor, scale: float,
                              num_heads: int) -> torch.Tensor:
    """The gated multi-head cross-attention written out in float64 with the module's own weights."""
    d = {name: p.detach().double() for name, p in fusion.named_parameters()}
    skip, control = skip.double(), control.double()
    n, c, h, w = skip.shape
    groups, eps = fusion.norm_skip.num_groups, fusion.norm_skip.eps

    def norm(x, prefix):
        xg = x.reshape(n, groups, -1)
        mean = xg.mean(-1, keepdim=True)
        var = xg.var(-1, unbiased=False, keepdim=True)
        xn = ((xg - mean) / torch.sqrt(var + eps)).reshape(n, c, h, w)
        return xn * d[f"{prefix}.weight"][None, :, None, None] + d[f"{prefix}.bias"][None, :, None, None]

    def conv1x1(x, prefix):
        return torch.einsum("oi,nihw->nohw", d[f"{prefix}.weight"][:, :, 0, 0], x) + d[f"{prefix}.bias"][None, :,
                                                                                                        None, None]

    def tokens(x):  # [N, C, H, W] -> [N, C, L] -> per head [N, heads, L, C/heads]
        return x.reshape(n, num_heads, c // num_heads, h * w).transpose(-1, -2)

    q = tokens(conv1x1(norm(skip, "norm_skip"), "to_q"))
    context = norm(control, "norm_control")
    k, v = tokens(conv1x1(context, "to_k")), tokens(conv1x1(context, "to_v"))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // num_heads), dim=-1)
    out = (weights @ v).transpose(-1, -2).reshape(n, c, h, w)
    return skip + scale * torch.tanh(d["gate"]) * conv1x1(out, "proj")


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] == CHANNELS else 0))
    return module


def test_cross_attention_matches_float64_multi_head_reference():
    fusion = randomize_(make("cross_attention"), seed=29)
    with torch.no_grad():
        fusion.gate.fill_(0.8)
    skip, control = randn(*SHAPE, seed=30), randn(*SHAPE, seed=31) * 2 + 0.5
    for scale in [1.0, 0.3]:
        out = fusion(skip, control, scale)
        expected = cross_attention_reference(fusion, skip, control, scale, num_heads=4)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=2e-5)
    # The head split matters: one head over all channels is a different function.
    one_head = cross_attention_reference(fusion, skip, control, 1.0, num_heads=1)
    assert (fusion(skip, control, 1.0).double() - one_head).abs().max() > 1e-3


def test_cross_attention_is_invariant_to_permuting_control_pixels():
    # Each skip pixel attends to all control pixels: the order of the keys/values does not matter.
    fusion = randomize_(make("cross_attention"), seed=32)
    with torch.no_grad():
        fusion.gate.fill_(0.5)
    skip, control = randn(*SHAPE, seed=33), randn(*SHAPE, seed=34)
    n, c, h, w = SHAPE
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(35))
    shuffled = control.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w)
    assert not torch.equal(shuffled, control)
    torch.testing.assert_close(fusion(skip, shuffled, 1.0), fusion(skip, control, 1.0), rtol=1e-5, atol=1e-5)


def test_cross_attention_rejects_bad_heads_and_groups():
    with pytest.raises(ValueError, match="num_heads=3"):
        CrossAttentionFusion(16, num_heads=3, norm_groups=4)
    with pytest.raises(ValueError, match="norm_groups=5"):
        CrossAttentionFusion(16, num_heads=4, norm_groups=5)


# ---------------------------------------------------------------------------------------------------------------------
# Shapes and the registry
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_mismatched_shapes_raise(mode):
    fusion = make(mode)
    skip = randn(*SHAPE, seed=36)
    bad = randn(2, CHANNELS, 6, 4, seed=37)
    with pytest.raises(ValueError, match=r"skip \(2, 16, 6, 5\) and control \(2, 16, 6, 4\)"):
        fusion(skip, bad, 1.0)
    wrong_channels = randn(2, 8, 6, 5, seed=38)
    with pytest.raises(ValueError, match=r"\[N, 16, H, W\]"):
        fusion(wrong_channels, wrong_channels, 1.0)


def test_build_fusion_builds_every_mode():
    expected = {"add": AddFusion, "concat": ConcatFusion, "film": FiLMFusion, "cross_attention": CrossAttentionFusion}
    assert FUSION_MODES == expected
    for mode, cls in expected.items():
        fusion = build_fusion(mode, 8, **({"num_heads": 2, "norm_groups": 4} if mode == "cross_attention" else {}))
        assert type(fusion) is cls and fusion.channels == 8
    assert build_fusion("cross_attention", 16, num_heads=8, norm_groups=4).num_heads == 8


def test_build_fusion_unknown_mode_names_it_and_the_valid_ones():
    with pytest.raises(ValueError) as info:
        build_fusion("multiply", 16)
    message = str(info.value)
    assert "'multiply'" in message
    for mode in FUSION_MODES:
        assert mode in message
