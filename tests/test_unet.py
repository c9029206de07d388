"""UNet: shapes for the seed's sizes, conditioning, zero-initialised output, checkpointing, errors."""
import math

import pytest
import torch

from layoutgen.models.components.blocks import AttentionBlock
from layoutgen.models.components.unet import UNet, UNetConfig, timestep_embedding


def small_unet(**overrides) -> UNet:
    cfg = dict(in_channels=4, base_channels=16, depth=3, num_res_blocks=1, time_dim=32, norm_groups=4, num_heads=2)
    cfg.update(overrides)
    torch.manual_seed(0)
    return UNet(cfg)


def perturb_output(unet: UNet) -> UNet:
    # The output conv starts at zero; give it weights so comparisons of outputs mean something.
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    torch.nn.init.normal_(unet.conv_out.bias, std=0.1)
    return unet


@pytest.mark.parametrize("base_channels", [32, 48, 64, 128, 256])
@pytest.mark.parametrize("depth", [3, 4, 5])
def test_seed_sizes_shapes_on_meta(base_channels, depth):
    # The seed's largest UNets have hundreds of millions of parameters: build them on the meta device, where the
    # forward pass computes shapes only.
    with torch.device("meta"):
        unet = UNet(in_channels=16, base_channels=base_channels, depth=depth, time_dim=256, num_classes=4,
                    cond_channels=1)
        x = torch.empty(2, 16, 32, 32)
        out = unet(x, torch.zeros(2, dtype=torch.long), cond=torch.empty(2, 1, 32, 32),
                   labels=torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 16, 32, 32)
    assert len(unet.skip_channels) == 1 + depth * 2 + (depth - 1)
    assert unet.mid_channels == base_channels * [1, 2, 4, 4, 4][depth - 1]


@pytest.mark.parametrize("depth", [3, 4])
def test_forward_real_values_and_zero_init(depth):
    unet = small_unet(depth=depth)
    x = torch.randn(2, 4, 16, 16)
    out = unet(x, torch.tensor([0, 499]))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv
    perturb_output(unet)
    out = unet(x, torch.tensor([0, 499]))
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_timestep_changes_output():
    unet = perturb_output(small_unet())
    x = torch.randn(1, 4, 8, 8)
    assert not torch.allclose(unet(x, torch.tensor([1])), unet(x, torch.tensor([400])))
    # A scalar timestep is broadcast to the batch.
    x2 = torch.randn(3, 4, 8, 8)
    assert torch.allclose(unet(x2, torch.tensor(7)), unet(x2, torch.full((3,), 7)))


def test_bad_timesteps_and_inputs_are_named():
    unet = small_unet()
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"timesteps must be a scalar or \[N\] with N=2"):
        unet(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"timesteps"):
        unet(x, torch.ones(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected x \[N, 4, H, W\], got a NoneType"):
        unet(None, torch.tensor([1, 2]))


def test_empty_batch():
    unet = small_unet(num_classes=2)
    out = unet(torch.randn(0, 4, 8, 8), torch.zeros(0, dtype=torch.long), labels=torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 4, 8, 8)


def test_odd_spatial_size():
    unet = small_unet()
    out = unet(torch.randn(1, 4, 13, 9), torch.tensor([5]))
    assert out.shape == (1, 4, 13, 9)


def test_out_channels():
    unet = small_unet(out_channels=8)
    assert unet(torch.randn(1, 4, 8, 8), torch.tensor([3])).shape == (1, 8, 8, 8)


def test_conditioning_map():
    unet = perturb_output(small_unet(cond_channels=2))
    x = torch.randn(2, 4, 8, 8)
    c1, c2 = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    t = torch.tensor([10, 20])
    assert not torch.allclose(unet(x, t, cond=c1), unet(x, t, cond=c2))
    with pytest.raises(ValueError, match=r"cond_channels=2 needs cond of shape \[2, 2, 8, 8\]"):
        unet(x, t)
    with pytest.raises(ValueError, match="cond_channels=2"):
        unet(x, t, cond=torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match="cond_channels=0"):
        small_unet()(x, t, cond=c1)


def test_class_labels_and_null_class():
    unet = perturb_output(small_unet(num_classes=3))
    assert unet.null_label == 3
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([50, 50])
    a = unet(x, t, labels=torch.tensor([0, 0]))
    b = unet(x, t, labels=torch.tensor([2, 2]))
    assert not torch.allclose(a, b)
    # No labels means the null class.
    assert torch.equal(unet(x, t), unet(x, t, labels=torch.tensor([3, 3])))
    with pytest.raises(ValueError, match=r"labels must be \[N\] integer class indices in \[0, 3\]"):
        unet(x, t, labels=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="integer class indices"):
        unet(x, t, labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="num_classes=0"):
        small_unet()(x, t, labels=torch.tensor([0, 1]))


def test_gradient_checkpointing_matches():
    ref = perturb_output(small_unet(dropout=0.0))
    ckpt = small_unet(gradient_checkpointing=True)
    ckpt.load_state_dict(ref.state_dict())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 300])
    for model in (ref, ckpt):
        model.train()
        model.zero_grad()
        model(x, t).square().mean().backward()
    torch.testing.assert_close(ckpt(x, t), ref(x, t))
    for (name, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_every_parameter_gets_a_gradient_after_output_is_nonzero():
    unet = perturb_output(small_unet(num_classes=2, cond_channels=1))
    # Attention output projections start at zero too (each block starts as the identity).
    for module in unet.modules():
        if isinstance(module, AttentionBlock):
            torch.nn.init.normal_(module.proj.weight, std=0.1)
    out = unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), cond=torch.randn(2, 1, 8, 8),
               labels=torch.tensor([0, 1]))
    out.square().mean().backward()
    # The null-class row of the embedding is not used by these labels; every other parameter must get a gradient.
    missing = [n for n, p in unet.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_channels_last_and_bf16_autocast():
    unet = perturb_output(small_unet())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 6])
    ref = unet(x, t)
    cl = unet.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = unet(x, t)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 3.0, 250.5])
    emb = timestep_embedding(t, 8)
    half = 4
    for i, ti in enumerate(t.tolist()):
        for j in range(half):
            freq = math.exp(-math.log(10000.0) * j / half)
            assert emb[i, j].item() == pytest.approx(math.cos(ti * freq), abs=1e-5)
            assert emb[i, half + j].item() == pytest.approx(math.sin(ti * freq), abs=1e-5)
    assert timestep_embedding(t, 7).shape == (3, 7)


@pytest.mark.parametrize("bad, key", [
    ({"channel_multipliers": [1, 2]}, "channel_multipliers"),
    ({"attention_levels": [5]}, "attention_levels"),
    ({"num_heads": 3}, "num_heads"),
    ({"base_channels": 20}, "norm_groups"),
    ({"time_embedding_norm": "film"}, "time_embedding_norm"),
    ({"depth": 0}, "depth"),
    ({"dropuot": 0.2}, "dropuot"),
])
def test_config_errors_name_the_key(bad, key):
    cfg = dict(in_channels=4, base_channels=16, depth=3, norm_groups=8, num_heads=4)
    cfg.update(bad)
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_dict(cfg)


def test_checkpoint_round_trip(tmp_path):
    unet = perturb_output(small_unet(num_classes=2, time_embedding_norm="scale_shift"))
    unet.save_checkpoint(tmp_path / "unet.safetensors")
    loaded = UNet.from_checkpoint(tmp_path / "unet.safetensors")
    assert loaded.config == unet.config
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([9])
    assert torch.equal(loaded(x, t), unet(x, t))
