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
    from helpers import REPO

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


def test_scientific_numbers_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 (PyYAML, and Snakemake's loader) reads `5e-7` as the string "5e-7"
    path = tmp_path / "exp.yaml"
    path.write_text("experiment: 1e5\ntraining:\n  loss: kto\n  lr: 5e-7\n  adam_betas: [9e-1, 0.95]\n"
                    "feedback:\n  type: binary\n  binary: {threshold: 2E-1}\n")
    raw = yaml.safe_load(path.read_text())
    assert raw["training"]["lr"] == "5e-7"
    config = cfg.load(path)
    assert config["training"]["lr"] == 5e-7 and config["training"]["adam_betas"] == [0.9, 0.95]
    assert config["experiment"] == "1e5"  # a string field stays a string
    with pytest.raises(ConfigError, match=r"key training.lr: found \"fast\""):
        cfg.validate({"training": {"lr": "fast"}})


def test_whole_numbers_given_as_text_are_integers_where_the_schema_wants_one():
    # `snakemake --config checkpoints='{keep_last: 1}'` hands the nested value over as "1"
    config = cfg.validate({"checkpoints": {"keep_last": "1"}, "sampling": {"lag": " 2 "}})
    assert config["checkpoints"]["keep_last"] == 1 and config["sampling"]["lag"] == 2
    assert isinstance(config["sampling"]["lag"], int)
    with pytest.raises(ConfigError, match=r"key sampling.lag: found \"1.5\""):
        cfg.validate({"sampling": {"lag": "1.5"}})
