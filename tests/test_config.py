"""Tests for layoutgen.config: typed configs that name the key, the value and what is allowed in every error."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import pytest
import yaml

from layoutgen.config import Config, load_yaml, option
from layoutgen.models.autoencoder import AutoencoderConfig
from layoutgen.models.encoder import EncoderConfig


@dataclasses.dataclass
class InnerConfig(Config):
    section = "inner"

    size: int = option(2, min=1, max=8)
    kind: str = option("a", choices=["a", "b"])


@dataclasses.dataclass
class DemoConfig(Config):
    section = "demo"

    steps: int = option(min=1, doc="required")
    rate: float = option(0.5, min=0.0, max=1.0)
    enabled: bool = option(False)
    mode: str = option("fast", choices=("fast", "slow"))
    seed: Optional[int] = option(None)  # noqa: UP045 - the typing.Optional spelling is what is under test
    sizes: list[int] = option([1, 2], min=1)
    widths: list[int] | None = option(None, min=1)
    inner: InnerConfig = option(InnerConfig)


@dataclasses.dataclass
class OuterConfig(Config):
    section = "outer"

    demo: DemoConfig = option()  # a required nested section


DEMO_KEYS = ["enabled", "inner", "mode", "rate", "seed", "sizes", "steps", "widths"]

TINY_AE = {
    "encoder": {"base_channels": 8, "downsampling_steps": 2, "latent_channels": 4, "norm_groups": 4},
    "decoder": {"base_channels": 8, "upsampling_steps": 2, "latent_channels": 4, "norm_groups": 4},
}


def demo(**values) -> DemoConfig:
    return DemoConfig.from_dict({"steps": 3, **values})


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------------------------- valid configs
def test_defaults_are_filled_in():
    cfg = demo()
    assert cfg == DemoConfig(steps=3)
    assert (cfg.rate, cfg.enabled, cfg.mode, cfg.seed) == (0.5, False, "fast", None)
    assert (cfg.sizes, cfg.widths) == ([1, 2], None)
    assert cfg.inner == InnerConfig(size=2, kind="a")


def test_valid_values_are_kept():
    cfg = demo(rate=0.25, enabled=True, mode="slow", seed=7, sizes=[3, 4, 5], widths=[8],
               inner={"size": 8, "kind": "b"})
    assert cfg.rate == 0.25 and cfg.enabled is True and cfg.mode == "slow" and cfg.seed == 7
    assert cfg.sizes == [3, 4, 5] and cfg.widths == [8]
    assert cfg.inner == InnerConfig(size=8, kind="b")


def test_mutable_defaults_are_not_shared():
    a, b = demo(), demo()
    a.sizes.append(9)
    assert b.sizes == [1, 2]
    assert DemoConfig(steps=1).sizes == [1, 2]


def test_from_dict_accepts_a_config_or_none_for_a_nested_section():
    assert demo(inner=InnerConfig(size=5)).inner == InnerConfig(size=5)
    assert demo(inner=None).inner == InnerConfig()


# ------------------------------------------------------------------------------------------------ unknown keys
def test_unknown_key_names_the_key_and_lists_valid_keys():
    msg = error_of(demo, stepz=4)
    assert msg.startswith("demo.stepz:")
    assert "unknown key" in msg
    for key in DEMO_KEYS:
        assert repr(key) in msg


def test_unknown_nested_key_carries_the_full_path():
    msg = error_of(demo, inner={"sise": 3})
    assert msg.startswith("demo.inner.sise:")
    assert "'size'" in msg and "'kind'" in msg


def test_unknown_key_in_real_autoencoder_config():
    data = {"encoder": {**TINY_AE["encoder"], "lattent_channels": 4}, "decoder": TINY_AE["decoder"]}
    msg = error_of(AutoencoderConfig.from_dict, data)
    assert "autoencoder.encoder.lattent_channels" in msg
    assert "unknown key" in msg
    # the valid keys are listed, the intended one among them
    for key in ("latent_channels", "base_channels", "downsampling_steps", "variational", "in_channels"):
        assert repr(key) in msg


def test_unknown_top_level_key_in_real_autoencoder_config():
    msg = error_of(AutoencoderConfig.from_dict, {**TINY_AE, "encodr": {}})
    assert msg.startswith("autoencoder.encodr:")
    assert "'decoder'" in msg and "'encoder'" in msg


def test_unknown_key_in_encoder_config_uses_its_section():
    msg = error_of(EncoderConfig.from_dict, {"variationnal": True})
    assert msg.startswith("encoder.variationnal:")
    assert "'variational'" in msg


def test_where_overrides_the_section_in_error_paths():
    msg = error_of(EncoderConfig.from_dict, {"bogus": 1}, where="model.vae.encoder")
    assert msg.startswith("model.vae.encoder.bogus:")


# ---------------------------------------------------------------------------------------------- required keys
def test_missing_required_key():
    msg = error_of(DemoConfig.from_dict, {"rate": 0.1})
    assert msg == "demo.steps: missing required key"


def test_missing_required_key_in_nested_config():
    msg = error_of(OuterConfig.from_dict, {"demo": {"rate": 0.1}})
    assert msg == "outer.demo.steps: missing required key"
    msg = error_of(OuterConfig.from_dict, {})
    assert msg == "outer.demo: missing required key"
    assert OuterConfig.from_dict({"demo": {"steps": 2}}).demo == DemoConfig(steps=2)


def test_not_a_mapping():
    msg = error_of(DemoConfig.from_dict, [("steps", 3)])
    assert "demo" in msg and "mapping" in msg and "list" in msg
    msg = error_of(demo, inner=3)
    assert msg.startswith("demo.inner:") and "mapping" in msg and "3" in msg


# ---------------------------------------------------------------------------------------------------- int keys
@pytest.mark.parametrize("value", [True, False, "3", 3.0, 2.5, None, [3]])
def test_int_rejects_non_integers(value):
    msg = error_of(demo, steps=value)
    assert msg.startswith("demo.steps:")
    assert "integer" in msg
    assert repr(value) in msg
    assert type(value).__name__ in msg


def test_int_min_message_names_value_and_bound():
    msg = error_of(demo, steps=0)
    assert msg.startswith("demo.steps:")
    assert "0" in msg and ">= 1" in msg


def test_int_max_in_nested_config_carries_full_path():
    msg = error_of(demo, inner={"size": 9})
    assert msg.startswith("demo.inner.size:")
    assert "9" in msg and "<= 8" in msg
    # the bounds themselves are allowed
    assert demo(inner={"size": 1}).inner.size == 1
    assert demo(inner={"size": 8}).inner.size == 8


# -------------------------------------------------------------------------------------------------- float keys
def test_float_accepts_int_and_converts():
    cfg = demo(rate=1)
    assert cfg.rate == 1.0 and type(cfg.rate) is float
    assert type(demo(rate=0).rate) is float


@pytest.mark.parametrize("text, expected", [("1e-4", 1e-4), ("0.5", 0.5), ("1E-3", 1e-3), ("0", 0.0)])
def test_float_accepts_numeric_strings(text, expected):
    cfg = demo(rate=text)
    assert type(cfg.rate) is float
    assert cfg.rate == expected


def test_float_string_from_yaml_is_accepted():
    # YAML 1.1 reads 1e-4 (no dot) as a string: this is the case the string support exists for.
    data = yaml.safe_load("steps: 2\nrate: 1e-4\n")
    assert data["rate"] == "1e-4"
    assert DemoConfig.from_dict(data).rate == 1e-4


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "inf", "-inf", "NaN",
                                   pytest.param(10 ** 400, id="huge-int")])
def test_float_rejects_non_finite(value):
    msg = error_of(demo, rate=value)
    assert msg.startswith("demo.rate:")
    assert "finite" in msg


@pytest.mark.parametrize("value", [True, "abc", "", None, [0.5], {"x": 1}])
def test_float_rejects_non_numbers(value):
    msg = error_of(demo, rate=value)
    assert msg.startswith("demo.rate:")
    assert "number" in msg
    assert repr(value) in msg


def test_float_min_max_messages():
    msg = error_of(demo, rate=1.5)
    assert msg.startswith("demo.rate:") and "1.5" in msg and "<= 1.0" in msg
    msg = error_of(demo, rate=-0.1)
    assert msg.startswith("demo.rate:") and "-0.1" in msg and ">= 0.0" in msg
    # a numeric string is checked against the bounds after conversion
    msg = error_of(demo, rate="2e0")
    assert msg.startswith("demo.rate:") and "<= 1.0" in msg


# --------------------------------------------------------------------------------------------------- bool keys
@pytest.mark.parametrize("value", [1, 0, "true", "yes", None, 1.0])
def test_bool_rejects_non_bools(value):
    msg = error_of(demo, enabled=value)
    assert msg.startswith("demo.enabled:")
    assert "true or false" in msg
    assert repr(value) in msg


# ------------------------------------------------------------------------------------------------- choice keys
def test_choices_message_names_value_and_choices():
    msg = error_of(demo, mode="medium")
    assert msg.startswith("demo.mode:")
    assert "'medium'" in msg
    assert "'fast'" in msg and "'slow'" in msg


def test_nested_choices_carry_full_path():
    msg = error_of(demo, inner={"kind": "c"})
    assert msg.startswith("demo.inner.kind:")
    assert "'c'" in msg and "'a'" in msg and "'b'" in msg


def test_str_rejects_non_strings():
    msg = error_of(demo, mode=1)
    assert msg.startswith("demo.mode:") and "string" in msg and "1" in msg


# ---------------------------------------------------------------------------------------------- optional keys
def test_optional_int():
    assert demo(seed=None).seed is None
    assert demo(seed=0).seed == 0
    for bad in ("5", True, 1.5):
        msg = error_of(demo, seed=bad)
        assert msg.startswith("demo.seed:")
        assert repr(bad) in msg


def test_optional_list_of_int():
    assert demo(widths=None).widths is None
    assert demo(widths=(4, 8)).widths == [4, 8]
    msg = error_of(demo, widths=[4, 0])
    assert msg.startswith("demo.widths:") and "0" in msg and ">= 1" in msg
    msg = error_of(demo, widths="4,8")
    assert msg.startswith("demo.widths:") and "'4,8'" in msg


# ------------------------------------------------------------------------------------------------- list keys
def test_list_accepts_tuples_and_returns_lists():
    cfg = demo(sizes=(3, 4))
    assert cfg.sizes == [3, 4] and isinstance(cfg.sizes, list)


def test_list_item_errors_name_the_index():
    msg = error_of(demo, sizes=[1, "2"])
    assert msg.startswith("demo.sizes[1]:")
    assert "'2'" in msg and "integer" in msg
    msg = error_of(demo, sizes=[1, True])
    assert msg.startswith("demo.sizes[1]:")


def test_list_min_applies_to_each_item():
    msg = error_of(demo, sizes=[1, 0])
    assert msg.startswith("demo.sizes:") and "0" in msg and ">= 1" in msg


def test_list_rejects_scalars():
    msg = error_of(demo, sizes=3)
    assert msg.startswith("demo.sizes:") and "list" in msg and "3" in msg


# --------------------------------------------------------------------------------------- real model configs
def test_real_config_cross_field_errors_carry_the_path():
    data = {"encoder": dict(TINY_AE["encoder"]), "decoder": {**TINY_AE["decoder"], "latent_channels": 8}}
    msg = error_of(AutoencoderConfig.from_dict, data)
    assert "autoencoder.decoder.latent_channels" in msg
    assert "8" in msg and "4" in msg
    msg = error_of(AutoencoderConfig.from_dict, {"encoder": {**TINY_AE["encoder"], "norm_groups": 3},
                                                 "decoder": TINY_AE["decoder"]})
    assert msg.startswith("autoencoder.encoder.norm_groups:") and "3" in msg


def test_real_config_type_errors_carry_the_path():
    msg = error_of(AutoencoderConfig.from_dict, {"encoder": {**TINY_AE["encoder"], "latent_channels": "4"}})
    assert msg.startswith("autoencoder.encoder.latent_channels:") and "'4'" in msg
    msg = error_of(AutoencoderConfig.from_dict, {"encoder": {**TINY_AE["encoder"], "variational": "yes"}})
    assert msg.startswith("autoencoder.encoder.variational:")
    msg = error_of(AutoencoderConfig.from_dict, {"encoder": {**TINY_AE["encoder"], "downsampling_steps": 9}})
    assert msg.startswith("autoencoder.encoder.downsampling_steps:") and "9" in msg and "<= 8" in msg


# ------------------------------------------------------------------------------------------------- round trips
def yaml_round_trip(cfg: Config) -> Config:
    text = yaml.safe_dump(cfg.to_dict())
    return type(cfg).from_dict(yaml.safe_load(text))


def assert_plain(value) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str)
            assert_plain(v)
    elif isinstance(value, list):
        for v in value:
            assert_plain(v)
    else:
        assert value is None or type(value) in (str, int, float, bool), type(value)


@pytest.mark.parametrize("cfg", [
    DemoConfig(steps=3),
    DemoConfig.from_dict({"steps": 5, "rate": "1e-4", "enabled": True, "mode": "slow", "seed": 0, "sizes": [7],
                          "widths": [2, 3], "inner": {"size": 4, "kind": "b"}}),
    AutoencoderConfig.from_dict(TINY_AE),
    AutoencoderConfig.from_dict({
        "encoder": {**TINY_AE["encoder"], "variational": True, "channel_multipliers": [1, 2, 2], "dropout": 0.1},
        "decoder": {**TINY_AE["decoder"], "channel_multipliers": [1, 2, 2], "mid_attention": True},
    }),
    EncoderConfig(),
], ids=["demo-defaults", "demo-custom", "ae-tiny", "ae-variational", "encoder-defaults"])
def test_to_dict_yaml_round_trip(cfg):
    data = cfg.to_dict()
    assert_plain(data)
    again = yaml_round_trip(cfg)
    assert again == cfg
    assert again.to_dict() == data
    # to_yaml is the same document
    assert type(cfg).from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_to_dict_is_a_copy():
    cfg = demo(sizes=[1, 2])
    data = cfg.to_dict()
    data["sizes"].append(3)
    data["inner"]["size"] = 7
    assert cfg.sizes == [1, 2]
    assert cfg.inner.size == 2


def test_to_dict_lists_every_field_including_defaults():
    data = AutoencoderConfig.from_dict(TINY_AE).to_dict()
    assert set(data) == {"encoder", "decoder"}
    assert set(data["encoder"]) == {f.name for f in dataclasses.fields(EncoderConfig)}
    assert data["encoder"]["dropout"] == 0.0 and data["encoder"]["variational"] is False


# --------------------------------------------------------------------------------------------------- replace
def test_replace_returns_validated_copy():
    cfg = demo(rate=0.1)
    new = cfg.replace(rate=0.2, mode="slow")
    assert (new.rate, new.mode, new.steps) == (0.2, "slow", 3)
    assert (cfg.rate, cfg.mode) == (0.1, "fast")
    assert new is not cfg
    # values are coerced like from_dict
    assert cfg.replace(rate="1e-2").rate == 0.01


def test_replace_nested_section():
    cfg = AutoencoderConfig.from_dict(TINY_AE)
    enc = cfg.encoder.replace(variational=True)
    assert enc.variational is True and cfg.encoder.variational is False
    new = cfg.replace(encoder=enc)
    assert new.encoder.variational is True


def test_replace_rejects_bad_values_and_unknown_keys():
    cfg = demo()
    msg = error_of(cfg.replace, steps=0)
    assert msg.startswith("demo.steps:") and ">= 1" in msg
    msg = error_of(cfg.replace, stepz=2)
    assert msg.startswith("demo.stepz:") and "unknown key" in msg
    msg = error_of(AutoencoderConfig.from_dict(TINY_AE).replace, encoder={**TINY_AE["encoder"], "latent_channels": 8})
    assert "autoencoder.decoder.latent_channels" in msg


# ------------------------------------------------------------------------------------------------- load_yaml
def test_load_yaml_reads_a_mapping(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("steps: 4\nrate: 1e-4\ninner:\n  size: 3\n")
    data = load_yaml(str(path))
    assert data == {"steps": 4, "rate": "1e-4", "inner": {"size": 3}}
    cfg = DemoConfig.from_dict(data)
    assert cfg.steps == 4 and cfg.rate == 1e-4 and cfg.inner.size == 3


def test_load_yaml_empty_file_is_an_empty_mapping(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_yaml(str(path)) == {}


def test_load_yaml_missing_file_names_it(tmp_path):
    path = tmp_path / "nowhere" / "missing.yaml"
    with pytest.raises(FileNotFoundError) as info:
        load_yaml(str(path))
    assert str(path) in str(info.value)


def test_load_yaml_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("steps: [1, 2\nrate: 0.1\n")
    with pytest.raises(ValueError) as info:
        load_yaml(str(path))
    assert str(path) in str(info.value)
    assert "YAML" in str(info.value)


@pytest.mark.parametrize("text, kind", [("- 1\n- 2\n", "list"), ("42\n", "int"), ("just text\n", "str")])
def test_load_yaml_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = tmp_path / "top.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_yaml(str(path))
    msg = str(info.value)
    assert str(path) in msg
    assert re.search(r"\bmapping\b", msg) and kind in msg


def test_load_yaml_refuses_python_tags(tmp_path):
    # safe_load: a YAML file cannot construct Python objects
    path = tmp_path / "evil.yaml"
    path.write_text("steps: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ValueError) as info:
        load_yaml(str(path))
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------- every project config round trips
def _project_config_classes() -> list[type[Config]]:
    """Every Config subclass in the layoutgen package (its modules imported, the command line's entry point and the
    compiled extension aside)."""
    import importlib
    import pkgutil

    import layoutgen
    for module in pkgutil.walk_packages(layoutgen.__path__, "layoutgen."):
        if not module.name.endswith(("__main__", "._C")):
            importlib.import_module(module.name)

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)
    return sorted({c for c in subclasses(Config) if c.__module__.startswith("layoutgen.")},
                  key=lambda c: (c.__module__, c.__name__))


# Required keys the defaults cannot supply (a manifest path, the base model of a ControlNet).
REQUIRED = {"ManifestDataConfig": {"manifest": "data/manifest.csv"},
            "ManifestExperimentData": {"manifest": "data/manifest.csv"},
            "ControlNetConfig": {"unet": {}},
            "ControlNetExperiment": {"controlnet_diffusion": {"base_checkpoint": "runs/diffusion/best.safetensors"}}}


@pytest.mark.parametrize("cls", _project_config_classes(), ids=lambda c: c.__name__)
def test_every_project_config_equals_its_yaml_round_trip(cls):
    config = cls.from_dict(REQUIRED.get(cls.__name__, {}))
    if cls.__name__ not in REQUIRED:
        assert config == cls()   # the dataclass defaults are what reading an empty section gives
    again = cls.from_dict(yaml.safe_load(config.to_yaml()))
    assert again == config
    assert again.to_dict() == config.to_dict()


def test_the_walk_finds_the_project_configs():
    names = {c.__name__ for c in _project_config_classes()}
    assert {"AutoencoderExperiment", "DecoderConfig", "TrainerConfig", "DiffusionExperiment",
            "ControlNetExperiment", "ManifestDataConfig"} <= names
