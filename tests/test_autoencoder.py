"""Tests for layoutgen.models.autoencoder: the seed's config and usage, VAE sampling, config errors and round trips,
mixed precision and channels_last."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from layoutgen.models.autoencoder import LATENT_KEYS, Autoencoder

# The "Example Autoencoder Config" of the seed's models-module.md, verbatim.
SEED_YAML = """\
autoencoder:
  encoder:
    in_channels: 3
    latent_channels: 16
    base_channels: 32
    downsampling_steps: 4
    variational: false
  decoder:
    latent_channels: 16
    base_channels: 32
    upsampling_steps: 4
    heads:
      - type: RGBHead
        name: rgb
        out_channels: 3
"""


def small_config(variational: bool = False, steps: int = 2) -> dict:
    common = {"latent_channels": 4, "base_channels": 8, "norm_groups": 4}
    return {
        "encoder": {**common, "in_channels": 3, "downsampling_steps": steps, "variational": variational},
        "decoder": {
            **common,
            "upsampling_steps": steps,
            "heads": [
                {"type": "RGBHead", "name": "rgb", "out_channels": 3},
                {"type": "SegmentationHead", "name": "segmentation", "num_classes": 5},
                {"type": "ClassificationHead", "name": "classification", "num_classes": 3,
                 "hidden_channels": 8, "norm_groups": 4},
            ],
        },
    }


HEAD_NAMES = {"rgb", "segmentation", "classification"}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


def build(config: dict, seed: int = 0) -> Autoencoder:
    torch.manual_seed(seed)
    return Autoencoder.from_config(config)


@pytest.fixture(scope="module")
def seed_model() -> Autoencoder:
    config = yaml.safe_load(SEED_YAML)
    return build(config["autoencoder"]).eval()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ---------------------------------------------------------------------------------------------------------------------
# The seed's config and snippet
# ---------------------------------------------------------------------------------------------------------------------


def test_seed_yaml_builds(seed_model):
    config = yaml.safe_load(SEED_YAML)
    assert isinstance(seed_model, Autoencoder)
    assert not seed_model.variational
    assert seed_model.latent_channels == 16
    assert seed_model.downsampling_factor == 16
    assert list(seed_model.decoder.heads) == ["rgb"]
    # Every key given in the YAML is what the model uses.
    for section in ("encoder", "decoder"):
        for key, value in config["autoencoder"][section].items():
            if key != "heads":
                assert seed_model.config[section][key] == value, (section, key)
    head = seed_model.config["decoder"]["heads"][0]
    assert {k: head[k] for k in ("type", "name", "out_channels")} == config["autoencoder"]["decoder"]["heads"][0]


def test_seed_snippet_runs_as_written(seed_model):
    model = seed_model
    x = randn(2, 3, 32, 48, seed=1)
    # As in the seed's usage block:
    output = model(x)  # Returns dict with all head outputs
    latent = model.encode(x)  # Returns {"latent": z} or {"mu": mu, "logvar": logvar}
    reconstruction = model.decode(latent)

    assert set(output) == {"rgb", "latent"}
    assert output["rgb"].shape == x.shape
    assert output["latent"].shape == (2, 16, 2, 3)
    assert set(latent) == {"latent"}
    torch.testing.assert_close(latent["latent"], output["latent"], rtol=0, atol=0)
    assert set(reconstruction) == {"rgb"}
    torch.testing.assert_close(reconstruction["rgb"], output["rgb"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs of forward / encode / decode
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variational", [False, True])
def test_forward_returns_heads_and_latent(variational):
    model = build(small_config(variational)).eval()
    x = randn(2, 3, 16, 20, seed=2)
    out = model(x)
    latent_keys = {"mu", "logvar", "latent"} if variational else {"latent"}
    assert set(out) == HEAD_NAMES | latent_keys
    assert out["rgb"].shape == (2, 3, 16, 20)
    assert out["segmentation"].shape == (2, 5, 16, 20)
    assert out["classification"].shape == (2, 3)
    for key in latent_keys:
        assert out[key].shape == (2, 4, 4, 5)
    assert all(torch.isfinite(v).all() for v in out.values())
    # forward == decode(encode)
    enc = model.encode(x)
    dec = model.decode(enc)
    for name in HEAD_NAMES:
        torch.testing.assert_close(out[name], dec[name], rtol=0, atol=0)


def test_encode_deterministic():
    model = build(small_config(False)).train()
    x = randn(2, 3, 16, 16, seed=3)
    enc = model.encode(x)
    assert set(enc) == {"latent"}
    assert enc["latent"].shape == (2, 4, 4, 4)
    # No sampling in a deterministic model, even in training mode or with sample=True.
    torch.testing.assert_close(model.encode(x)["latent"], enc["latent"], rtol=0, atol=0)
    torch.testing.assert_close(model.encode(x, sample=True)["latent"], enc["latent"], rtol=0, atol=0)


def test_encode_variational_keys():
    model = build(small_config(True)).eval()
    enc = model.encode(randn(2, 3, 16, 16, seed=4))
    assert set(enc) == {"mu", "logvar", "latent"}
    assert enc["mu"].shape == enc["logvar"].shape == enc["latent"].shape == (2, 4, 4, 4)


@pytest.mark.parametrize("variational", [False, True])
def test_decode_accepts_dict_or_tensor(variational):
    model = build(small_config(variational)).eval()
    enc = model.encode(randn(2, 3, 16, 16, seed=5))
    from_dict = model.decode(enc)
    from_tensor = model.decode(enc["latent"])
    assert set(from_dict) == set(from_tensor) == HEAD_NAMES
    for name in HEAD_NAMES:
        torch.testing.assert_close(from_dict[name], from_tensor[name], rtol=0, atol=0)


def test_decode_dict_prefers_latent_then_mu():
    model = build(small_config(True)).train()
    x = randn(2, 3, 16, 16, seed=6)
    enc = model.encode(x, sample=True, generator=gen(7))
    assert not torch.allclose(enc["latent"], enc["mu"])
    torch.testing.assert_close(model.decode(enc)["rgb"], model.decode(enc["latent"])["rgb"], rtol=0, atol=0)
    only_mu = {"mu": enc["mu"], "logvar": enc["logvar"]}
    torch.testing.assert_close(model.decode(only_mu)["rgb"], model.decode(enc["mu"])["rgb"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="latent"):
        model.decode({"z": enc["latent"]})


# ---------------------------------------------------------------------------------------------------------------------
# VAE sampling
# ---------------------------------------------------------------------------------------------------------------------


def test_vae_eval_latent_is_mu():
    model = build(small_config(True)).eval()
    x = randn(2, 3, 16, 16, seed=8)
    enc = model.encode(x)
    torch.testing.assert_close(enc["latent"], enc["mu"], rtol=0, atol=0)
    out = model(x)
    torch.testing.assert_close(out["latent"], out["mu"], rtol=0, atol=0)


def test_vae_train_latent_is_a_sample():
    model = build(small_config(True)).train()
    x = randn(2, 3, 16, 16, seed=9)
    torch.manual_seed(1)
    a = model.encode(x)
    torch.manual_seed(2)
    b = model.encode(x)
    assert not torch.allclose(a["latent"], a["mu"])
    assert not torch.allclose(a["latent"], b["latent"])
    torch.testing.assert_close(a["mu"], b["mu"], rtol=0, atol=0)
    # sample=False overrides training mode.
    c = model.encode(x, sample=False)
    torch.testing.assert_close(c["latent"], c["mu"], rtol=0, atol=0)


def test_vae_sample_with_generator_is_reproducible_and_reparameterised():
    model = build(small_config(True)).eval()
    x = randn(2, 3, 16, 16, seed=10)
    a = model.encode(x, sample=True, generator=gen(123))
    b = model.encode(x, sample=True, generator=gen(123))
    c = model.encode(x, sample=True, generator=gen(124))
    torch.testing.assert_close(a["latent"], b["latent"], rtol=0, atol=0)
    assert not torch.allclose(a["latent"], c["latent"])
    assert not torch.allclose(a["latent"], a["mu"])
    eps = torch.randn(a["mu"].shape, generator=gen(123))
    expected = a["mu"] + torch.exp(0.5 * a["logvar"]) * eps
    torch.testing.assert_close(a["latent"], expected)
    # forward with the same generator gives the same latent and decodes it.
    out = model(x, sample=True, generator=gen(123))
    torch.testing.assert_close(out["latent"], a["latent"], rtol=0, atol=0)
    torch.testing.assert_close(out["rgb"], model.decode(a["latent"])["rgb"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Config errors and round trips
# ---------------------------------------------------------------------------------------------------------------------


def test_latent_channels_mismatch_names_key():
    config = small_config()
    config["decoder"]["latent_channels"] = 8
    with pytest.raises(ValueError) as info:
        Autoencoder.from_config(config)
    message = str(info.value)
    assert "decoder.latent_channels" in message and "encoder.latent_channels" in message
    assert "8" in message and "4" in message


def test_steps_mismatch_names_key():
    config = small_config()
    config["decoder"]["upsampling_steps"] = 3
    config["decoder"].pop("channel_multipliers", None)
    with pytest.raises(ValueError) as info:
        Autoencoder.from_config(config)
    message = str(info.value)
    assert "decoder.upsampling_steps" in message and "encoder.downsampling_steps" in message


@pytest.mark.parametrize("reserved", LATENT_KEYS)
def test_head_named_like_a_latent_key(reserved):
    assert set(LATENT_KEYS) == {"latent", "mu", "logvar"}
    config = small_config()
    config["decoder"]["heads"][1]["name"] = reserved
    with pytest.raises(ValueError) as info:
        Autoencoder.from_config(config)
    message = str(info.value)
    assert "decoder.heads[1].name" in message and repr(reserved) in message


def test_nested_errors_name_the_section():
    config = small_config()
    config["encoder"]["base_chanels"] = 8
    with pytest.raises(ValueError, match=r"autoencoder\.encoder\.base_chanels: unknown key"):
        Autoencoder.from_config(config)
    config = small_config()
    config["decoder"]["heads"][2]["num_classes"] = "3"
    with pytest.raises(ValueError, match=r"autoencoder\.decoder\.heads\[2\]\.num_classes"):
        Autoencoder.from_config(config)


@pytest.mark.parametrize("config_fn", [lambda: small_config(True), lambda: yaml.safe_load(SEED_YAML)["autoencoder"]],
                         ids=["small_vae", "seed"])
def test_config_round_trips_through_yaml(config_fn):
    model = build(config_fn(), seed=0).eval()
    text = yaml.safe_dump(model.config)
    loaded = yaml.safe_load(text)
    assert loaded == model.config
    rebuilt = build(loaded, seed=1).eval()
    assert rebuilt.config == model.config
    sd, sd2 = model.state_dict(), rebuilt.state_dict()
    assert list(sd) == list(sd2)
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in sd2.items()}
    # Same structure, different init -> loading the weights gives identical outputs.
    x = randn(1, 3, 16, 16, seed=11)
    assert not torch.allclose(rebuilt(x)["rgb"], model(x)["rgb"])
    rebuilt.load_state_dict(sd)
    torch.testing.assert_close(rebuilt(x)["rgb"], model(x)["rgb"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Mixed precision and memory format
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variational", [False, True])
def test_bf16_autocast_forward_and_backward(variational):
    model = build(small_config(variational)).eval()
    x = randn(2, 3, 16, 16, seed=12)
    with torch.no_grad():
        ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert set(out) == set(ref)
    for key, value in out.items():
        assert torch.isfinite(value).all(), key
        assert value.shape == ref[key].shape, key
        assert rel_error(value.float(), ref[key]) < 0.1, key
    # Autocast really ran in low precision (otherwise this test checks nothing).
    assert out["rgb"].dtype == torch.bfloat16

    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, generator=gen(13))
        target = torch.randint(0, 5, (2, 16, 16), generator=gen(14))
        loss = (out["rgb"].float() - x).square().mean() \
            + torch.nn.functional.cross_entropy(out["segmentation"].float(), target) \
            + out["classification"].float().logsumexp(-1).mean()
        if variational:
            loss = loss + (out["mu"].float().square() + out["logvar"].float().exp() - out["logvar"].float()).mean()
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def small_attention_vae() -> dict:
    config = small_config(True)
    for section in ("encoder", "decoder"):
        config[section].update(mid_attention=True, attention_heads=2)
    return config


@pytest.mark.parametrize("which", ["small_attention_vae", "seed_float64"])
def test_channels_last_matches_contiguous(which, seed_model):
    """Same values with channels_last weights and input. The seed model (32..128 channels) runs in float64 so that
    float32 accumulation-order noise of the convolutions (close to 1e-5 there) cannot hide or fake a layout bug."""
    if which == "seed_float64":
        model, dtype, tol = copy.deepcopy(seed_model).double(), torch.float64, 1e-10
    else:
        model, dtype, tol = build(small_attention_vae()).eval(), torch.float32, 1e-5
    x = randn(2, 3, 32, 32, seed=15).to(dtype)
    with torch.no_grad():
        expected = model(x)
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        assert model_cl.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        x_cl = x.to(memory_format=torch.channels_last)
        assert not x_cl.is_contiguous()
        out = model_cl(x_cl)
    assert set(out) == set(expected)
    for key in expected:
        assert out[key].dtype == dtype
        torch.testing.assert_close(out[key], expected[key], rtol=tol, atol=tol, msg=key)


def test_wrong_input_channels_error(seed_model):
    with pytest.raises(ValueError, match=r"\(1, 1, 32, 32\)"):
        seed_model(torch.zeros(1, 1, 32, 32))
