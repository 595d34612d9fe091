"""The config schema: defaults, errors that name the key, the hash."""

import pytest
import yaml

from iteralign import config as cfg
from iteralign.config import ConfigError


def test_empty_config_gets_every_default():
    config = cfg.validate({})
    assert config["training"]["loss"] == "dpo"
    assert config["training"]["kto"]["desirable_weight"] == 1.0
    assert config["feedback"]["pairwise"]["mode"] == "max"
    assert config["sampling"]["num_samples"] == 4


def test_repo_demo_config_is_valid():
    from conftest import REPO

    config = cfg.load(REPO / "config.yaml")
    assert config["experiment"] == "demo" and config["training"]["gpus"] == 0


def test_typo_key_is_named_with_known_keys():
    with pytest.raises(ConfigError) as err:
        cfg.validate({"training": {"lrr": 1e-5}})
    message = str(err.value)
    assert "key training" in message and "'lrr' was unexpected" in message
    assert "lr" in message.split("known keys here:")[1]


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"key sampling.num_samples: found \"four\""):
        cfg.validate({"sampling": {"num_samples": "four"}})


def test_loss_and_feedback_type_must_agree():
    with pytest.raises(ConfigError, match=r"training.loss='dpo' needs feedback.type in \['pairwise'\]"):
        cfg.validate({"feedback": {"type": "binary"}})
    cfg.validate({"feedback": {"type": "binary"}, "training": {"loss": "kto"}})


def test_load_names_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"rounds": 0}))
    with pytest.raises(ConfigError, match=r"exp.yaml: key rounds: found 0"):
        cfg.load(path)
    with pytest.raises(ConfigError, match="does not exist"):
        cfg.load(tmp_path / "missing.yaml")


def test_hash_ignores_resources_but_not_settings():
    base = cfg.validate({})
    moved = cfg.validate({"resources": {"train": {"mem_mb": 64000}}})
    changed = cfg.validate({"training": {"beta": 0.2}})
    assert cfg.config_hash(base) == cfg.config_hash(moved)
    assert cfg.config_hash(base) != cfg.config_hash(changed)
