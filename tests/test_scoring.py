"""What every scorer shares: the rewards table, the length penalty, the failure budget, the config."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from helpers import REPO, micro_config, write_reward_module

from iteralign import config as cfg
from iteralign.config import ConfigError
from iteralign.score import REWARD_COLUMNS, ScoringError, score_samples

PROMPT = [{"role": "user", "content": "12+34"}]
REWARDS = '''
import math

def by_length(prompt, output):
    return float(len(output))

def fails_on_x(prompt, output):
    return math.nan if "x" in output else 1.0
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "shaped_rewards.py").write_text(REWARDS)
    write_reward_module(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def samples_frame(outputs, tokens=None) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": ["p"] * len(outputs), "sample_id": range(len(outputs)),
                         "prompt": [PROMPT] * len(outputs), "output": outputs,
                         "num_output_tokens": tokens or [len(o) + 1 for o in outputs]})


def config_with(**scoring) -> dict:
    return cfg.validate(micro_config(scoring={"python": {"function": "shaped_rewards:by_length"}, **scoring}))


def test_rewards_table_has_the_documented_columns(workdir):
    rewards, _ = score_samples(samples_frame(["a", "bb"]), config_with())
    assert list(rewards.columns) == REWARD_COLUMNS
    assert rewards["length_penalty"].tolist() == [0.0, 0.0]
    assert rewards["reward"].tolist() == rewards["reward_raw"].tolist() == [1.0, 2.0]


def test_length_penalty_in_characters(workdir):
    config = config_with(length_penalty={"coefficient": 0.25, "unit": "characters"})
    rewards, _ = score_samples(samples_frame(["abcd", "ab"]), config)
    assert rewards["reward_raw"].tolist() == [4.0, 2.0]
    assert rewards["length_penalty"].tolist() == [1.0, 0.5]
    assert rewards["reward"].tolist() == [3.0, 1.5]


def test_length_penalty_in_policy_tokens(workdir):
    config = config_with(length_penalty={"coefficient": 0.5, "unit": "tokens"})
    rewards, _ = score_samples(samples_frame(["abcd", "ab"], tokens=[10, 2]), config)
    assert rewards["length_penalty"].tolist() == [5.0, 1.0]
    assert rewards["reward"].tolist() == [-1.0, 1.0]


def test_length_penalty_never_turns_a_failed_score_into_a_number(workdir):
    config = config_with(python={"function": "shaped_rewards:fails_on_x"}, max_failed_fraction=0.5,
                         length_penalty={"coefficient": 0.1})
    rewards, _ = score_samples(samples_frame(["x", "ok"]), config)
    assert math.isnan(rewards["reward"][0]) and math.isnan(rewards["reward_raw"][0])
    assert rewards["error"][0] == "shaped_rewards:fails_on_x returned NaN"
    assert rewards["reward"][1] == pytest.approx(0.8)


def test_token_penalty_needs_the_token_counts(workdir):
    config = config_with(length_penalty={"coefficient": 0.1, "unit": "tokens"})
    with pytest.raises(ValueError, match="unit='tokens' needs the samples' num_output_tokens column"):
        score_samples(samples_frame(["a"]).drop(columns="num_output_tokens"), config)


def test_too_many_failed_scores_fail_the_round_naming_the_reason(workdir):
    config = config_with(python={"function": "shaped_rewards:fails_on_x"}, max_failed_fraction=0.25)
    with pytest.raises(ScoringError, match=r"2 of 4 samples could not be scored, more than "
                                           r"scoring.max_failed_fraction=0.25 allows; reasons: 2 x "
                                           r"shaped_rewards:fails_on_x returned NaN"):
        score_samples(samples_frame(["x1", "ok", "x2", "ok2"]), config)
    score_samples(samples_frame(["x1", "ok", "ok1", "ok2"]), config)  # 1 of 4 is within budget


@pytest.mark.parametrize(("scoring", "message"), [
    ({"scorer": "reward_model"}, "scoring.scorer='reward_model' needs scoring.reward_model.path"),
    ({"scorer": "judge"}, "scoring.scorer='judge' needs scoring.judge.model"),
    ({"gpus": 2}, "scoring.gpus=2 but scorer 'python' runs no model on a GPU"),
    ({"judge": {"template": "no placeholder"}}, "scoring.judge.template must contain {output}"),
    ({"judge": {"score_pattern": r"\d+"}}, "score_pattern must have exactly one group"),
    ({"reward_model": {"objectives": ["a"], "objective_weights": {"b": 1.0}}},
     r"objective_weights names \['b'\], which are not in scoring.reward_model.objectives"),
])
def test_scoring_config_mistakes_are_named(scoring, message):
    with pytest.raises(ConfigError, match=message):
        cfg.validate({"scoring": scoring})


@pytest.mark.parametrize("name", ["reward-model-bt.yaml", "reward-model-armorm.yaml", "judge-openai.yaml",
                                  "reward-server.yaml"])
def test_example_configs_validate(name):
    config = cfg.load(REPO / "configs" / name)
    assert config["scoring"]["scorer"] in ("reward_model", "judge", "reward_server")
