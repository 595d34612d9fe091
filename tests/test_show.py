"""`iteralign show`: a few items of an artefact as a person reads them."""

import pytest

from iteralign.artifacts import write_json
from iteralign.show import show


def test_pairwise_feedback_shows_prompt_both_outputs_rewards_and_the_preferred_one(crafted):
    text = show(crafted / "feedback_r1.json", n=1)
    assert "2 items; showing 1 from 0" in text
    assert "question t0" in text
    assert "A (sample 1) reward 1  <- preferred\n    try 1 of t0" in text
    assert "B (sample 0) reward 0\n    try 0 of t0" in text
    assert "t1" not in text


def test_binary_feedback_says_desirable_or_not(tmp_path):
    path = tmp_path / "feedback_r1.json"
    write_json([{"type": "binary_feedback", "prompt_id": "p", "prompt": "2+2", "output": "4", "label": 1,
                 "reward": 1.0, "sample_id": 0}], path)
    assert "output (sample 0) reward 1  desirable\n    4" in show(path)


def test_samples_are_shown_per_prompt_with_the_rewards_beside_them(crafted):
    text = show(crafted / "samples_r2.parquet", n=1, start=1)
    assert "6 rows, 3 prompts; showing 1 prompts from 1" in text
    assert "prompt_id t4" in text and "prompt_id t3" not in text
    assert "sample 1: reward 1, num_output_tokens 4, finish_reason stop\n    try 1 of t4" in text


def test_a_rewards_file_is_shown_with_the_texts_of_its_samples(crafted):
    text = show(crafted / "rewards_r1.parquet", n=1)
    assert "sample 0: reward 0" in text and "try 0 of t0" in text


def test_one_prompt_of_an_evaluation(crafted):
    text = show(crafted / "eval_r2.parquet", prompt_id="e3")
    assert "prompt_id e3" in text and "answer 2.3" in text
    assert "policy_logp -1.8, reference_logp -2" in text


def test_an_unknown_prompt_id_is_named(crafted):
    with pytest.raises(ValueError, match="no prompt_id 'nope'"):
        show(crafted / "eval_r2.parquet", prompt_id="nope")
