"""Tests for layoutgen.models.components.blocks: ResNet, attention, down- and upsampling blocks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layoutgen.models.components.blocks import (
    DEFAULT_NORM_EPS,
    AttentionBlock,
    DownsampleBlock,
    ResNetBlock,
    UpsampleBlock,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter (including norm affines and zero-initialised layers) set to fresh random values."""
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


# ---------------------------------------------------------------------------------------------------------------------
# ResNetBlock
# ---------------------------------------------------------------------------------------------------------------------


def test_resnet_block_keeps_shape_and_has_identity_skip():
    torch.manual_seed(0)
    block = ResNetBlock(16, norm_groups=4)
    x = randn(2, 16, 9, 7, seed=1)
    y = block(x)
    assert y.shape == x.shape
    assert isinstance(block.skip, nn.Identity)
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in block.modules())
    # The residual: with conv2 zeroed, the block is exactly the identity.
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)


def test_resnet_block_changes_channels_with_1x1_skip():
    torch.manual_seed(0)
    block = ResNetBlock(8, 16, norm_groups=4)
    x = randn(2, 8, 6, 10, seed=2)
    y = block(x)
    assert y.shape == (2, 16, 6, 10)
    assert isinstance(block.skip, nn.Conv2d)
    assert block.skip.kernel_size == (1, 1)
    assert (block.skip.in_channels, block.skip.out_channels) == (8, 16)
    # With conv2 zeroed, what is left is the 1x1 skip.
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    torch.testing.assert_close(block(x), block.skip(x))


def test_resnet_block_without_time_dim_has_no_time_proj():
    block = ResNetBlock(8, 8, norm_groups=4)
    assert block.time_proj is None
    assert not any(isinstance(m, nn.Linear) for m in block.modules())


@pytest.mark.parametrize("mode", ["default", "scale_shift"])
def test_resnet_block_time_embedding_changes_output(mode):
    torch.manual_seed(0)
    block = ResNetBlock(8, 16, time_dim=12, norm_groups=4, time_embedding_norm=mode)
    randomize_(block, seed=3)
    block.eval()
    x = randn(2, 8, 5, 6, seed=4)
    e1, e2 = randn(2, 12, seed=5), randn(2, 12, seed=6)
    y1, y2 = block(x, e1), block(x, e2)
    assert y1.shape == (2, 16, 5, 6)
    assert torch.isfinite(y1).all()
    assert not torch.allclose(y1, y2, atol=1e-4)
    # Deterministic for a fixed embedding.
    torch.testing.assert_close(block(x, e1), y1, rtol=0, atol=0)
    # The embedding of sample 0 only affects sample 0.
    e_mixed = torch.cat([e1[:1], e2[1:]])
    y_mixed = block(x, e_mixed)
    torch.testing.assert_close(y_mixed[0], y1[0])
    torch.testing.assert_close(y_mixed[1], y2[1])
    expected_out = 16 * (2 if mode == "scale_shift" else 1)
    assert block.time_proj[-1].out_features == expected_out


@pytest.mark.parametrize("mode", ["default", "scale_shift"])
def test_resnet_block_with_time_dim_needs_embedding(mode):
    block = ResNetBlock(8, 8, time_dim=4, norm_groups=4, time_embedding_norm=mode)
    with pytest.raises(ValueError, match="embedding"):
        block(randn(1, 8, 4, 4, seed=7))


def test_resnet_block_scale_shift_formula():
    """scale_shift: SiLU(norm2(h) * (1 + scale) + shift), norm2 without its own activation."""
    torch.manual_seed(0)
    block = ResNetBlock(8, 8, time_dim=6, norm_groups=4, time_embedding_norm="scale_shift")
    randomize_(block, seed=8)
    x, emb = randn(2, 8, 5, 5, seed=9), randn(2, 6, seed=10)
    h = block.conv1(F.silu(F.group_norm(x, 4, block.norm1.weight, block.norm1.bias, DEFAULT_NORM_EPS)))
    scale, shift = block.time_proj(emb)[:, :, None, None].chunk(2, dim=1)
    h = F.group_norm(h, 4, block.norm2.weight, block.norm2.bias, DEFAULT_NORM_EPS)
    h = F.silu(h * (1 + scale) + shift)
    expected = x + block.conv2(h)
    torch.testing.assert_close(block(x, emb), expected, rtol=1e-5, atol=1e-5)


def test_resnet_block_bad_time_embedding_norm():
    with pytest.raises(ValueError, match="time_embedding_norm"):
        ResNetBlock(8, 8, time_dim=4, norm_groups=4, time_embedding_norm="film")


def test_resnet_block_dropout_only_in_train_mode():
    torch.manual_seed(0)
    block = ResNetBlock(8, 8, dropout=0.5, norm_groups=4)
    randomize_(block, seed=11)
    x = randn(2, 8, 6, 6, seed=12)
    block.eval()
    y_eval = block(x)
    torch.testing.assert_close(block(x), y_eval, rtol=0, atol=0)
    block.train()
    torch.manual_seed(1)
    y_train1 = block(x)
    torch.manual_seed(2)
    y_train2 = block(x)
    assert not torch.allclose(y_train1, y_train2)
    assert not torch.allclose(y_train1, y_eval)
    # Same seed -> same dropout mask.
    torch.manual_seed(1)
    torch.testing.assert_close(block(x), y_train1, rtol=0, atol=0)
    # And a block without dropout is deterministic in train mode too.
    plain = ResNetBlock(8, 8, dropout=0.0, norm_groups=4).train()
    torch.testing.assert_close(plain(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("in_ch,out_ch,bad", [(12, 16, 12), (16, 12, 12)])
def test_resnet_block_bad_norm_groups_names_channels(in_ch, out_ch, bad):
    with pytest.raises(ValueError, match=rf"\b{bad} channels.*norm_groups=8"):
        ResNetBlock(in_ch, out_ch, norm_groups=8)


# ---------------------------------------------------------------------------------------------------------------------
# AttentionBlock
# ---------------------------------------------------------------------------------------------------------------------


def attention_block_reference(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """x + proj(multi-head softmax attention over pixels), written out per head in float64."""
    x = x.double()
    n, c, h, w = x.shape
    heads, hd = block.num_heads, c // block.num_heads
    groups = block.norm.num_groups
    # GroupNorm, biased variance per (sample, group).
    xg = x.reshape(n, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    xn = ((xg - mean) / torch.sqrt(var + block.norm.eps)).reshape(n, c, h, w)
    xn = xn * block.norm.weight.double()[None, :, None, None] + block.norm.bias.double()[None, :, None, None]
    tokens = xn.reshape(n, c, h * w).transpose(1, 2)  # [N, L, C]
    wqkv = block.qkv.weight.double().reshape(3 * c, c)
    qkv = tokens @ wqkv.T + block.qkv.bias.double()  # [N, L, 3C]
    q_all, k_all, v_all = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    outs = []
    for i in range(heads):
        sl = slice(i * hd, (i + 1) * hd)
        q, k, v = q_all[..., sl], k_all[..., sl], v_all[..., sl]
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1)
        outs.append(weights @ v)
    attn = torch.cat(outs, dim=-1)  # [N, L, C], heads concatenated along channels
    proj = attn @ block.proj.weight.double().reshape(c, c).T + block.proj.bias.double()
    return x + proj.transpose(1, 2).reshape(n, c, h, w)


def test_attention_block_shape():
    torch.manual_seed(0)
    block = AttentionBlock(16, num_heads=2, norm_groups=4)
    x = randn(2, 16, 5, 7, seed=20)
    assert block(x).shape == x.shape


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_attention_block_matches_per_head_reference(heads):
    torch.manual_seed(0)
    block = AttentionBlock(16, num_heads=heads, norm_groups=4)
    randomize_(block, seed=21)
    x = randn(2, 16, 5, 6, seed=22)
    out = block(x)
    expected = attention_block_reference(block, x)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    # Guard: the attention term is not negligible, so the comparison checks it.
    assert (expected - x.double()).abs().max() > 0.1


def test_attention_block_heads_differ():
    """Splitting into heads changes the result (with the same weights), so the head split is really exercised."""
    torch.manual_seed(0)
    one = randomize_(AttentionBlock(16, num_heads=1, norm_groups=4), seed=23)
    four = AttentionBlock(16, num_heads=4, norm_groups=4)
    four.load_state_dict(one.state_dict())
    x = randn(1, 16, 4, 4, seed=24)
    assert not torch.allclose(one(x), four(x), atol=1e-4)


def test_attention_block_zero_init_is_identity():
    torch.manual_seed(0)
    block = AttentionBlock(16, num_heads=2, norm_groups=4, zero_init=True)
    assert torch.count_nonzero(block.proj.weight) == 0
    x = randn(2, 16, 5, 5, seed=25)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)
    # Without zero_init the block is not the identity.
    torch.manual_seed(0)
    plain = AttentionBlock(16, num_heads=2, norm_groups=4)
    assert not torch.allclose(plain(x), x)


def test_attention_block_heads_not_dividing_channels():
    with pytest.raises(ValueError, match=r"16 channels.*num_heads=3"):
        AttentionBlock(16, num_heads=3, norm_groups=4)


def test_attention_block_bad_norm_groups():
    with pytest.raises(ValueError, match=r"12 channels.*norm_groups=8"):
        AttentionBlock(12, norm_groups=8)


# ---------------------------------------------------------------------------------------------------------------------
# Down / upsampling
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_conv", [True, False])
@pytest.mark.parametrize("size", [(8, 8), (7, 9), (1, 5), (16, 3)])
def test_downsample_ceil_half(use_conv, size):
    torch.manual_seed(0)
    h, w = size
    block = DownsampleBlock(8, use_conv=use_conv)
    y = block(randn(2, 8, h, w, seed=30))
    assert y.shape == (2, 8, math.ceil(h / 2), math.ceil(w / 2))


def test_downsample_conv_changes_channels():
    torch.manual_seed(0)
    y = DownsampleBlock(8, 16)(randn(1, 8, 6, 5, seed=31))
    assert y.shape == (1, 16, 3, 3)


def test_downsample_avgpool_values():
    block = DownsampleBlock(4, use_conv=False)
    assert not any(isinstance(m, nn.Conv2d) for m in block.modules())
    x = randn(2, 4, 6, 8, seed=32)
    expected = x.reshape(2, 4, 3, 2, 4, 2).mean(dim=(3, 5))
    torch.testing.assert_close(block(x), expected)
    # Odd size: the last row/column average only the pixels that exist (no zero padding pulls them down).
    x = randn(1, 4, 5, 5, seed=33)
    y = block(x)
    torch.testing.assert_close(y[..., 2, 2], x[..., 4, 4])
    torch.testing.assert_close(y[..., 0, 2], x[..., 0:2, 4].mean(-1))
    torch.testing.assert_close(y[..., 1, 1], x[..., 2:4, 2:4].mean(dim=(-2, -1)))


def test_downsample_avgpool_cannot_change_channels():
    with pytest.raises(ValueError, match="channel"):
        DownsampleBlock(8, 16, use_conv=False)


def test_upsample_doubles():
    torch.manual_seed(0)
    x = randn(2, 8, 3, 5, seed=34)
    assert UpsampleBlock(8)(x).shape == (2, 8, 6, 10)
    assert UpsampleBlock(8, 16)(x).shape == (2, 16, 6, 10)
    plain = UpsampleBlock(8, use_conv=False)
    expected = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(plain(x), expected, rtol=0, atol=0)


def test_upsample_output_size():
    torch.manual_seed(0)
    x = randn(1, 8, 4, 5, seed=35)
    assert UpsampleBlock(8)(x, output_size=(7, 9)).shape == (1, 8, 7, 9)
    y = UpsampleBlock(8, use_conv=False)(x, output_size=(7, 9))
    assert y.shape == (1, 8, 7, 9)
    # Nearest: every output pixel is one of the input pixels of its channel.
    assert set(y[0, 0].flatten().tolist()) <= set(x[0, 0].flatten().tolist())
    # A Down(odd) -> Up(output_size) round trip restores the odd size.
    odd = randn(1, 8, 7, 9, seed=36)
    down = DownsampleBlock(8)(odd)
    assert UpsampleBlock(8)(down, output_size=odd.shape[-2:]).shape == odd.shape


def test_upsample_without_conv_cannot_change_channels():
    with pytest.raises(ValueError, match="channel"):
        UpsampleBlock(8, 16, use_conv=False)


# ---------------------------------------------------------------------------------------------------------------------
# channels_last
# ---------------------------------------------------------------------------------------------------------------------


def _blocks():
    return {
        "resnet": (lambda: ResNetBlock(8, 16, norm_groups=4), ()),
        "resnet_time_default": (lambda: ResNetBlock(8, 8, time_dim=6, norm_groups=4), (randn(2, 6, seed=40),)),
        "resnet_time_scale_shift": (
            lambda: ResNetBlock(8, 16, time_dim=6, norm_groups=4, time_embedding_norm="scale_shift"),
            (randn(2, 6, seed=41),)),
        "attention": (lambda: AttentionBlock(16, num_heads=2, norm_groups=4), ()),
        "down_conv": (lambda: DownsampleBlock(8, 16), ()),
        "down_pool": (lambda: DownsampleBlock(8, use_conv=False), ()),
        "up_conv": (lambda: UpsampleBlock(8, 16), ()),
        "up_plain": (lambda: UpsampleBlock(8, use_conv=False), ()),
    }


@pytest.mark.parametrize("name", list(_blocks()))
def test_channels_last_matches_contiguous(name):
    make, extra = _blocks()[name]
    torch.manual_seed(0)
    block = randomize_(make(), seed=42).eval()
    channels = 16 if name == "attention" else 8
    x = randn(2, channels, 7, 6, seed=43)
    expected = block(x, *extra)
    block_cl = make()
    block_cl.load_state_dict(block.state_dict())
    block_cl = block_cl.eval().to(memory_format=torch.channels_last)
    x_cl = x.to(memory_format=torch.channels_last)
    assert x_cl.is_contiguous(memory_format=torch.channels_last) and not x_cl.is_contiguous()
    out = block_cl(x_cl, *extra)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
