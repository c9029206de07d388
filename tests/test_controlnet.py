"""Tests for layoutgen.models.components.controlnet: the ControlNet adapter of the UNet (Zhang et al. 2023)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layoutgen.models.components.base_model import BaseModel
from layoutgen.models.components.controlnet import COPIED_MODULES, ControlNet, ControlNetConfig
from layoutgen.models.components.fusion import FUSION_MODES
from layoutgen.models.components.unet import UNet

MODES = sorted(FUSION_MODES)
TINY_UNET = {"in_channels": 4, "base_channels": 16, "depth": 2, "num_res_blocks": 1, "time_dim": 32,
             "norm_groups": 4, "num_heads": 4}
COPIED_PREFIXES = tuple(f"{name}." for name in COPIED_MODULES)  # "mid." must not match "mid_fusion."
VARIANTS = {
    "plain": {},
    "classes": {"num_classes": 3},
    "cond": {"cond_channels": 2},
}


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def make_unet(seed: int = 0, **overrides) -> UNet:
    """A tiny UNet whose zero-initialised layers (conv_out, attention projections) are perturbed, so its output and
    every attention path are non-trivial."""
    torch.manual_seed(seed)
    unet = UNet({**TINY_UNET, **overrides})
    with torch.no_grad():
        nn.init.normal_(unet.conv_out.weight, std=0.2)
        nn.init.normal_(unet.conv_out.bias, std=0.2)
        for module in unet.modules():
            if hasattr(module, "attn") and module.attn is not None:
                nn.init.normal_(module.attn.proj.weight, std=0.2)
    return unet.eval()


def inputs(unet: UNet, factor: int = 4, control_channels: int = 1, size: tuple[int, int] = (8, 8),
           batch: int = 2, seed: int = 100) -> dict:
    """Keyword arguments for forward / controlled_unet_forward matching the UNet's config."""
    cfg = unet.cfg
    h, w = size
    args = {"x": randn(batch, cfg.in_channels, h, w, seed=seed),
            "t": torch.tensor([3, 250, 17, 499][:batch]),
            "control": randn(batch, control_channels, h * factor, w * factor, seed=seed + 1),
            "cond": randn(batch, cfg.cond_channels, h, w, seed=seed + 2) if cfg.cond_channels else None,
            "labels": torch.tensor([0, 2, 1, 3][:batch]) if cfg.num_classes else None}
    return args


def randomize_(module: nn.Module, seed: int, std: float = 0.1) -> nn.Module:
    """Every parameter moved by a random amount (as training would), including the zero-initialised ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


# The zero-initialised parameters of each fusion mode (what makes it the identity at initialisation).
FUSION_ZERO_INIT = {"add": ("conv.weight", "conv.bias"), "concat": ("proj.weight", "proj.bias"),
                    "film": ("conv.weight", "conv.bias"), "cross_attention": ("gate",)}


def zero_init_params(controlnet: ControlNet) -> dict[str, torch.Tensor]:
    """The parameters that start at zero: the hint encoder's last conv and the fusions' zero layers / gates."""
    suffixes = FUSION_ZERO_INIT[controlnet.cfg.fusion]
    return {name: p for name, p in controlnet.named_parameters()
            if (name.startswith(("skip_fusions.", "mid_fusion.")) and name.endswith(suffixes))
            or name.startswith("hint_encoder.out.")}


def copy_params(controlnet: ControlNet) -> dict[str, torch.Tensor]:
    return {name: p for name, p in controlnet.named_parameters() if name.startswith(COPIED_PREFIXES)}


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


def test_config_defaults_and_yaml_round_trip():
    cfg = ControlNetConfig.from_dict({"unet": TINY_UNET})
    assert (cfg.control_channels, cfg.downsampling_factor, cfg.hint_channels, cfg.fusion, cfg.conditioning_scale,
            cfg.fusion_heads) == (1, 4, [16, 32, 64], "add", 1.0, 4)
    assert cfg.unet.base_channels == 16
    model = ControlNet(unet=TINY_UNET, fusion="film", conditioning_scale=0.5)
    assert model.config["unet"]["base_channels"] == 16 and model.config["fusion"] == "film"
    assert ControlNetConfig.from_dict(model.cfg.to_dict()) == model.cfg


@pytest.mark.parametrize("changes, key", [
    ({"fusion": "sum"}, "controlnet.fusion"),
    ({"downsampling_factor": 3}, "controlnet.downsampling_factor"),
    ({"downsampling_factor": 6}, "controlnet.downsampling_factor"),
    ({"downsampling_factor": 0}, "controlnet.downsampling_factor"),
    ({"hint_channels": []}, "controlnet.hint_channels"),
    ({"hint_channels": [16, 0]}, "controlnet.hint_channels"),
    ({"control_channels": 0}, "controlnet.control_channels"),
    ({"fusion": "cross_attention", "fusion_heads": 3}, "controlnet.fusion_heads"),
    ({"unet": {**TINY_UNET, "depth": 0}}, "controlnet.unet.depth"),
    ({"hint_channel": [16]}, "controlnet.hint_channel"),
])
def test_config_errors_name_the_key(changes, key):
    with pytest.raises(ValueError) as info:
        ControlNet({"unet": TINY_UNET, **changes})
    assert str(info.value).startswith(key + ":"), str(info.value)


def test_config_error_lists_valid_fusion_modes_and_requires_unet():
    with pytest.raises(ValueError) as info:
        ControlNet(unet=TINY_UNET, fusion="sum")
    assert "'sum'" in str(info.value) and all(mode in str(info.value) for mode in FUSION_MODES)
    with pytest.raises(ValueError, match="controlnet.unet: missing required key"):
        ControlNet()
    with pytest.raises(ValueError, match="power of two"):
        ControlNet(unet=TINY_UNET, downsampling_factor=12)


# ---------------------------------------------------------------------------------------------------------------------
# from_unet
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_from_unet_copies_the_encoder_path_exactly(variant):
    unet = make_unet(**VARIANTS[variant])
    unet = randomize_(unet, seed=1)  # so every copied tensor (norm affines, biases) is distinct from its default
    controlnet = ControlNet.from_unet(unet, fusion="add")
    assert controlnet.skip_channels == unet.skip_channels and controlnet.mid_channels == unet.mid_channels
    assert (controlnet.class_embed is None) == (unet.class_embed is None)
    unet_state, cn_state = unet.state_dict(), controlnet.state_dict()
    copied_keys = {k for k in unet_state if k.startswith(COPIED_PREFIXES)}
    assert copied_keys == {k for k in cn_state if k.startswith(COPIED_PREFIXES)}
    assert any(k.startswith("down.") for k in copied_keys) and any(k.startswith("mid.") for k in copied_keys)
    for key in copied_keys:
        assert torch.equal(cn_state[key], unet_state[key]), key
        assert cn_state[key].data_ptr() != unet_state[key].data_ptr(), f"{key} is shared, not copied"
    # Nothing of the up path is copied.
    assert not any(k.startswith(("up.", "conv_out", "norm_out")) for k in cn_state)
    # Training the copy leaves the UNet alone.
    with torch.no_grad():
        controlnet.conv_in.weight.add_(1.0)
    assert not torch.equal(controlnet.conv_in.weight, unet.conv_in.weight)


def test_from_unet_starts_hint_and_fusions_at_zero():
    controlnet = ControlNet.from_unet(make_unet(), fusion="concat")
    zero = zero_init_params(controlnet)
    assert "hint_encoder.out.weight" in zero and "mid_fusion.proj.weight" in zero
    assert sum(name.startswith("skip_fusions") for name in zero) == 2 * len(controlnet.skip_channels)
    for name, p in zero.items():
        assert torch.count_nonzero(p) == 0, name


# ---------------------------------------------------------------------------------------------------------------------
# forward: the copy's features
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_copy_features_equal_unet_features_at_init(variant):
    # The copy is the UNet's encoder and the hint starts at zero: before training its features are the UNet's.
    unet = make_unet(**VARIANTS[variant])
    controlnet = ControlNet.from_unet(unet).eval()
    args = inputs(unet)
    with torch.no_grad():
        control_skips, control_mid = controlnet(**args)
        emb = unet.embed(args["t"], args["labels"], batch_size=2)
        h, skips = unet.encode(args["x"], emb, args["cond"])
        mid = unet.middle(h, emb)
    assert len(control_skips) == len(skips) == len(unet.skip_channels)
    for ours, theirs, channels in zip(control_skips, skips, unet.skip_channels):
        assert ours.shape == theirs.shape and ours.shape[1] == channels
        assert torch.equal(ours, theirs)
    assert control_mid.shape == mid.shape and torch.equal(control_mid, mid)


def test_forward_shapes_for_odd_latent_and_deeper_unet():
    unet = make_unet(depth=3, channel_multipliers=[1, 2, 2], attention_levels=[2])
    controlnet = ControlNet.from_unet(unet, control_channels=5, fusion="film")
    args = inputs(unet, control_channels=5, size=(7, 5), batch=1)
    with torch.no_grad():
        randomize_(controlnet.hint_encoder, seed=2)
        control_skips, control_mid = controlnet(**args)
        emb = unet.embed(args["t"], None, batch_size=1)
        h, skips = unet.encode(args["x"], emb)
    assert [s.shape for s in control_skips] == [s.shape for s in skips]
    assert control_mid.shape == h.shape
    # With a trained hint encoder the control changes the features.
    assert not torch.equal(control_skips[0], skips[0])
    with torch.no_grad():
        prediction = controlnet.controlled_unet_forward(unet, **args)
    assert prediction.shape == args["x"].shape


def test_control_changes_features_once_the_hint_encoder_is_trained():
    unet = make_unet()
    controlnet = ControlNet.from_unet(unet)
    randomize_(controlnet.hint_encoder, seed=3)
    args = inputs(unet)
    with torch.no_grad():
        skips_a, mid_a = controlnet(**args)
        skips_b, mid_b = controlnet(**{**args, "control": randn(*args["control"].shape, seed=4)})
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(skips_a, skips_b))
    assert (mid_a - mid_b).abs().max() > 1e-4


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_hint_encoder_brings_control_to_latent_resolution(factor):
    unet = make_unet()
    controlnet = ControlNet.from_unet(unet, downsampling_factor=factor)
    strided = [m for m in controlnet.hint_encoder.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == factor.bit_length() - 1
    # The widths given are all used, even when f needs fewer stride-2 steps than there are widths.
    convs = [m for m in controlnet.hint_encoder.layers if isinstance(m, nn.Conv2d)]
    assert {m.out_channels for m in convs} == {16, 32, 64}
    # Downsampling comes first, so the high-resolution stages run at the narrow widths (as in ControlNet).
    # convs: the input conv, then per step (conv at the width, conv to the next width): strides on the latter.
    transitions = [m.stride[0] for m in convs[2::2]]
    assert transitions == sorted(transitions, reverse=True) and transitions.count(2) == len(strided)
    control = randn(2, 1, 8 * factor, 6 * factor, seed=5)
    hint = controlnet.hint_encoder(control)
    assert hint.shape == (2, unet.skip_channels[0], 8, 6)
    assert torch.count_nonzero(hint) == 0  # the zero-initialised last conv
    args = inputs(unet, factor=factor, size=(8, 6))
    with torch.no_grad():
        skips, _ = controlnet(**args)
    assert skips[0].shape == (2, unet.skip_channels[0], 8, 6)


def test_hint_encoder_with_one_width_and_large_factor():
    controlnet = ControlNet(unet=TINY_UNET, hint_channels=[8], downsampling_factor=8, control_channels=3)
    convs = [m for m in controlnet.hint_encoder.layers if isinstance(m, nn.Conv2d)]
    assert {m.out_channels for m in convs} == {8}
    assert sum(m.stride == (2, 2) for m in convs) == 3
    assert controlnet.hint_encoder(randn(1, 3, 32, 24, seed=6)).shape == (1, 16, 4, 3)


@pytest.mark.parametrize("bad_shape", [(2, 1, 8, 8), (2, 2, 32, 32), (1, 1, 32, 32), (2, 1, 32, 28), (2, 32, 32)])
def test_bad_control_shape_raises_naming_expected_and_actual(bad_shape):
    unet = make_unet()
    controlnet = ControlNet.from_unet(unet)
    args = {**inputs(unet), "control": torch.zeros(bad_shape)}
    for call in (lambda: controlnet(**args), lambda: controlnet.controlled_unet_forward(unet, **args)):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert "[N, control_channels, H*f, W*f] = [2, 1, 32, 32]" in message
        assert f"shape {bad_shape}" in message


def test_other_input_errors():
    unet = make_unet(cond_channels=2)
    controlnet = ControlNet.from_unet(unet)
    args = inputs(unet)
    with pytest.raises(ValueError, match="cond_channels=2"):
        controlnet(**{**args, "cond": None})
    with pytest.raises(ValueError, match="labels"):
        controlnet(**{**args, "labels": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="expected x"):
        controlnet(**{**args, "x": randn(2, 3, 8, 8, seed=7)})
    with pytest.raises(ValueError, match="control"):
        controlnet(**{**args, "control": None})
    classes = make_unet(num_classes=3)
    cn_classes = ControlNet.from_unet(classes)
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\]"):
        cn_classes(**{**inputs(classes), "labels": torch.tensor([0, 4])})


def test_controlled_forward_rejects_a_different_unet():
    controlnet = ControlNet.from_unet(make_unet())
    other = make_unet(base_channels=8)
    with pytest.raises(ValueError, match="skip channels"):
        controlnet.controlled_unet_forward(other, **inputs(other))


def test_gradient_checkpointing_gives_the_same_features_and_gradients():
    unet = make_unet()
    plain = ControlNet.from_unet(unet, fusion="film").train()
    randomize_(plain, seed=8)
    ckpt = ControlNet.from_unet(make_unet(gradient_checkpointing=True), fusion="film").train()
    ckpt.load_state_dict(plain.state_dict())
    args = inputs(unet)
    results = []
    for model in (plain, ckpt):
        skips, mid = model(**args)
        (sum(s.square().mean() for s in skips) + mid.square().mean()).backward()
        results.append((skips, mid, model.down[0].res.conv1.weight.grad.clone()))
    for a, b in zip(results[0][0], results[1][0]):
        assert torch.equal(a, b)
    assert torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][2], results[1][2])


# ---------------------------------------------------------------------------------------------------------------------
# The controlled UNet
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("mode", MODES)
def test_controlled_unet_equals_unet_exactly_at_init(mode, variant):
    unet = make_unet(**VARIANTS[variant])
    controlnet = ControlNet.from_unet(unet, fusion=mode, control_channels=3).eval()
    args = inputs(unet, control_channels=3)
    with torch.no_grad():
        expected = unet(args["x"], args["t"], args["cond"], args["labels"])
        assert expected.abs().max() > 0.1  # a meaningful comparison: the UNet predicts something non-zero
        for scale in (None, 1.0, 2.5):
            out = controlnet.controlled_unet_forward(unet, **args, scale=scale)
            assert torch.equal(out, expected), (mode, variant, scale)


@pytest.mark.parametrize("mode", MODES)
def test_one_adapter_step_changes_the_output_and_not_the_unet(mode):
    unet = make_unet(num_classes=3)
    unet.freeze()
    assert not any(p.requires_grad for p in unet.parameters())
    controlnet = ControlNet.from_unet(unet, fusion=mode).train()
    args = inputs(unet)
    target = randn(*args["x"].shape, seed=9)
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}
    zero_before = {k: v.detach().clone() for k, v in zero_init_params(controlnet).items()}
    copy_before = {k: v.detach().clone() for k, v in copy_params(controlnet).items()}
    with torch.no_grad():
        reference = unet(args["x"], args["t"], args["cond"], args["labels"])
    optimizer = torch.optim.Adam(controlnet.parameters(), lr=1e-2)

    def step():
        optimizer.zero_grad()
        F.mse_loss(controlnet.controlled_unet_forward(unet, **args), target).backward()
        assert all(p.grad is None for p in unet.parameters())
        optimizer.step()

    step()
    for key, value in unet.state_dict().items():
        assert torch.equal(value, unet_before[key]), f"the frozen UNet's {key} changed"
    params = dict(controlnet.named_parameters())
    fusion_zero = [k for k in zero_before if not k.startswith("hint_encoder")]
    assert fusion_zero and all(not torch.equal(params[k], zero_before[k]) for k in fusion_zero)
    # The zero layers block the gradient to everything behind them on the first step (ControlNet's zero convolution).
    assert all(torch.equal(params[k], v) for k, v in copy_before.items())
    with torch.no_grad():
        after = controlnet.controlled_unet_forward(unet, **args)
    assert (after - reference).abs().max() > 1e-4

    step()  # now the fusion weights are non-zero, gradients reach the trainable copy and the hint encoder
    assert any(not torch.equal(params[k], v) for k, v in copy_before.items())
    assert not torch.equal(params["hint_encoder.out.weight"], zero_before["hint_encoder.out.weight"])
    assert all(torch.equal(v, unet_before[k]) for k, v in unet.state_dict().items())


@pytest.mark.parametrize("mode", MODES)
def test_scale_zero_switches_control_off_and_fuse_uses_the_config_scale(mode):
    unet = make_unet()
    controlnet = ControlNet.from_unet(unet, fusion=mode, conditioning_scale=0.5).eval()
    randomize_(controlnet, seed=10)
    args = inputs(unet)
    with torch.no_grad():
        expected = unet(args["x"], args["t"])
        assert torch.equal(controlnet.controlled_unet_forward(unet, **args, scale=0.0), expected)
        assert (controlnet.controlled_unet_forward(unet, **args) - expected).abs().max() > 1e-4
        emb = unet.embed(args["t"], None, batch_size=2)
        h, skips = unet.encode(args["x"], emb)
        mid = unet.middle(h, emb)
        control_skips, control_mid = controlnet(**args)
        default = controlnet.fuse(skips, mid, control_skips, control_mid)
        half = controlnet.fuse(skips, mid, control_skips, control_mid, scale=0.5)
        full = controlnet.fuse(skips, mid, control_skips, control_mid, scale=1.0)
    assert all(torch.equal(a, b) for a, b in zip(default[0], half[0])) and torch.equal(default[1], half[1])
    assert not torch.equal(default[1], full[1])
    # The middle output is fused after the middle block (not before it).
    fused_mid = controlnet.mid_fusion(mid, control_mid, 0.5)
    assert torch.equal(default[1], fused_mid)
    assert len(skips) == 4  # conv_in, two res blocks, one downsample
    with pytest.raises(ValueError, match="expected 4 skips"):
        controlnet.fuse(skips[:-1], mid, control_skips[:-1], control_mid)


def test_controlled_forward_fuses_mid_after_the_middle_block():
    unet = make_unet()
    controlnet = ControlNet.from_unet(unet, fusion="add").eval()
    randomize_(controlnet, seed=11)
    args = inputs(unet)
    with torch.no_grad():
        emb = unet.embed(args["t"], None, batch_size=2)
        h, skips = unet.encode(args["x"], emb)
        control_skips, control_mid = controlnet(**args)
        fused_skips, fused_mid = controlnet.fuse(skips, unet.middle(h, emb), control_skips, control_mid)
        expected = unet.decode(fused_mid, fused_skips, emb)
        out = controlnet.controlled_unet_forward(unet, **args)
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_round_trip_is_bit_exact(mode, tmp_path):
    unet = make_unet(num_classes=2, cond_channels=1)
    controlnet = ControlNet.from_unet(unet, fusion=mode, control_channels=2, downsampling_factor=2,
                                      hint_channels=[8, 16], conditioning_scale=0.75).eval()
    randomize_(controlnet, seed=12)
    path = tmp_path / "controlnet.safetensors"
    controlnet.save_checkpoint(path)
    loaded = ControlNet.from_checkpoint(path).eval()
    assert type(loaded) is ControlNet and loaded.config == controlnet.config
    state, loaded_state = controlnet.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    args = inputs(unet, factor=2, control_channels=2)
    with torch.no_grad():
        assert torch.equal(loaded.controlled_unet_forward(unet, **args),
                           controlnet.controlled_unet_forward(unet, **args))
    assert type(BaseModel.from_checkpoint(path)) is ControlNet
