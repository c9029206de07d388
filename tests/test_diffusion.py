"""DiffusionModel: the seed's usage, training loss, latent scale, guidance, frozen autoencoder, checkpoints."""
import math

import pytest
import torch

from layoutgen.models.autoencoder import Autoencoder
from layoutgen.models.components.base_model import BaseModel
from layoutgen.models.diffusion import DiffusionModel, min_snr_weights

UNET = dict(in_channels=4, base_channels=16, depth=2, num_res_blocks=1, time_dim=32, norm_groups=4, num_heads=2)


def make_model(**overrides) -> DiffusionModel:
    config = dict(unet=dict(UNET), scheduler={"type": "CosineScheduler", "num_steps": 50}, latent_size=[8, 8],
                  sample_steps=5)
    unet = overrides.pop("unet", {})
    config["unet"].update(unet)
    config.update(overrides)
    torch.manual_seed(0)
    model = DiffusionModel(config)
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)  # a non-zero prediction makes checks meaningful
    return model


def tiny_autoencoder() -> Autoencoder:
    codec = dict(latent_channels=4, base_channels=8, norm_groups=4, channel_multipliers=[1, 2])
    torch.manual_seed(1)
    return Autoencoder(encoder=dict(downsampling_steps=1, **codec), decoder=dict(upsampling_steps=1, **codec))


def test_seed_usage_as_written():
    config = {"diffusion": {"unet": UNET, "scheduler": {"type": "CosineScheduler", "num_steps": 50},
                            "latent_size": [8, 8], "sample_steps": 4}}
    model = DiffusionModel.from_config(config)
    latent, timestep = torch.randn(2, 4, 8, 8), torch.tensor([3, 40])
    pred_noise = model(latent, timestep)
    assert pred_noise.shape == latent.shape
    model.fit_latent_scale(torch.randn(16, 4, 8, 8))
    generated_latent = model.sample(2, "cpu")
    assert generated_latent.shape == (2, 4, 8, 8)
    # The section alone works too, and both give the same config.
    assert DiffusionModel.from_config(config["diffusion"]).config == model.config


def test_training_loss_fits_latent_scale_from_the_first_batch():
    model = make_model()
    assert math.isnan(float(model.latent_scale))
    latents = torch.randn(8, 4, 8, 8) * 4.0
    loss, logs = model.training_loss({"latent": latents})
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert float(model.latent_scale) == pytest.approx(1.0 / latents.double().std().item(), rel=1e-5)
    assert set(logs) == {"mse", "loss"}
    loss.backward()
    assert model.unet.conv_out.weight.grad is not None
    # Set once, the scale does not move with later batches.
    model.training_loss({"latent": latents * 10})
    assert float(model.latent_scale) == pytest.approx(1.0 / latents.double().std().item(), rel=1e-5)


def test_configured_latent_scale_is_kept_and_used():
    model = make_model(latent_scale=0.5)
    seen = {}
    real_add_noise = model.scheduler.add_noise

    def spy(x0, t, **kwargs):
        seen["x0"] = x0
        return real_add_noise(x0, t, **kwargs)

    model.scheduler.add_noise = spy
    latents = torch.randn(4, 4, 8, 8)
    model.training_loss({"latent": latents})
    assert float(model.latent_scale) == 0.5
    torch.testing.assert_close(seen["x0"], latents * 0.5)


def test_unset_latent_scale_blocks_sampling_with_a_clear_error():
    with pytest.raises(ValueError, match="latent_scale is not set"):
        make_model().sample(1)


def test_loss_matches_a_hand_computation():
    model = make_model(latent_scale=1.0)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    latents = torch.randn(3, 4, 8, 8)
    loss, _ = model.training_loss({"latent": latents}, generator=g1)
    t = torch.randint(0, 50, (3,), generator=g2)
    x_t, noise = model.scheduler.add_noise(latents, t, generator=g2)
    expected = ((model.unet(x_t, t) - noise) ** 2).mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "sample"])
def test_min_snr_weights(prediction_type):
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0])
    w = min_snr_weights(snr, 5.0, prediction_type)
    expected = {
        "epsilon": [1.0, 1.0, 1.0, 0.1],
        "v": [0.0, 0.5 / 1.5, 5.0 / 6.0, 5.0 / 51.0],
        "sample": [0.0, 0.5, 5.0, 5.0],
    }[prediction_type]
    torch.testing.assert_close(w, torch.tensor(expected))


def test_min_snr_weighting_changes_the_loss():
    plain = make_model(latent_scale=1.0)
    weighted = make_model(latent_scale=1.0, min_snr_gamma=1.0)
    weighted.load_state_dict(plain.state_dict())
    batch = {"latent": torch.randn(4, 4, 8, 8)}
    a, _ = plain.training_loss(batch, generator=torch.Generator().manual_seed(2))
    b, logs = weighted.training_loss(batch, generator=torch.Generator().manual_seed(2))
    assert logs["mse"] == pytest.approx(a.item(), rel=1e-6)  # the unweighted MSE is logged
    assert b.item() < a.item()  # every weight is <= 1 and most are < 1


def test_class_dropout_replaces_labels_with_the_null_class_in_training_only():
    model = make_model(latent_scale=1.0, class_dropout=1.0, unet={"num_classes": 3})
    seen = []
    real_forward = model.unet.forward
    model.unet.forward = lambda x, t, cond=None, labels=None: seen.append(labels.clone()) or real_forward(
        x, t, cond=cond, labels=labels)
    batch = {"latent": torch.randn(4, 4, 8, 8), "label": torch.tensor([0, 1, 2, 0])}
    model.train()
    model.training_loss(batch)
    assert torch.equal(seen[-1], torch.full((4,), 3))
    model.eval()
    model.training_loss(batch)
    assert torch.equal(seen[-1], batch["label"])


def test_classifier_free_guidance_formula():
    model = make_model(latent_scale=1.0, unet={"num_classes": 3})
    x, t, labels = torch.randn(2, 4, 8, 8), torch.tensor([7, 7]), torch.tensor([0, 2])
    conditional = model.unet(x, t, labels=labels)
    unconditional = model.unet(x, t)
    guided = model.guided_prediction(x, t, None, labels, 3.0)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.guided_prediction(x, t, None, labels, 1.0), conditional)


def test_sampling_options():
    model = make_model(latent_scale=2.0, unet={"num_classes": 3})
    for sampler in ("ddpm", "ddim"):
        z = model.sample(3, sampler=sampler, num_steps=4, labels=torch.tensor([0, 1, 2]), guidance_scale=2.0,
                         generator=torch.Generator().manual_seed(0))
        assert z.shape == (3, 4, 8, 8) and torch.isfinite(z).all()
    assert model.sample(1, latent_size=(4, 6), num_steps=2).shape == (1, 4, 4, 6)
    with pytest.raises(ValueError, match="guidance_scale"):
        model.sample(2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="sampler"):
        model.sample(2, sampler="euler")
    with pytest.raises(ValueError, match=r"labels must have shape \[2\]"):
        model.sample(2, labels=torch.tensor([0]))


def test_ddim_with_eta_zero_is_deterministic_given_the_start_noise():
    model = make_model(latent_scale=1.0)
    a = model.sample(2, sampler="ddim", eta=0.0, generator=torch.Generator().manual_seed(3))
    b = model.sample(2, sampler="ddim", eta=0.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    c = model.sample(2, sampler="ddpm", generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a, c)


def test_sample_restores_training_mode():
    model = make_model(latent_scale=1.0)
    model.train()
    model.sample(1, num_steps=2)
    assert model.training


def test_conditioning_map_from_the_batch():
    model = make_model(latent_scale=1.0, unet={"cond_channels": 1})
    batch = {"latent": torch.randn(2, 4, 8, 8), "cond": torch.randn(2, 1, 8, 8)}
    loss, _ = model.training_loss(batch)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="cond_channels=1"):
        model.training_loss({"latent": batch["latent"]})
    assert model.sample(2, cond=batch["cond"], num_steps=2).shape == (2, 4, 8, 8)


def test_bad_batches_name_what_is_wrong():
    model = make_model(latent_scale=1.0)
    with pytest.raises(ValueError, match="'latent' or 'rgb'"):
        model.training_loss({"label": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"latents must be \[N, 4, h, w\]"):
        model.training_loss({"latent": torch.randn(2, 3, 8, 8)})
    with pytest.raises(ValueError, match="autoencoder"):
        model.training_loss({"rgb": torch.randn(2, 3, 16, 16)})
    with pytest.raises(ValueError, match="ControlNetDiffusion"):
        model.denoise(torch.randn(1, 4, 8, 8), torch.tensor([1]), None, None, torch.randn(1, 1, 8, 8))


def test_config_errors():
    with pytest.raises(ValueError, match="scheduler"):
        make_model(scheduler={"type": "WarpScheduler"})
    with pytest.raises(ValueError, match="latent_size"):
        make_model(latent_size=[8])
    with pytest.raises(ValueError, match="sampler"):
        make_model(sampler="euler")


# ------------------------------------------------------------------------------------------- frozen autoencoder
@pytest.fixture()
def autoencoder_file(tmp_path):
    path = tmp_path / "ae.safetensors"
    tiny_autoencoder().save_checkpoint(path)
    return path


def test_frozen_autoencoder_from_checkpoint(autoencoder_file, tmp_path):
    model = make_model(autoencoder_checkpoint=str(autoencoder_file), latent_scale=1.0)
    assert model.autoencoder is not None
    assert all(not p.requires_grad for p in model.autoencoder.parameters())
    trainable = {id(p) for p in model.trainable_parameters()}
    assert not any(id(p) in trainable for p in model.autoencoder.parameters())
    model.train()
    assert model.training and not model.autoencoder.training
    # On-the-fly encoding of images through the frozen encoder.
    rgb = torch.rand(2, 3, 16, 16) * 2 - 1
    loss, _ = model.training_loss({"rgb": rgb})
    loss.backward()
    assert all(p.grad is None for p in model.autoencoder.parameters())
    torch.testing.assert_close(model.encode_images(rgb), tiny_autoencoder().eval().encode(rgb)["latent"])
    # Decoding, and the image is clamped to [-1, 1].
    image = model.decode_to_image(torch.randn(2, 4, 8, 8) * 5)
    assert image.shape == (2, 3, 16, 16) and image.abs().max() <= 1.0

    # The checkpoint holds no autoencoder weights and reloads it from its path.
    path = tmp_path / "diffusion.safetensors"
    model.save_checkpoint(path)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as fh:
        keys = list(fh.keys())
    assert keys and not any(k.startswith("autoencoder.") for k in keys)
    assert "latent_scale" in keys
    loaded = BaseModel.from_checkpoint(path)
    assert isinstance(loaded, DiffusionModel) and loaded.autoencoder is not None
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_missing_autoencoder_checkpoint_is_named(tmp_path):
    with pytest.raises(ValueError, match="missing.safetensors"):
        make_model(autoencoder_checkpoint=str(tmp_path / "missing.safetensors"))


def test_from_checkpoint_can_relocate_the_autoencoder(autoencoder_file, tmp_path):
    model = make_model(autoencoder_checkpoint=str(autoencoder_file), latent_scale=1.0)
    model.save_checkpoint(tmp_path / "d.safetensors")
    moved = tmp_path / "moved.safetensors"
    autoencoder_file.rename(moved)
    loaded = DiffusionModel.from_checkpoint(tmp_path / "d.safetensors",
                                            config_overrides={"autoencoder_checkpoint": str(moved)})
    assert loaded.cfg.autoencoder_checkpoint == str(moved)


def test_latent_channels_must_match_the_autoencoder(autoencoder_file):
    with pytest.raises(ValueError, match="in_channels"):
        make_model(unet={"in_channels": 8}, autoencoder_checkpoint=str(autoencoder_file))


# ------------------------------------------------------------------------------------------------------ overfit
@pytest.mark.slow
def test_learns_to_generate_a_fixed_latent_pattern():
    torch.manual_seed(0)
    p = torch.tensor([[1., -1, 1, -1], [-1, 1, -1, 1], [1, 1, -1, -1], [-1, -1, 1, 1]])
    pattern = torch.stack([p, p.T])
    model = DiffusionModel(
        unet=dict(in_channels=2, base_channels=16, depth=2, num_res_blocks=1, time_dim=32, norm_groups=4,
                  attention_levels=[], mid_attention=False),
        scheduler={"type": "CosineScheduler", "num_steps": 100, "clip_sample": True, "clip_sample_range": 1.5},
        latent_size=[4, 4], latent_scale=1.0)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(400):
        loss, _ = model.training_loss({"latent": pattern.expand(32, -1, -1, -1)}, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
    for sampler, steps in (("ddim", 20), ("ddpm", None)):
        z = model.sample(8, sampler=sampler, num_steps=steps, generator=torch.Generator().manual_seed(0))
        error = float(((z - pattern) ** 2).mean())
        assert error < 0.1, (sampler, error)  # the pattern has unit variance: pure noise would give ~2
