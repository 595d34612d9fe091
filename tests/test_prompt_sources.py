"""Prompt sources people have, each built here with `datasets` (nothing downloaded):
save_to_disk folders (Dataset, DatasetDict), .arrow files, chat `messages` ending with
the assistant's answer, ShareGPT `conversations`, and a prompt field named in the config."""

from __future__ import annotations

import subprocess

import datasets
import pandas as pd
import pyarrow as pa
import pytest
import yaml
from helpers import micro_config, venv_env, workflow_command, write_reward_module

from iteralign import config as cfg
from iteralign.prompts import PromptError, load_prompts, plan_rounds

QUESTIONS = [f"What is {i} times {i + 1}?" for i in range(12)]


def make_config(source, **prompts) -> dict:
    return cfg.validate({"seed": 1, "rounds": 2, "evaluation": {"num_prompts": 4},
                         "prompts": {"source": str(source), "per_round": 4, **prompts}})


def chat(question: str, answer: str) -> list[dict[str, str]]:
    """A conversation as SFT and UltraFeedback-binarized data hold it: the answer is the last turn."""
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]


def sharegpt(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def ultrafeedback_binarized() -> datasets.DatasetDict:
    """Its columns: prompt (text), prompt_id, chosen/rejected/messages (conversations), scores."""
    def split(questions):
        return datasets.Dataset.from_dict({
            "prompt": questions,
            "prompt_id": [str(i) for i in range(len(questions))],
            "chosen": [chat(q, "good") for q in questions],
            "rejected": [chat(q, "bad") for q in questions],
            "messages": [chat(q, "good") for q in questions],
            "score_chosen": [8.0] * len(questions),
            "score_rejected": [2.0] * len(questions),
        })
    return datasets.DatasetDict({"train_prefs": split(QUESTIONS), "test_prefs": split(QUESTIONS[:3])})


def assert_one_line(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message


def test_a_saved_dataset_folder_is_read_and_planned(tmp_path):
    datasets.Dataset.from_dict({"prompt": QUESTIONS}).save_to_disk(tmp_path / "ds")
    config = make_config(tmp_path / "ds")
    prompts = load_prompts(config)
    assert [p[0]["content"] for p in prompts] == QUESTIONS
    plan = plan_rounds(prompts, config)
    assert list(plan["split"].value_counts().sort_index()) == [4, 8]  # eval, train
    assert sorted(plan["round"].dropna().unique()) == [1, 2]


def test_a_dataset_dict_reads_the_split_named_in_the_config(tmp_path):
    ultrafeedback_binarized().save_to_disk(tmp_path / "uf")
    prompts = load_prompts(make_config(tmp_path / "uf", split="train_prefs"))
    assert [p for p in prompts] == [[{"role": "user", "content": q}] for q in QUESTIONS]


@pytest.mark.parametrize("split", [None, "train"])
def test_a_dataset_dict_without_a_known_split_is_refused_naming_its_splits(tmp_path, split):
    ultrafeedback_binarized().save_to_disk(tmp_path / "uf")
    with pytest.raises(PromptError) as error:
        load_prompts(make_config(tmp_path / "uf", split=split))
    assert_one_line(error, str(tmp_path / "uf"), "prompts.split", "['test_prefs', 'train_prefs']")


def test_arrow_files_are_read_as_datasets_writes_them_and_as_arrow_ipc_files(tmp_path):
    datasets.Dataset.from_dict({"prompt": QUESTIONS}).save_to_disk(tmp_path / "ds")
    written = sorted((tmp_path / "ds").glob("*.arrow"))
    assert len(written) == 1
    assert [p[0]["content"] for p in load_prompts(make_config(written[0]))] == QUESTIONS
    table = pa.table({"prompt": QUESTIONS})
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    assert [p[0]["content"] for p in load_prompts(make_config(tmp_path / "file.arrow"))] == QUESTIONS


def test_conversations_ending_with_the_answer_are_refused_naming_the_option(tmp_path):
    ultrafeedback_binarized().save_to_disk(tmp_path / "uf")
    with pytest.raises(PromptError) as error:
        load_prompts(make_config(tmp_path / "uf", split="train_prefs", field="messages"))
    assert_one_line(error, f"{tmp_path / 'uf'} split train_prefs row 0, field 'messages'",
                    "prompts.drop_final_assistant: true")


def test_drop_final_assistant_prompts_with_the_turns_before_the_answer(tmp_path):
    ultrafeedback_binarized().save_to_disk(tmp_path / "uf")
    config = make_config(tmp_path / "uf", split="train_prefs", field="messages", drop_final_assistant=True)
    prompts = load_prompts(config)
    assert prompts == [chat(q, "")[:2] for q in QUESTIONS]


def test_sharegpt_conversations_become_user_and_assistant_messages(tmp_path):
    conversations = [sharegpt(q, "an answer") for q in QUESTIONS]
    conversations[0] = [{"from": "system", "value": "Be brief."}, *conversations[0]]
    pd.DataFrame({"conversations": conversations}).to_parquet(tmp_path / "sharegpt.parquet")
    config = make_config(tmp_path / "sharegpt.parquet", field="conversations", drop_final_assistant=True)
    prompts = load_prompts(config)
    assert prompts[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[0]}]
    assert prompts[1:] == [[{"role": "user", "content": q}] for q in QUESTIONS[1:]]


def test_an_unknown_sharegpt_speaker_is_named(tmp_path):
    rows = [sharegpt(q, "a") for q in QUESTIONS]
    rows[3] = [{"from": "narrator", "value": "once"}, *rows[3]]
    datasets.Dataset.from_dict({"conversations": rows}).save_to_disk(tmp_path / "ds")
    with pytest.raises(PromptError) as error:
        load_prompts(make_config(tmp_path / "ds", field="conversations", drop_final_assistant=True))
    assert_one_line(error, "row 3, field 'conversations'", "message 0 is from 'narrator'", "'human'")


def test_a_conversation_with_only_the_answer_is_refused_after_dropping_it(tmp_path):
    rows = [chat(q, "a")[1:] for q in QUESTIONS]
    rows[5] = [{"role": "assistant", "content": "hello"}]
    datasets.Dataset.from_dict({"messages": rows}).save_to_disk(tmp_path / "ds")
    with pytest.raises(PromptError) as error:
        load_prompts(make_config(tmp_path / "ds", field="messages", drop_final_assistant=True))
    assert_one_line(error, "row 5, field 'messages'", "ends with nothing", "expected a user turn")


def test_a_prompt_field_named_in_the_config_is_read(tmp_path):
    # raw UltraFeedback: the prompt is the text column `instruction`
    raw = datasets.Dataset.from_dict({"source": ["evol"] * 12, "instruction": QUESTIONS,
                                      "models": [["a", "b"]] * 12})
    raw.save_to_disk(tmp_path / "raw")
    assert [p[0]["content"] for p in load_prompts(make_config(tmp_path / "raw", field="instruction"))] == QUESTIONS
    with pytest.raises(PromptError) as error:
        load_prompts(make_config(tmp_path / "raw"))
    assert_one_line(error, str(tmp_path / "raw"), "field 'prompt' is missing (prompts.field)", "'instruction'")


def test_a_folder_not_written_by_datasets_is_named(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hi")
    with pytest.raises(PromptError) as error:
        load_prompts(make_config(tmp_path / "notes"))
    assert_one_line(error, str(tmp_path / "notes"), "save_to_disk")


def test_a_split_that_a_single_saved_dataset_is_not_is_refused(tmp_path):
    datasets.Dataset.from_dict({"prompt": QUESTIONS}, split="train").save_to_disk(tmp_path / "ds")
    assert len(load_prompts(make_config(tmp_path / "ds", split="train"))) == len(QUESTIONS)
    with pytest.raises(PromptError) as error:
        load_prompts(make_config(tmp_path / "ds", split="test"))
    assert_one_line(error, str(tmp_path / "ds"), "single Dataset of split 'train'", "prompts.split='test'")


def test_a_damaged_arrow_file_is_named_in_one_line(tmp_path):
    (tmp_path / "broken.arrow").write_bytes(b"ARROW1\n\x00\x01 not really")
    with pytest.raises(PromptError) as error:
        load_prompts(make_config(tmp_path / "broken.arrow"))
    assert_one_line(error, f"prompt source {tmp_path / 'broken.arrow'} could not be read: ")


def test_snakemake_plans_from_a_dataset_folder(tmp_path):
    """The folder is the plan rule's input: a dry run lists the rounds, the plan job reads the folder."""
    datasets.Dataset.from_dict({"prompt": QUESTIONS * 2 + [f"Extra {i}?" for i in range(24)]}).save_to_disk(
        tmp_path / "data" / "prompts")
    config = micro_config(prompts={"source": "data/prompts", "per_round": 12}, rounds=5)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    write_reward_module(tmp_path)
    planned = subprocess.run(workflow_command(tmp_path, "config.yaml", "-n", "--quiet", "rules"), capture_output=True,
                             text=True, env=venv_env())
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert any(line.split() == ["train", "2"] for line in planned.stdout.splitlines()), planned.stdout
    made = subprocess.run(workflow_command(tmp_path, "config.yaml", "results/micro/prompts.parquet"),
                          capture_output=True, text=True, env=venv_env())
    assert made.returncode == 0, made.stderr[-2000:]
    plan = pd.read_parquet(tmp_path / "results/micro/prompts.parquet")
    assert len(plan) == 12 + 24 and set(plan["round"].dropna()) == {1, 2}
