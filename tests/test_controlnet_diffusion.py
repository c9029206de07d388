"""ControlNetDiffusion: equal to the base model at initialisation, only the adapter trains, checkpoints, sampling."""
import pytest
import torch
from safetensors import safe_open

from layoutgen.models.components.base_model import BaseModel
from layoutgen.models.components.fusion import FUSION_MODES
from layoutgen.models.controlnet_diffusion import ControlNetDiffusion
from layoutgen.models.diffusion import DiffusionModel
from layoutgen.utils.checkpoint import CheckpointError

UNET = dict(in_channels=4, base_channels=16, depth=2, num_res_blocks=1, time_dim=32, norm_groups=4, num_heads=2,
            num_classes=3)
CONTROL = dict(control_channels=1, downsampling_factor=4, hint_channels=[8, 16])


def make_base() -> DiffusionModel:
    torch.manual_seed(0)
    base = DiffusionModel(unet=UNET, scheduler={"type": "CosineScheduler", "num_steps": 50}, latent_size=[8, 8],
                          latent_scale=0.7, sample_steps=3)
    torch.nn.init.normal_(base.unet.conv_out.weight, std=0.1)  # a non-zero base prediction
    return base


def inputs(n: int = 2):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 50, (n,), generator=g),
            torch.rand(n, 1, 32, 32, generator=g).round(), torch.randint(0, 3, (n,), generator=g))


@pytest.mark.parametrize("fusion", sorted(FUSION_MODES))
def test_output_equals_the_base_model_at_initialisation(fusion):
    base = make_base()
    model = ControlNetDiffusion.from_base(base, fusion=fusion, fusion_heads=2, **CONTROL)
    x, t, control, labels = inputs()
    with torch.no_grad():
        expected = base(x, t, labels=labels)
        got = model(x, t, control, labels=labels)
    assert expected.abs().sum() > 0
    assert torch.equal(got, expected)
    assert float(model.latent_scale) == pytest.approx(0.7)


def test_only_the_adapter_trains():
    base = make_base()
    model = ControlNetDiffusion.from_base(base, fusion="film", **CONTROL)
    assert all(not p.requires_grad for p in model.unet.parameters())
    adapter = {id(p) for p in model.controlnet.parameters()}
    assert {id(p) for p in model.trainable_parameters()} == adapter
    x, t, control, labels = inputs(4)
    unet_before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in model.controlnet.state_dict().items()}
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        loss, _ = model.training_loss({"latent": x, "control": control, "label": labels})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in unet_before.items())
    assert any(not torch.equal(v, model.controlnet.state_dict()[k]) for k, v in adapter_before.items())
    with torch.no_grad():
        assert not torch.equal(model(x[:2], t[:2], control[:2], labels=labels[:2]), base(x[:2], t[:2], labels=labels[:2]))
    model.train()
    assert not model.unet.training and model.controlnet.training


def test_control_is_required():
    model = ControlNetDiffusion.from_base(make_base(), **CONTROL)
    x, t, _, _ = inputs()
    with pytest.raises(ValueError, match="'control'"):
        model.training_loss({"latent": x})
    with pytest.raises(ValueError, match="control images"):
        model.sample(2)
    with pytest.raises(ValueError, match="control"):
        model(x, t, torch.rand(2, 1, 16, 16))


def test_sampling_with_control_and_guidance():
    model = ControlNetDiffusion.from_base(make_base(), fusion="concat", **CONTROL)
    _, _, control, labels = inputs(3)
    for sampler in ("ddim", "ddpm"):
        z = model.sample(3, control=control, labels=labels, guidance_scale=2.0, sampler=sampler,
                         generator=torch.Generator().manual_seed(0))
        assert z.shape == (3, 4, 8, 8) and torch.isfinite(z).all()
    # At initialisation, controlled sampling equals the base model's sampling with the same noise.
    base = make_base()
    torch.testing.assert_close(
        model.sample(3, control=control, labels=labels, generator=torch.Generator().manual_seed(1)),
        base.sample(3, labels=labels, generator=torch.Generator().manual_seed(1)), rtol=0, atol=0)


def test_checkpoint_holds_the_adapter_and_reloads_the_base(tmp_path):
    base = make_base()
    base_path = tmp_path / "base.safetensors"
    base.save_checkpoint(base_path)
    model = ControlNetDiffusion.from_base(base, base_checkpoint=str(base_path), fusion="cross_attention",
                                          fusion_heads=2, **CONTROL)
    with torch.no_grad():
        for p in model.controlnet.parameters():
            p.add_(0.01)  # the saved adapter must differ from a fresh copy
    path = tmp_path / "controlnet.safetensors"
    model.save_checkpoint(path)
    with safe_open(str(path), "pt") as fh:
        keys = list(fh.keys())
    assert any(k.startswith("controlnet.") for k in keys)
    assert not any(k.startswith("unet.") for k in keys)
    loaded = BaseModel.from_checkpoint(path)
    assert isinstance(loaded, ControlNetDiffusion)
    x, t, control, labels = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, control, labels=labels), model(x, t, control, labels=labels))


def test_save_needs_the_base_checkpoint_path(tmp_path):
    model = ControlNetDiffusion.from_base(make_base(), **CONTROL)
    with pytest.raises(ValueError, match="base_checkpoint"):
        model.save_checkpoint(tmp_path / "c.safetensors")


def test_base_checkpoint_must_hold_a_diffusion_model(tmp_path):
    from layoutgen.models.components.unet import UNet
    path = tmp_path / "unet.safetensors"
    UNet(UNET).save_checkpoint(path)
    config = dict(make_base().config, base_checkpoint=str(path), controlnet=CONTROL)
    with pytest.raises(CheckpointError, match="DiffusionModel"):
        ControlNetDiffusion(config)


def test_config_rejects_an_adapter_unet():
    config = dict(make_base().config, controlnet=dict(CONTROL, unet=UNET))
    with pytest.raises(ValueError, match="controlnet.unet"):
        ControlNetDiffusion(config)


def test_the_seed_workload_configs_build():
    import yaml
    diffusion = yaml.safe_load(open("experiments/diffusion_layout512.yaml"))["diffusion"]
    controlnet = yaml.safe_load(open("experiments/controlnet_outline.yaml"))["controlnet_diffusion"]
    autoencoder = yaml.safe_load(open("experiments/autoencoder_layout512.yaml"))["autoencoder"]
    # The latents are the autoencoder's: 512 / 2**4 = 32 and 16 channels.
    assert diffusion["unet"]["in_channels"] == autoencoder["encoder"]["latent_channels"] == 16
    assert diffusion["latent_size"] == [512 // 2 ** autoencoder["encoder"]["downsampling_steps"]] * 2
    assert controlnet["controlnet"]["downsampling_factor"] * controlnet["latent_size"][0] == 512
    # The ControlNet's frozen base is the diffusion workload's UNet.
    assert controlnet["unet"] == diffusion["unet"]
    base = DiffusionModel.from_config(dict(diffusion, autoencoder_checkpoint=None))
    assert base.cfg.unet.base_channels == 64 and base.cfg.unet.depth == 4 and base.scheduler.num_steps == 500
    model = ControlNetDiffusion.from_base(base, **controlnet["controlnet"])
    assert model.controlnet.cfg.control_channels == 1
