"""Experiment YAMLs: every shipped config loads, builds its model and loss, and its loss accepts the model's outputs;
the seed's example and 512x512 workload match the seed; `--set` overrides parse, merge and fail with named keys."""
import copy
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import default_collate

from layoutgen.models.autoencoder import Autoencoder
from layoutgen.models.datasets.synthetic import SyntheticLayoutDataset
from layoutgen.models.losses.base_loss import build_loss
from layoutgen.training.experiment import AutoencoderExperiment, load_experiment, merge, parse_overrides
from layoutgen.training.quickstart import load_quickstart_config

REPO = Path(__file__).resolve().parents[1]
# The autoencoder experiments (the diffusion and ControlNet configs are checked in test_controlnet_diffusion.py).
EXPERIMENTS = sorted((REPO / "experiments").glob("autoencoder_*.yaml"))
SEED_DOC_CANDIDATES = [root / "shared" / "seed" / "models-module.md" for root in (REPO, REPO.parent)]
CHECK_SIZE = 64  # small enough for a CPU forward pass of the 512x512 configs' models


def _all_configs() -> list:
    return [pytest.param(str(p), id=p.name) for p in EXPERIMENTS] + [pytest.param("quickstart", id="quickstart.yaml")]


def _load(path: str) -> AutoencoderExperiment:
    """An autoencoder experiment YAML, or the quickstart's autoencoder stage (as it trains on its manifest)."""
    if path == "quickstart":
        return load_quickstart_config().autoencoder_experiment("data/manifest.csv")
    return load_experiment(path)


def test_the_experiments_folder_holds_the_documented_configs():
    names = {p.name for p in EXPERIMENTS}
    assert {"autoencoder_seed_example.yaml", "autoencoder_layout512.yaml", "autoencoder_vae.yaml"} <= names


@pytest.mark.parametrize("path", _all_configs())
def test_config_loads_and_builds(path):
    exp = _load(path)
    assert isinstance(exp, AutoencoderExperiment)
    model = Autoencoder.from_config(exp.autoencoder)
    assert model.num_parameters() > 0
    loss_fn = build_loss(exp.loss)
    assert len(list(loss_fn.children())) >= 1
    # The config round-trips: what run_experiment writes as config.yaml re-loads to an equal experiment.
    assert AutoencoderExperiment.from_dict(yaml.safe_load(exp.to_yaml())) == exp


@pytest.mark.parametrize("path", _all_configs())
def test_loss_accepts_the_models_outputs_at_64(path):
    exp = _load(path)
    torch.manual_seed(0)
    model = Autoencoder.from_config(exp.autoencoder)
    loss_fn = build_loss(exp.loss)
    data = SyntheticLayoutDataset(1, size=CHECK_SIZE, seed=0, empty_prob=0.0)
    batch = default_collate([data[0]])
    with torch.no_grad():
        outputs = model(batch["rgb"])
    factor = 2 ** exp.autoencoder.encoder.downsampling_steps
    latent = outputs["latent"]
    assert latent.shape == (1, exp.autoencoder.encoder.latent_channels, CHECK_SIZE // factor, CHECK_SIZE // factor)
    for head in exp.autoencoder.decoder.heads:
        assert head["name"] in outputs
        if head["type"] in ("RGBHead", "SegmentationHead"):
            assert outputs[head["name"]].shape[-2:] == (CHECK_SIZE, CHECK_SIZE)
    total, logs = loss_fn(outputs, batch)
    assert total.ndim == 0 and torch.isfinite(total)
    assert len(logs) >= len(exp.loss) + 1   # every part plus "loss"
    assert float(logs["loss"]) == pytest.approx(float(total))
    # every configured loss reads a key the model produces and a target the dataset provides
    for part in exp.loss:
        assert part.get("key", "mu") in outputs
        if "target" in part:
            assert part["target"] in batch


def _seed_yaml_block() -> dict:
    for candidate in SEED_DOC_CANDIDATES:
        if candidate.is_file():
            text = candidate.read_text(encoding="utf-8")
            for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
                data = yaml.safe_load(block)
                if isinstance(data, dict) and "autoencoder" in data:
                    return data
            pytest.fail(f"{candidate}: no ```yaml block with an autoencoder section")
    pytest.skip("the seed's models-module.md is not available here")


def test_seed_example_equals_the_seeds_yaml_block():
    seed = _seed_yaml_block()
    ours = yaml.safe_load((REPO / "experiments" / "autoencoder_seed_example.yaml").read_text(encoding="utf-8"))
    assert ours["autoencoder"] == seed["autoencoder"]
    # and it is a valid experiment with the other sections defaulted
    exp = load_experiment(str(REPO / "experiments" / "autoencoder_seed_example.yaml"))
    assert exp.loss == AutoencoderExperiment().loss


def test_layout512_gives_a_32x32x16_latent_from_512():
    exp = load_experiment(str(REPO / "experiments" / "autoencoder_layout512.yaml"))
    enc, dec = exp.autoencoder.encoder, exp.autoencoder.decoder
    assert exp.data.image_size == 512
    assert exp.data.image_size / 2 ** enc.downsampling_steps == 32
    assert enc.latent_channels == dec.latent_channels == 16
    assert enc.base_channels == dec.base_channels == 32
    assert enc.norm_groups == dec.norm_groups == 8
    assert dec.upsampling_steps == enc.downsampling_steps
    assert [h["name"] for h in dec.heads] == ["rgb", "segmentation", "classification"]
    assert [h["type"] for h in dec.heads] == ["RGBHead", "SegmentationHead", "ClassificationHead"]
    # the built model agrees with the arithmetic
    model = Autoencoder.from_config(exp.autoencoder)
    assert model.downsampling_factor == 512 // 32
    assert model.latent_channels == 16


# --------------------------------------------------------------------------------------------------------- overrides
def test_parse_overrides_builds_nested_dicts_of_yaml_scalars():
    result = parse_overrides(["training.lr=1e-3", "training.epochs=3", "data.image_size=32",
                              "autoencoder.encoder.variational=true", "training.max_steps=null",
                              "training.device=cpu", "autoencoder.encoder.channel_multipliers=[1, 2]"])
    assert result == {
        "training": {"lr": "1e-3", "epochs": 3, "max_steps": None, "device": "cpu"},  # YAML 1.1: "1e-3" is a str
        "data": {"image_size": 32},
        "autoencoder": {"encoder": {"variational": True, "channel_multipliers": [1, 2]}},
    }
    assert parse_overrides([]) == {}
    # the value keeps everything after the first "="
    assert parse_overrides(["training.device=a=b"]) == {"training": {"device": "a=b"}}


def test_a_yaml_string_number_is_validated_as_a_float(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("training: {lr: 1e-3}\n")
    exp = load_experiment(str(path), ["training.weight_decay=1e-4", "data.empty_prob=0"])
    assert isinstance(exp.training.lr, float) and exp.training.lr == pytest.approx(1e-3)
    assert isinstance(exp.training.weight_decay, float) and exp.training.weight_decay == pytest.approx(1e-4)
    assert isinstance(exp.data.empty_prob, float) and exp.data.empty_prob == 0.0


def test_overrides_merge_into_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"training": {"epochs": 7, "batch_size": 5}, "data": {"image_size": 48}}))
    exp = load_experiment(str(path), ["training.epochs=2", "training.max_steps=3", "data.num_samples=10"])
    assert exp.training.epochs == 2 and exp.training.max_steps == 3
    assert exp.training.batch_size == 5            # a sibling of an overridden key is kept
    assert exp.data.image_size == 48 and exp.data.num_samples == 10
    # the last of two overrides of one key wins
    assert load_experiment(str(path), ["training.epochs=2", "training.epochs=4"]).training.epochs == 4


def test_merge_is_deep_and_does_not_modify_its_inputs():
    base = {"a": {"b": 1, "c": {"d": 2, "e": 3}}, "f": [1, 2]}
    overrides = {"a": {"c": {"d": 20}, "g": 4}, "f": [3]}
    before_base, before_overrides = copy.deepcopy(base), copy.deepcopy(overrides)
    merged = merge(base, overrides)
    assert merged == {"a": {"b": 1, "c": {"d": 20, "e": 3}, "g": 4}, "f": [3]}
    assert base == before_base and overrides == before_overrides
    merged["a"]["c"]["e"] = 99
    assert base["a"]["c"]["e"] == 3
    # a dict replaces a scalar and a scalar replaces a dict
    assert merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}
    assert merge({"a": {"b": 2}}, {"a": 1}) == {"a": 1}


def test_a_deeper_override_after_a_scalar_one_does_not_crash():
    assert parse_overrides(["training=1", "training.epochs=2"]) == {"training": {"epochs": 2}}
    assert parse_overrides(["training.epochs=2", "training=1"]) == {"training": 1}


@pytest.mark.parametrize("bad", ["foo", "=3", "training.epochs"])
def test_a_bad_override_raises_naming_it(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        parse_overrides([bad])


def test_an_override_that_is_not_yaml_raises_a_value_error_naming_the_key():
    with pytest.raises(ValueError, match=r"training\.device"):
        parse_overrides(["training.device=[cpu"])


@pytest.mark.parametrize("override, key", [
    ("training.lerning_rate=1", "training.lerning_rate"),
    ("autoencoder.encoder.lattent_channels=4", "autoencoder.encoder.lattent_channels"),
    ("dataa.image_size=32", "dataa"),
    ("training.epochs=two", "training.epochs"),
    ("training.amp=fp8", "training.amp"),
    ("data.image_size=4", "data.image_size"),
])
def test_an_unknown_or_invalid_key_via_override_raises_naming_it(tmp_path, override, key):
    path = tmp_path / "exp.yaml"
    path.write_text("training: {epochs: 1}\n")
    with pytest.raises(ValueError) as info:
        load_experiment(str(path), [override])
    message = str(info.value)
    assert key in message
    assert str(path) in message


def test_a_missing_config_file_names_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_experiment(str(missing))
