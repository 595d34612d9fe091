"""Reward-model scoring on small sequence-classification models built locally."""

from __future__ import annotations

import logging
import math
import os
import subprocess

import pandas as pd
import pytest
import torch
import yaml
from helpers import BIN, REPO, free_port, micro_config, run_cli
from reward_models import save_classifier, save_multi_objective

from iteralign import config as cfg
from iteralign.score import score_samples
from iteralign.score.reward_model import (
    RewardModelScorer,
    encode_conversations,
    process_share,
    render_conversation,
)

PROMPTS = [[{"role": "user", "content": f"{10 + i}+{20 + i}"}] for i in range(7)]
OUTPUTS = ["030", "1", "0331234", "55", "0", "12345678901", "03"]


def rm_section(path, **overrides) -> dict:
    section = cfg.validate({"scoring": {"scorer": "reward_model", "reward_model": {"path": str(path)}}})
    return {**section["scoring"]["reward_model"], **overrides}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("reward_models")
    return {
        "bt": save_classifier(root / "bt", tiny_tokenizer, num_labels=1, seed=1),
        "two": save_classifier(root / "two", tiny_tokenizer, num_labels=2, seed=2),
        "multi": save_multi_objective(root / "multi", tiny_tokenizer, num_objectives=3, seed=3),
    }


def one_at_a_time(path, prompts, outputs, read):
    """HALOs' way: one unpadded forward per sample, with the reward model's chat template."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
    values = []
    with torch.no_grad():
        for prompt, output in zip(prompts, outputs, strict=True):
            ids = tokenizer(render_conversation(tokenizer, prompt, output), add_special_tokens=False,
                            return_tensors="pt").input_ids
            values.append(read(model(input_ids=ids)))
    return values


def one_at_a_time_ids(path, sequences):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in sequences]


def test_bradley_terry_reward_is_the_logit_and_batching_changes_nothing(models):
    result = RewardModelScorer(rm_section(models["bt"], batch_size=3)).score(PROMPTS, OUTPUTS)
    expected = one_at_a_time(models["bt"], PROMPTS, OUTPUTS, lambda out: out.logits[0, 0].item())
    assert result.rewards == pytest.approx(expected, abs=1e-5)
    assert result.usage["head"] == "bradley_terry" and result.errors == [None] * len(OUTPUTS)
    assert len(set(result.rewards)) == len(OUTPUTS)  # a real signal, not a constant


def test_two_class_reward_is_the_logit_of_class_one(models):
    result = RewardModelScorer(rm_section(models["two"], batch_size=4)).score(PROMPTS, OUTPUTS)
    expected = one_at_a_time(models["two"], PROMPTS, OUTPUTS, lambda out: out.logits[0, 1].item())
    assert result.rewards == pytest.approx(expected, abs=1e-5)
    assert result.usage["head"] == "two_class"


def test_auto_head_says_what_it_chose(models, caplog):
    with caplog.at_level(logging.INFO, logger="iteralign.score.reward_model"):
        RewardModelScorer(rm_section(models["two"])).score(PROMPTS[:2], OUTPUTS[:2])
    assert "reward model head: auto -> two_class" in caplog.text


def test_a_head_that_does_not_fit_the_model_is_named(models):
    with pytest.raises(ValueError, match=r"head=two_class: expected 2 logit\(s\), the model gives 1"):
        RewardModelScorer(rm_section(models["bt"], head="two_class")).score(PROMPTS[:1], OUTPUTS[:1])


def test_multi_objective_model_gives_score_and_one_column_per_objective(models):
    section = cfg.validate(micro_config(results_dir="unused", scoring={
        "scorer": "reward_model",
        "reward_model": {"path": str(models["multi"]), "trust_remote_code": True,
                         "objectives": ["helpfulness", "correctness", "verbosity"]}}))
    samples = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(7)], "sample_id": 0, "prompt": PROMPTS,
                            "output": OUTPUTS})
    rewards, result = score_samples(samples, section)
    expected = one_at_a_time(models["multi"], PROMPTS, OUTPUTS, lambda out: out.score[0].item())
    objectives = one_at_a_time(models["multi"], PROMPTS, OUTPUTS, lambda out: out.rewards[0].tolist())
    assert rewards["reward"].tolist() == pytest.approx(expected, abs=1e-5)
    assert result.usage["head"] == "multi_objective"
    for k, name in enumerate(["helpfulness", "correctness", "verbosity"]):
        assert rewards[f"reward_{name}"].tolist() == pytest.approx([o[k] for o in objectives], abs=1e-5)


def test_objective_weights_replace_the_model_score(models):
    section = rm_section(models["multi"], trust_remote_code=True, objective_weights={"objective_0": 2.0,
                                                                                      "objective_2": -1.0})
    result = RewardModelScorer(section).score(PROMPTS, OUTPUTS)
    objectives = result.objectives
    expected = [2.0 * a - c for a, c in zip(objectives["objective_0"], objectives["objective_2"], strict=True)]
    assert result.rewards == pytest.approx(expected, abs=1e-6)


def test_objective_names_must_match_the_model(models):
    section = rm_section(models["multi"], trust_remote_code=True, objectives=["only", "two"])
    with pytest.raises(ValueError, match="lists 2 names but the model returns 3 objectives"):
        RewardModelScorer(section).score(PROMPTS[:1], OUTPUTS[:1])


def test_model_code_runs_only_when_the_config_trusts_it(models):
    with pytest.raises(ValueError, match=r"ships its own model code .*; set scoring.reward_model.trust_remote_code: true"):
        RewardModelScorer(rm_section(models["multi"]))


def test_a_missing_reward_model_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"scoring.reward_model.path: .*/nowhere does not exist"):
        RewardModelScorer(rm_section(tmp_path / "nowhere"))


def test_a_causal_lm_is_not_taken_for_a_reward_model(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"lacks weights \['score.weight'\] \(they would be random\)"):
        RewardModelScorer(rm_section(tiny_checkpoint)).score(PROMPTS[:1], OUTPUTS[:1])


def test_the_reward_models_own_chat_template_is_used(tmp_path, tiny_tokenizer):
    from iteralign.demo import ALPHABET
    from iteralign.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer(ALPHABET)  # the policy's template would end the prompt with "="
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}+{% endfor %}{{ eos_token }}"
    path = save_classifier(tmp_path / "rm", tokenizer, num_labels=1, seed=5)
    result = RewardModelScorer(rm_section(path)).score(PROMPTS[:1], ["030"])
    expected = one_at_a_time_ids(path, [tokenizer("<bos>10+20+030+<eos>", add_special_tokens=False).input_ids])
    assert result.rewards == pytest.approx(expected, abs=1e-6)


def test_long_inputs_keep_their_last_tokens(tiny_tokenizer):
    encoded, truncated = encode_conversations(tiny_tokenizer, PROMPTS[:2], ["1234567890", "1"], max_length=10)
    full = tiny_tokenizer(render_conversation(tiny_tokenizer, PROMPTS[0], "1234567890"),
                          add_special_tokens=False).input_ids
    assert truncated == 1 and encoded[0] == full[-10:] and len(encoded[1]) == 9  # <bos>10+20=1<eos>


@pytest.mark.parametrize(("count", "world"), [(13, 2), (7, 3), (1, 2), (0, 2)])
def test_process_shares_are_disjoint_and_cover_every_sample(count, world):
    lengths = [(i * 7) % 11 for i in range(count)]
    shares = [process_share(lengths, rank, world) for rank in range(world)]
    flat = [i for share in shares for i in share]
    assert sorted(flat) == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_non_finite_model_output_is_a_failed_score_not_a_number(models, monkeypatch):
    from iteralign.score import reward_model

    original = reward_model.read_output

    def poisoned(output, head):
        reward, objectives = original(output, head)
        reward[0] = float("inf")
        return reward, objectives

    monkeypatch.setattr(reward_model, "read_output", poisoned)
    result = RewardModelScorer(rm_section(models["bt"], batch_size=8)).score(PROMPTS[:2], OUTPUTS[:2])
    failed = [i for i, r in enumerate(result.rewards) if math.isnan(r)]
    assert len(failed) == 1 and result.errors[failed[0]] == "reward model returned inf"


def test_two_processes_give_the_same_rewards_as_one(tmp_path, models):
    """accelerate launch with 2 CPU processes (gloo), 13 samples: uneven shares, no row lost or doubled."""
    samples = tmp_path / "samples_r1.parquet"
    prompts = [PROMPTS[i % 7] for i in range(13)]
    outputs = [OUTPUTS[i % 7] + str(i) for i in range(13)]
    pd.DataFrame({"prompt_id": [f"p{i % 7}" for i in range(13)], "sample_id": [i // 7 for i in range(13)],
                  "prompt": prompts, "output": outputs}).to_parquet(samples)
    raw = micro_config(results_dir=str(tmp_path / "results"), scoring={
        "scorer": "reward_model", "reward_model": {"path": str(models["multi"]), "trust_remote_code": True,
                                                   "batch_size": 2}})
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(raw))
    one, _ = score_samples(pd.read_parquet(samples), cfg.validate(raw))  # one process, this one
    args = ["score", "--config", str(config), "--round", "1", "--samples", str(samples)]
    # --multi_gpu is accelerate's torchrun launcher; on a machine without GPUs the scorer uses gloo on CPU
    # (accelerate's --cpu launches a single process unless mpirun is used).
    launch = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), "-m", "iteralign.cli"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(launch + args + ["--output", str(tmp_path / "two.parquet")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = pd.read_parquet(tmp_path / "two.parquet")
    assert len(two) == 13 and two[["prompt_id", "sample_id"]].equals(one[["prompt_id", "sample_id"]])
    for column in ["reward", "reward_objective_0", "reward_objective_1", "reward_objective_2"]:
        assert two[column].tolist() == pytest.approx(one[column].tolist(), abs=1e-5)
    from iteralign.artifacts import read_provenance

    assert read_provenance(tmp_path / "two.parquet")["usage"]["processes"] == 2
    assert not (tmp_path / ".two.parquet").exists()


def test_score_step_names_a_missing_reward_model(tmp_path):
    samples = tmp_path / "samples_r1.parquet"
    pd.DataFrame({"prompt_id": ["a"], "sample_id": [0], "prompt": [PROMPTS[0]], "output": ["1"]}).to_parquet(samples)
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(micro_config(scoring={
        "scorer": "reward_model", "reward_model": {"path": str(tmp_path / "no-such-rm")}})))
    result = run_cli("score", "--config", str(config), "--round", "1", "--samples", str(samples),
                     "--output", str(tmp_path / "rewards_r1.parquet"), check=False)
    assert result.returncode == 2
    assert f"scoring.reward_model.path: {tmp_path / 'no-such-rm'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr
