"""Bad input through the command line: a clear error, and nothing already written lost."""

import json

import pandas as pd
import yaml
from helpers import micro_config, run_cli, write_reward_module


def write_config(tmp_path, config):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_config_typo_fails_naming_the_key(tmp_path):
    config = micro_config(feedback={"type": "pairwise", "pairwse": {"mode": "max"}})
    result = run_cli("plan", "--config", write_config(tmp_path, config), "--output", str(tmp_path / "p.parquet"),
                     check=False)
    assert result.returncode == 2
    assert "key feedback.pairwse: unknown (Additional properties are not allowed ('pairwse' was unexpected))" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "p.parquet").exists()


def test_bad_prompt_row_is_named_and_the_existing_plan_survives(tmp_path):
    source = tmp_path / "prompts.jsonl"
    source.write_text("\n".join(json.dumps({"prompt": f"q{i}"}) for i in range(40)) + "\n")
    config = micro_config(prompts={"source": str(source), "per_round": 10})
    cfg_path, plan = write_config(tmp_path, config), tmp_path / "prompts.parquet"
    write_reward_module(tmp_path)  # the config's scorer, checked by every step that reads it
    run_cli("plan", "--config", cfg_path, "--output", str(plan), cwd=tmp_path)
    before = plan.read_bytes()
    source.write_text(source.read_text() + json.dumps({"question": "no prompt field"}) + "\n")
    result = run_cli("plan", "--config", cfg_path, "--output", str(plan), cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert f"{source} record 40: field 'prompt' is missing" in result.stderr
    assert plan.read_bytes() == before


def test_feedback_with_unknown_type_is_refused_by_reference(tmp_path, tiny_checkpoint):
    feedback = tmp_path / "feedback_r1.json"
    feedback.write_text(json.dumps([{"type": "listwise_feedback", "prompt": "1+1", "outputs": ["2"]}]))
    result = run_cli("reference", "--config", write_config(tmp_path, micro_config()), "--round", "1",
                     "--feedback", str(feedback), "--checkpoint", str(tiny_checkpoint),
                     "--output", str(tmp_path / "reflogps_r1.parquet"), check=False)
    assert result.returncode == 2
    assert "feedback_r1.json item 0: unknown type 'listwise_feedback'" in result.stderr


def test_dpo_on_binary_feedback_is_refused(tmp_path, tiny_checkpoint):
    feedback = tmp_path / "feedback_r1.json"
    feedback.write_text(json.dumps([{"type": "binary_feedback", "prompt_id": "x", "prompt": "1+1",
                                     "output": [{"role": "assistant", "content": "2"}], "label": 1}]))
    result = run_cli("reference", "--config", write_config(tmp_path, micro_config()), "--round", "1",
                     "--feedback", str(feedback), "--checkpoint", str(tiny_checkpoint),
                     "--output", str(tmp_path / "r.parquet"), check=False)
    assert result.returncode == 2
    assert "loss 'dpo' trains on ['pairwise'] feedback, found 'binary_feedback'" in result.stderr


def test_python_reward_returning_a_non_number_names_the_function(tmp_path):
    (tmp_path / "bad_rewards.py").write_text("def words(prompt, output):\n    return 'great'\n")
    samples = tmp_path / "samples_r1.parquet"
    pd.DataFrame({"prompt_id": ["a"], "sample_id": [0], "prompt": [[{"role": "user", "content": "1+1"}]],
                  "output": ["2"]}).to_parquet(samples)
    config = micro_config(scoring={"scorer": "python", "python": {"function": "bad_rewards:words"}})
    result = run_cli("score", "--config", write_config(tmp_path, config), "--round", "1", "--samples", str(samples),
                     "--output", str(tmp_path / "rewards_r1.parquet"), cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "'bad_rewards:words' returned 'great' (str)" in result.stderr
    assert not (tmp_path / "rewards_r1.parquet").exists()
