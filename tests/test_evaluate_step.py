"""`iteralign evaluate` end to end on a tiny random model: a separate evaluation scorer, and rounds it refuses
to compare. Steps run in process (through the CLI's main) to spare a torch import per call."""

import contextlib
import json
import os
import sys

import pandas as pd
import pytest
import yaml
from helpers import micro_config, write_reward_module

from iteralign.cli import main

JUDGE = "def length(prompt, output):\n    return float(len(output))\n"
JUDGE_SCORER = {"scorer": "python", "python": {"function": "judge_rewards:length"}}


@contextlib.contextmanager
def inside(folder):
    """Run in ``folder`` (the Python scorers import their module from there), then leave no trace."""
    cwd, path = os.getcwd(), list(sys.path)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)
        sys.path[:] = path
        for module in ("judge_rewards", "micro_rewards"):
            sys.modules.pop(module, None)


def write_config(folder, name, **evaluation):
    config = micro_config(evaluation={**micro_config()["evaluation"], **evaluation})
    (folder / name).write_text(yaml.safe_dump(config))
    return str(folder / name)


def evaluate_args(folder, config, round_n, checkpoint) -> list[str]:
    args = ["evaluate", "--config", config, "--round", str(round_n), "--prompts", str(folder / "prompts.parquet"),
            "--checkpoint", str(checkpoint), "--reference-checkpoint", str(checkpoint),
            "--table", str(folder / f"eval_r{round_n}.parquet"), "--summary", str(folder / f"eval_r{round_n}.json")]
    if round_n > 0:
        args += ["--baseline", str(folder / "eval_r0.parquet"), "--previous", str(folder / "eval_r0.parquet")]
    return args


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_checkpoint):
    """Rounds 0 and 1 evaluated with evaluation.scorer set; both rounds' policy is the reference."""
    folder = tmp_path_factory.mktemp("evaluate")
    write_reward_module(folder)
    (folder / "judge_rewards.py").write_text(JUDGE)
    config = write_config(folder, "config.yaml", scorer=JUDGE_SCORER)
    with inside(folder):
        assert main(["plan", "--config", config, "--output", str(folder / "prompts.parquet")]) == 0
        assert main(evaluate_args(folder, config, 0, tiny_checkpoint)) == 0
        assert main(evaluate_args(folder, config, 1, tiny_checkpoint)) == 0
    return folder


def test_the_evaluation_scorer_scores_the_same_generations(evaluated):
    table = pd.read_parquet(evaluated / "eval_r0.parquet")
    assert (table["eval_scorer_reward"] == table["output"].str.len()).all()
    summary = json.loads((evaluated / "eval_r0.json").read_text())
    assert summary["eval_scorer"]["name"] == "python:judge_rewards:length"
    assert summary["eval_scorer"]["mean_reward"] == pytest.approx(table["output"].str.len().mean())


def test_the_same_policy_again_ties_round_zero_and_has_zero_kl(evaluated):
    summary = json.loads((evaluated / "eval_r1.json").read_text())
    assert summary["win_rate_vs_r0"] == summary["win_rate_vs_previous"] == 0.5
    assert summary["eval_scorer"]["win_rate_vs_r0"] == 0.5
    assert summary["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)


def test_a_round_decoded_differently_is_refused_before_generating(evaluated, tiny_checkpoint, capsys):
    other = write_config(evaluated, "shorter.yaml", max_new_tokens=4, scorer=JUDGE_SCORER)
    with inside(evaluated):  # beside its reward modules, which the config check imports
        assert main(evaluate_args(evaluated, other, 2, tiny_checkpoint)) == 2
    assert "eval_r0.parquet: evaluated with max_new_tokens=5, this round with max_new_tokens=4" in capsys.readouterr().err
    assert not (evaluated / "eval_r2.json").exists()

