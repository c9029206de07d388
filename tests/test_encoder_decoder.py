"""Tests for layoutgen.models.encoder and layoutgen.models.decoder: shapes, VAE outputs, heads and config errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layoutgen.models.components.blocks import AttentionBlock, ResNetBlock
from layoutgen.models.decoder import Decoder
from layoutgen.models.encoder import LOGVAR_MAX, LOGVAR_MIN, Encoder

SMALL = {"latent_channels": 4, "base_channels": 8, "norm_groups": 4}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


def count(module: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in module.modules())


# ---------------------------------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variational", [False, True])
@pytest.mark.parametrize("steps", [2, 3, 4, 5])
def test_encoder_shapes(steps, variational):
    torch.manual_seed(0)
    enc = Encoder({**SMALL, "downsampling_steps": steps, "variational": variational}).eval()
    assert enc.downsampling_factor == 2 ** steps
    h, w = 32, 32
    out = enc(randn(2, 3, h, w, seed=1))
    latent_shape = (2, 4, h // 2 ** steps, w // 2 ** steps)
    if variational:
        assert set(out) == {"mu", "logvar"}
        assert out["mu"].shape == latent_shape
        assert out["logvar"].shape == latent_shape
        assert enc.conv_out.out_channels == 8
    else:
        assert set(out) == {"latent"}
        assert out["latent"].shape == latent_shape
        assert enc.conv_out.out_channels == 4
    assert all(torch.isfinite(v).all() for v in out.values())


def test_encoder_logvar_is_clamped():
    torch.manual_seed(0)
    enc = Encoder({**SMALL, "downsampling_steps": 2, "variational": True}).eval()
    with torch.no_grad():
        enc.conv_out.weight.mul_(1e4)
    out = enc(randn(2, 3, 16, 16, seed=2))
    mu, logvar = out["mu"], out["logvar"]
    # The raw conv output is far outside the bounds (mu, its other half, is not clamped)...
    assert mu.max() > LOGVAR_MAX and mu.min() < LOGVAR_MIN
    # ... and logvar is clamped to [-30, 20], with both bounds reached.
    assert (LOGVAR_MIN, LOGVAR_MAX) == (-30.0, 20.0)
    assert logvar.min() >= -30.0 and logvar.max() <= 20.0
    assert (logvar == 20.0).any() and (logvar == -30.0).any()
    assert torch.isfinite(torch.exp(logvar)).all()


def test_encoder_mid_attention_and_res_blocks():
    torch.manual_seed(0)
    base = Encoder({**SMALL, "downsampling_steps": 2})
    enc = Encoder({**SMALL, "downsampling_steps": 2, "mid_attention": True, "attention_heads": 2,
                   "num_res_blocks": 2}).eval()
    assert count(base, AttentionBlock) == 0
    assert count(enc, AttentionBlock) == 1
    assert enc.mid.attn.num_heads == 2
    # 3 levels x 2 blocks + 2 in the middle block.
    assert count(base, ResNetBlock) == 3 * 1 + 2
    assert count(enc, ResNetBlock) == 3 * 2 + 2
    assert enc(randn(1, 3, 16, 16, seed=3))["latent"].shape == (1, 4, 4, 4)


def test_encoder_channel_multipliers():
    torch.manual_seed(0)
    enc = Encoder({**SMALL, "downsampling_steps": 2, "channel_multipliers": [1, 3, 2]})
    assert enc.conv_in.out_channels == 8
    assert enc.mid.res1.in_channels == 16
    assert enc(randn(1, 3, 16, 16, seed=4))["latent"].shape == (1, 4, 4, 4)


def test_encoder_channel_multipliers_wrong_length():
    with pytest.raises(ValueError) as info:
        Encoder({**SMALL, "downsampling_steps": 3, "channel_multipliers": [1, 2, 4]})
    message = str(info.value)
    assert "encoder.channel_multipliers" in message
    assert "downsampling_steps=3" in message and "needs 4" in message


def test_encoder_norm_groups_not_dividing_channels():
    with pytest.raises(ValueError) as info:
        Encoder({**SMALL, "base_channels": 12, "norm_groups": 8, "downsampling_steps": 2})
    message = str(info.value)
    assert "encoder.norm_groups" in message and "12" in message


def test_encoder_attention_heads_not_dividing():
    with pytest.raises(ValueError, match="encoder.attention_heads"):
        Encoder({**SMALL, "downsampling_steps": 2, "mid_attention": True, "attention_heads": 3})


def test_encoder_unknown_key_and_bad_value():
    with pytest.raises(ValueError, match=r"encoder\.downsampling_stepz: unknown key"):
        Encoder({**SMALL, "downsampling_stepz": 2})
    with pytest.raises(ValueError, match=r"encoder\.downsampling_steps"):
        Encoder({**SMALL, "downsampling_steps": -1})
    with pytest.raises(ValueError, match=r"encoder\.variational"):
        Encoder({**SMALL, "variational": "yes"})


@pytest.mark.parametrize("bad_shape", [(2, 4, 16, 16), (2, 1, 16, 16), (3, 16, 16)])
def test_encoder_wrong_input_channels(bad_shape):
    torch.manual_seed(0)
    enc = Encoder({**SMALL, "downsampling_steps": 2})
    with pytest.raises(ValueError) as info:
        enc(torch.zeros(bad_shape))
    message = str(info.value)
    assert str(tuple(bad_shape)) in message and "3" in message


# ---------------------------------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [2, 3, 4, 5])
def test_decoder_shapes(steps):
    torch.manual_seed(0)
    dec = Decoder({**SMALL, "upsampling_steps": steps}).eval()
    z = randn(2, 4, 1, 2, seed=5)
    out = dec(z)
    assert set(out) == {"rgb"}
    assert out["rgb"].shape == (2, 3, 2 ** steps, 2 * 2 ** steps)
    assert dec.head_names == ["rgb"]


@pytest.mark.parametrize("variational", [False, True])
@pytest.mark.parametrize("steps", [2, 3, 4, 5])
def test_encoder_decoder_round_trip_shapes(steps, variational):
    torch.manual_seed(0)
    enc = Encoder({**SMALL, "downsampling_steps": steps, "variational": variational}).eval()
    dec = Decoder({**SMALL, "upsampling_steps": steps}).eval()
    x = randn(1, 3, 32, 32, seed=6)
    out = enc(x)
    z = out["mu"] if variational else out["latent"]
    assert dec(z)["rgb"].shape == x.shape


def test_decoder_multi_head_sources():
    torch.manual_seed(0)
    heads = [
        {"type": "RGBHead", "name": "rgb", "out_channels": 3, "activation": "tanh"},
        {"type": "SegmentationHead", "name": "seg", "num_classes": 5},
        {"type": "SegmentationHead", "name": "seg_mid", "num_classes": 3, "source": "decoder_mid"},
        {"type": "SegmentationHead", "name": "seg_latent", "num_classes": 2, "source": "latent"},
        {"type": "ClassificationHead", "name": "cls", "num_classes": 6, "hidden_channels": 8, "norm_groups": 4},
        {"type": "ClassificationHead", "name": "cls_dec", "num_classes": 2, "hidden_channels": 8,
         "norm_groups": 4, "source": "decoder"},
        {"type": "ClassificationHead", "name": "cls_lat", "num_classes": 2, "hidden_channels": 8,
         "norm_groups": 4, "source": "latent"},
    ]
    dec = Decoder({**SMALL, "upsampling_steps": 3, "heads": heads}).eval()
    assert dec.head_names == [h["name"] for h in heads]
    z = randn(2, 4, 3, 2, seed=7)
    out = dec(z)
    assert set(out) == set(dec.head_names)
    assert out["rgb"].shape == (2, 3, 24, 16)
    assert out["rgb"].abs().max() <= 1.0
    assert out["seg"].shape == (2, 5, 24, 16)
    assert out["seg_mid"].shape == (2, 3, 3, 2)
    assert out["seg_latent"].shape == (2, 2, 3, 2)
    assert out["cls"].shape == (2, 6)
    assert out["cls_dec"].shape == (2, 2)
    assert out["cls_lat"].shape == (2, 2)
    # in_channels come from each head's source: full-res level, bottleneck (base * 4), latent.
    assert dec.heads["seg"].layers[0].in_channels == 8
    assert dec.heads["seg_mid"].layers[0].in_channels == 32
    assert dec.heads["seg_latent"].layers[0].in_channels == 4
    assert dec.heads["cls"].conv.in_channels == 32
    # Defaults were filled into the stored config.
    assert dec.config["heads"][1]["source"] == "decoder"
    assert dec.config["heads"][4]["source"] == "decoder_mid"


def test_decoder_latent_head_reads_the_latent():
    """A head on the latent source depends only on the latent, not on the trunk's weights."""
    torch.manual_seed(0)
    heads = [{"type": "RGBHead", "name": "rgb"},
             {"type": "SegmentationHead", "name": "seg_latent", "num_classes": 2, "source": "latent"}]
    dec = Decoder({**SMALL, "upsampling_steps": 2, "heads": heads}).eval()
    z = randn(1, 4, 4, 4, seed=8)
    before = dec(z)
    with torch.no_grad():
        dec.conv_in.weight.add_(1.0)
    after = dec(z)
    torch.testing.assert_close(after["seg_latent"], before["seg_latent"], rtol=0, atol=0)
    torch.testing.assert_close(after["seg_latent"], dec.heads["seg_latent"](z))
    assert not torch.allclose(after["rgb"], before["rgb"])


def test_decoder_mid_attention_res_blocks():
    torch.manual_seed(0)
    dec = Decoder({**SMALL, "upsampling_steps": 2, "mid_attention": True, "num_res_blocks": 2,
                   "attention_heads": 4}).eval()
    assert count(dec, AttentionBlock) == 1
    assert count(dec, ResNetBlock) == 3 * 2 + 2
    assert dec(randn(1, 4, 3, 3, seed=9))["rgb"].shape == (1, 3, 12, 12)


def test_decoder_duplicate_head_names():
    heads = [{"type": "RGBHead", "name": "out"}, {"type": "SegmentationHead", "name": "out", "num_classes": 3}]
    with pytest.raises(ValueError) as info:
        Decoder({**SMALL, "upsampling_steps": 2, "heads": heads})
    message = str(info.value)
    assert "decoder.heads[1].name" in message and "duplicate" in message and "'out'" in message


def test_decoder_needs_a_head():
    with pytest.raises(ValueError, match=r"decoder\.heads"):
        Decoder({**SMALL, "upsampling_steps": 2, "heads": []})


def test_decoder_bad_head_config_names_index():
    heads = [{"type": "RGBHead"}, {"type": "SegmentationHead", "name": "seg"}]
    with pytest.raises(ValueError, match=r"decoder\.heads\[1\]\.num_classes"):
        Decoder({**SMALL, "upsampling_steps": 2, "heads": heads})


def test_decoder_channel_multipliers_wrong_length():
    with pytest.raises(ValueError) as info:
        Decoder({**SMALL, "upsampling_steps": 2, "channel_multipliers": [1, 2, 4, 4]})
    message = str(info.value)
    assert "decoder.channel_multipliers" in message
    assert "upsampling_steps=2" in message and "needs 3" in message


def test_decoder_norm_groups_not_dividing_channels():
    with pytest.raises(ValueError) as info:
        Decoder({**SMALL, "upsampling_steps": 2, "norm_groups": 16, "channel_multipliers": [2, 3, 4]})
    message = str(info.value)
    assert "decoder.norm_groups" in message and "24" in message and "level 1" in message


@pytest.mark.parametrize("bad_shape", [(2, 3, 4, 4), (2, 8, 4, 4), (4, 4, 4)])
def test_decoder_wrong_latent_channels(bad_shape):
    torch.manual_seed(0)
    dec = Decoder({**SMALL, "upsampling_steps": 2})
    with pytest.raises(ValueError) as info:
        dec(torch.zeros(bad_shape))
    assert str(tuple(bad_shape)) in str(info.value)


def test_encoder_decoder_gradients_flow():
    torch.manual_seed(0)
    enc = Encoder({**SMALL, "downsampling_steps": 2, "variational": True})
    dec = Decoder({**SMALL, "upsampling_steps": 2})
    x = randn(2, 3, 16, 16, seed=10)
    out = enc(x)
    loss = dec(out["mu"])["rgb"].square().mean() + out["logvar"].mean()
    loss.backward()
    for name, p in [*enc.named_parameters(), *dec.named_parameters()]:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert enc.conv_in.weight.grad.abs().sum() > 0
