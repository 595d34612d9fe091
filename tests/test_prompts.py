"""Prompt sources and the round plan."""

import json
import math

import pandas as pd
import pytest

from iteralign import config as cfg
from iteralign.prompts import (
    PromptError,
    canonical_messages,
    load_prompts,
    num_rounds,
    plan_rounds,
    prompt_id,
)


def make_config(**prompts):
    return cfg.validate({"seed": 5, "rounds": 4, "evaluation": {"num_prompts": 10},
                         "prompts": {"per_round": 25, **prompts}})


def test_prompt_id_is_stable_and_depends_on_content_only():
    a = canonical_messages("What is 2+2?", "here")
    assert prompt_id(a) == prompt_id([{"content": "What is 2+2?", "role": "user"}])
    assert prompt_id(a) != prompt_id(canonical_messages("What is 2+3?", "here"))
    assert len(prompt_id(a)) == 16


@pytest.mark.parametrize(("available", "rounds", "per_round", "expected"),
                         [(110, 4, 25, 4), (60, 4, 25, 2), (61, 4, 25, 3), (1000, 2, 25, 2), (11, 4, 25, 1)])
def test_number_of_rounds(available, rounds, per_round, expected):
    config = cfg.validate({"rounds": rounds, "evaluation": {"num_prompts": 10}, "prompts": {"per_round": per_round}})
    assert num_rounds(available, config) == expected


def test_no_eval_left_for_training_is_an_error():
    with pytest.raises(PromptError, match="leaves none for training"):
        num_rounds(10, make_config())


def _prompts(n):
    return [[{"role": "user", "content": f"question {i}"}] for i in range(n)]


def test_plan_uses_no_prompt_twice_and_keeps_eval_disjoint():
    config = make_config()
    plan = plan_rounds(_prompts(90), config)
    train, held_out = plan[plan["split"] == "train"], plan[plan["split"] == "eval"]
    assert len(held_out) == 10 and held_out["round"].isna().all()
    assert plan["prompt_id"].is_unique
    assert set(train["prompt_id"]).isdisjoint(held_out["prompt_id"])
    assert train.groupby("round").size().to_dict() == {1: 25, 2: 25, 3: 25, 4: 5}  # 4 = ceil(80/25)


def test_plan_drops_prompts_beyond_the_last_round():
    config = cfg.validate({"rounds": 2, "evaluation": {"num_prompts": 10}, "prompts": {"per_round": 25}})
    plan = plan_rounds(_prompts(200), config)
    assert len(plan) == 10 + 50 and plan["round"].max() == 2


def test_plan_is_seeded():
    a = plan_rounds(_prompts(90), make_config())
    b = plan_rounds(_prompts(90), make_config())
    c = plan_rounds(_prompts(90), cfg.validate({**make_config(), "seed": 6}))
    assert a.equals(b)
    assert not a["prompt_id"].equals(c["prompt_id"])


def test_duplicate_prompts_are_used_once(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": t}) for t in ["a", "b", "a", "c"]))
    assert len(load_prompts(make_config(source=str(path)))) == 3


def test_message_lists_are_read_from_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    pd.DataFrame({"prompt": [messages, [{"role": "user", "content": "yo"}]]}).to_parquet(path)
    prompts = load_prompts(make_config(source=str(path)))
    assert prompts[0] == messages


@pytest.mark.parametrize(("record", "message"), [
    ({"text": "hi"}, r"p.jsonl record 1: field 'prompt' is missing \(prompts.field\)"),
    ({"prompt": ""}, r"p.jsonl record 1, field 'prompt': prompt is an empty string"),
    ({"prompt": None}, r"p.jsonl record 1, field 'prompt': prompt is missing \(null\)"),
    ({"prompt": [{"role": "user", "content": "  "}]}, r"record 1, field 'prompt': message 0 has empty or non-text content"),
    ({"prompt": [{"role": "robot", "content": "x"}]}, r"record 1, field 'prompt': message 0 has role 'robot'"),
])
def test_bad_prompt_rows_are_named(tmp_path, record, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(PromptError, match=message):
        load_prompts(make_config(source=str(path)))


def test_missing_source_file_is_named(tmp_path):
    with pytest.raises(PromptError, match=r"nope.parquet does not exist"):
        load_prompts(make_config(source=str(tmp_path / "nope.parquet")))


def test_nan_prompt_in_parquet_is_named(tmp_path):
    path = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": ["ok", math.nan]}).to_parquet(path)
    with pytest.raises(PromptError, match=r"p.parquet row 1, field 'prompt': prompt is missing"):
        load_prompts(make_config(source=str(path)))
