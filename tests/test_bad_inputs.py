"""Bad inputs: one line (plus a hint) on stderr, exit code 2, the right file/row/key, nothing lost.

One micro run (2 rounds, up to round 2's reference log-probs) is built once per session
by Snakemake; each case copies it, damages one thing, and runs the ``iteralign <step>``
that reads it, in this process (``cli.main``; the rules run the same function). Config
defects that can be known at parse time must fail there: in ``iteralign plan`` (the
first step) and, for a few, in Snakemake's parse of the Snakefile. After every case,
every artefact that was complete before the run is still there, byte for byte.

``ITERALIGN_MATRIX_RECORD=<file>`` appends one JSON line per case (its class: clear,
traceback, late, accepted or unclear; what was lost) for a before/after count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import yaml
from fake_openai import Action, FakeJudge, reply
from helpers import EXP, micro_config, new_workdir, snakemake_command, venv_env

pytestmark = pytest.mark.workflow
KEY_ENV = "ITERALIGN_TEST_JUDGE_KEY"


# ---------------------------------------------------------------- the shared run
def _config(**sections) -> dict:
    return micro_config(rounds=2, **sections)


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> Path:
    """A 2-round micro run (Snakemake) up to round 2's reference log-probs, never changed: cases work on copies."""
    from reward_models import save_classifier

    workdir = new_workdir(tmp_path_factory.mktemp("bad_inputs") / "run", rounds=2)  # as _config() writes it
    result = subprocess.run(snakemake_command(workdir, workdir / "config.yaml", "--cores", "2",
                                              f"{EXP}/reflogps_r2.parquet"),  # every file a case reads; no evaluation
                            capture_output=True, text=True, env=venv_env())
    assert result.returncode == 0, result.stderr[-3000:]
    from iteralign.modeling import load_tokenizer

    save_classifier(workdir / "rm", load_tokenizer(workdir / EXP / "ckpt_r0" / "FINAL"), num_labels=1)
    return workdir


# ---------------------------------------------------------------- cases
@dataclass
class Case:
    id: str
    argv: list[str]  # the iteralign command, {C} = the case's config file
    expect: list[str]  # what the one line names (substrings)
    config: dict | None = None  # sections that replace the micro config's (None: the run's own)
    damage: Callable[[Path], None] | None = None  # what the case breaks in the copied run
    parse_time: bool = False  # a config defect: its command is `iteralign plan`, the first step
    env: dict = field(default_factory=dict)
    judge: Callable | None = None  # the fake judge's behaviour (the config gets its URL)


def step(name: str, n: int = 1, **over) -> list[str]:
    """The argv of one step on the run's own artefacts (as the rules call it)."""
    ckpt = f"{EXP}/ckpt_r{{}}/FINAL"
    argv = {
        "plan": ["plan", "--output", f"{EXP}/prompts.parquet"],
        "link-sft": ["link-sft", "--output", "results/linked/ckpt_r0/FINAL"],
        "sample": ["sample", "--round", str(n), "--prompts", f"{EXP}/prompts.parquet",
                   "--checkpoint", ckpt.format(n - 1), "--output", f"{EXP}/samples_r{n}.parquet"],
        "score": ["score", "--round", str(n), "--samples", f"{EXP}/samples_r{n}.parquet",
                  "--output", f"{EXP}/rewards_r{n}.parquet"],
        "feedback": ["feedback", "--round", str(n), "--samples", f"{EXP}/samples_r{n}.parquet",
                     "--rewards", f"{EXP}/rewards_r{n}.parquet", "--output", f"{EXP}/feedback_r{n}.json"],
        "reference": ["reference", "--round", str(n), "--feedback", f"{EXP}/feedback_r{n}.json",
                      "--checkpoint", ckpt.format(0), "--output", f"{EXP}/reflogps_r{n}.parquet"],
        "train": ["train", "--round", str(n), "--feedback", f"{EXP}/feedback_r{n}.json",
                  "--reference", f"{EXP}/reflogps_r{n}.parquet", "--checkpoint", ckpt.format(n - 1),
                  "--output", ckpt.format(n), "--metrics", f"{EXP}/train_r{n}.jsonl"],
    }[name]
    for key, value in over.items():
        flag = "--" + key.replace("_", "-")
        argv[argv.index(flag) + 1] = value
    return [argv[0], "--config", "{C}", *argv[1:]]


def write(rel: str, text: str | bytes):
    def damage(work: Path) -> None:
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return damage


def truncate(rel: str, keep: float = 0.5):
    def damage(work: Path) -> None:
        path = work / rel
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
    return damage


def remove(*rels: str):
    def damage(work: Path) -> None:
        for rel in rels:
            for path in (work / rel).parent.glob((work / rel).name):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return damage


def edit_table(rel: str, change: Callable[[pd.DataFrame], pd.DataFrame]):
    def damage(work: Path) -> None:
        path = work / rel
        change(pd.read_parquet(path)).to_parquet(path)
    return damage


def edit_json(rel: str, change: Callable[[list], object]):
    def damage(work: Path) -> None:
        path = work / rel
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return damage


def reward_module(name: str, body: str):
    return write(f"{name}.py", body)


def chain(*damages):
    def damage(work: Path) -> None:
        for d in damages:
            d(work)
    return damage


def _first_item(change: Callable[[dict], None]):
    def apply(items: list) -> list:
        change(items[0])
        return items
    return apply


def _set(key, value):
    return lambda item: item.__setitem__(key, value)


def _contradict(item: dict) -> None:
    item["label"] = 1 - item["label"]


def _with_reward(value):
    def change(frame: pd.DataFrame) -> pd.DataFrame:
        frame.loc[3, "reward"] = value
        return frame
    return change


def prompts_file(name: str, text: str, **prompts) -> tuple[Callable, dict]:
    """A prompt source written into the run and the config sections that use it."""
    return write(name, text), {"prompts": {**_config()["prompts"], "source": name, **prompts}}


def python_scorer(function: str) -> dict:
    return {"scoring": {"scorer": "python", "python": {"function": function}}}


def judge_scorer(**judge) -> dict:
    return {"scoring": {"scorer": "judge", "max_failed_fraction": 0.0,
                        "judge": {"model": "fake-judge", "api_key_env": KEY_ENV, "max_attempts": 1,
                                  "timeout": 2.0, **judge}}}


def rm_scorer(path: str) -> dict:
    return {"scoring": {"scorer": "reward_model", "reward_model": {"path": path}}}


def sft_link(path: str) -> dict:
    return {"policy": {"sft_checkpoint": path}}


CKPT1 = f"{EXP}/ckpt_r1/FINAL"
CKPT0 = f"{EXP}/ckpt_r0/FINAL"


def round_one_prompt(text: str):
    """Replace the first prompt of round 1 in prompts.parquet (as if the source had held it)."""
    def change(frame: pd.DataFrame) -> pd.DataFrame:
        from iteralign.prompts import prompt_id

        row = frame.index[(frame["split"] == "train") & (frame["round"] == 1)][0]
        messages = [{"role": "user", "content": text}]
        frame.at[row, "prompt"] = messages
        frame.at[row, "prompt_id"] = prompt_id(messages)
        return frame
    return edit_table(f"{EXP}/prompts.parquet", change)


CASES = [
    # -------- config: the schema and cross-key checks (parse time)
    Case("config-unknown-top-key", step("plan"), ["colour"], {"colour": "blue"}, parse_time=True),
    Case("config-typo-nested-key", step("plan"), ["sampling", "temprature"],
         {"sampling": {**_config()["sampling"], "temprature": 0.7}}, parse_time=True),
    Case("config-wrong-type", step("plan"), ["sampling.num_samples", "four"],
         {"sampling": {**_config()["sampling"], "num_samples": "four"}}, parse_time=True),
    Case("config-negative-lr", step("plan"), ["training.lr"],
         {"training": {**_config()["training"], "lr": -1.0}}, parse_time=True),
    Case("config-loss-feedback-mismatch", step("plan"), ["training.loss", "feedback.type"],
         {"feedback": {"type": "scalar"}}, parse_time=True),
    Case("config-pairwise-one-sample", step("plan"), ["sampling.num_samples"],
         {"sampling": {**_config()["sampling"], "num_samples": 1}}, parse_time=True),
    Case("config-prompt-length-over-max", step("plan"), ["training.max_prompt_length"],
         {"training": {**_config()["training"], "max_prompt_length": 30}}, parse_time=True),
    Case("config-greedy-several-samples", step("plan"), ["sampling.temperature", "sampling.num_samples"],
         {"sampling": {**_config()["sampling"], "temperature": 0.0}}, parse_time=True),
    Case("config-grpo-history", step("plan"), ["training.history"],
         {"training": {**_config()["training"], "loss": "grpo", "history": "all"},
          "feedback": {"type": "scalar"}}, parse_time=True),
    Case("config-not-yaml", step("plan", ), ["bad.yaml", "YAML"], damage=write("bad.yaml", "a: [1, 2\nb: :"),
         parse_time=True),
    Case("config-top-level-list", step("plan"), ["bad.yaml", "mapping"], damage=write("bad.yaml", "- 1\n- 2\n"),
         parse_time=True),
    Case("config-missing-file", ["plan", "--config", "nowhere.yaml", "--output", f"{EXP}/prompts.parquet"],
         ["nowhere.yaml", "does not exist"], parse_time=True),
    Case("config-python-scorer-gpus", step("plan"), ["scoring.gpus"],
         {"scoring": {"scorer": "python", "gpus": 1, "python": {"function": "micro_rewards:graded"}}},
         parse_time=True),
    Case("config-reward-model-no-path", step("plan"), ["scoring.reward_model.path"],
         {"scoring": {"scorer": "reward_model"}}, parse_time=True),
    Case("config-judge-no-model", step("plan"), ["scoring.judge.model"],
         {"scoring": {"scorer": "judge", "judge": {"api_key_env": None}}}, parse_time=True),
    Case("config-judge-template-no-output", step("plan"), ["scoring.judge.template", "{output}"],
         judge_scorer(template="{prompt}"), parse_time=True, env={KEY_ENV: "k-123456"}),
    Case("config-judge-pattern-not-regex", step("plan"), ["scoring.judge.score_pattern"],
         judge_scorer(score_pattern="(["), parse_time=True, env={KEY_ENV: "k-123456"}),
    Case("config-judge-pattern-no-group", step("plan"), ["scoring.judge.score_pattern", "group"],
         judge_scorer(score_pattern="Score"), parse_time=True, env={KEY_ENV: "k-123456"}),
    Case("config-judge-range-reversed", step("plan"), ["scoring.judge.score_range"],
         judge_scorer(score_range=[10, 0]), parse_time=True, env={KEY_ENV: "k-123456"}),
    Case("config-judge-key-unset", step("plan"), ["scoring.judge.api_key_env", KEY_ENV],
         judge_scorer(), parse_time=True),
    Case("config-objective-weights-unknown", step("plan"), ["objective_weights"],
         {"scoring": {"scorer": "reward_model", "reward_model": {
             "path": "rm", "objectives": ["a"], "objective_weights": {"b": 1.0}}}}, parse_time=True),
    Case("config-feedback-threshold-negative", step("plan"), ["feedback.pairwise.threshold"],
         {"feedback": {"type": "pairwise", "pairwise": {"mode": "max", "threshold": -1}}}, parse_time=True),
    # -------- reward functions (parse time where the function can be checked without data)
    Case("reward-module-missing", step("plan"), ["scoring.python.function", "no_such_module"],
         python_scorer("no_such_module:f"), parse_time=True),
    Case("reward-function-missing", step("plan"), ["scoring.python.function", "nothing_here"],
         python_scorer("micro_rewards:nothing_here"), parse_time=True),
    Case("reward-not-callable", step("plan"), ["scoring.python.function", "CONSTANT"],
         python_scorer("rw_const:CONSTANT"), damage=reward_module("rw_const", "CONSTANT = 3\n"), parse_time=True),
    Case("reward-wrong-signature", step("plan"), ["scoring.python.function", "(prompt, output)"],
         python_scorer("rw_sig:one"), damage=reward_module("rw_sig", "def one(output):\n    return 1.0\n"),
         parse_time=True),
    Case("reward-module-syntax-error", step("plan"), ["scoring.python.function", "rw_syntax"],
         python_scorer("rw_syntax:f"), damage=reward_module("rw_syntax", "def f(p, o) return 1\n"),
         parse_time=True),
    Case("reward-module-import-raises", step("plan"), ["scoring.python.function", "rw_boom"],
         python_scorer("rw_boom:f"), damage=reward_module("rw_boom", "raise RuntimeError('no GPU here')\n"),
         parse_time=True),
    Case("reward-raises", step("score"), ["rw_raise:f", "prompt_id", "ZeroDivisionError"],
         python_scorer("rw_raise:f"), damage=reward_module("rw_raise", "def f(p, o):\n    return 1 / 0\n")),
    Case("reward-raises-on-one-row", step("score"), ["rw_row:f", "prompt_id", "sample_id", "KeyError"],
         python_scorer("rw_row:f"), damage=reward_module(
             "rw_row", "def f(p, o):\n    if len(o) > 2:\n        return {}['x']\n    return 0.0\n")),
    Case("reward-returns-text", step("score"), ["rw_text:f", "'high'", "real number"],
         python_scorer("rw_text:f"), damage=reward_module("rw_text", "def f(p, o):\n    return 'high'\n")),
    Case("reward-returns-none", step("score"), ["rw_none:f", "None", "real number"],
         python_scorer("rw_none:f"), damage=reward_module("rw_none", "def f(p, o):\n    return None\n")),
    Case("reward-returns-plus-inf", step("score"), ["rw_inf:f", "inf"],
         python_scorer("rw_inf:f"), damage=reward_module("rw_inf", "def f(p, o):\n    return float('inf')\n")),
    Case("reward-returns-minus-inf", step("score"), ["rw_ninf:f", "-inf"],
         python_scorer("rw_ninf:f"), damage=reward_module("rw_ninf", "def f(p, o):\n    return -float('inf')\n")),
    Case("reward-returns-nan", step("score"), ["rw_nan:f", "NaN", "max_failed_fraction"],
         python_scorer("rw_nan:f"), damage=reward_module("rw_nan", "def f(p, o):\n    return float('nan')\n")),
    # -------- reward models
    Case("reward-model-missing", step("score"), ["scoring.reward_model.path", "no_rm"], rm_scorer("no_rm")),
    Case("reward-model-no-config", step("score"), ["rm_copy", "config.json"], rm_scorer("rm_copy"),
         damage=chain(lambda w: shutil.copytree(w / "rm", w / "rm_copy"), remove("rm_copy/config.json"))),
    Case("reward-model-truncated-weights", step("score"), ["rm_copy/model.safetensors"], rm_scorer("rm_copy"),
         damage=chain(lambda w: shutil.copytree(w / "rm", w / "rm_copy"), truncate("rm_copy/model.safetensors"))),
    Case("reward-model-no-tokenizer", step("score"), ["rm_copy", "tokenizer"], rm_scorer("rm_copy"),
         damage=chain(lambda w: shutil.copytree(w / "rm", w / "rm_copy"),
                      remove("rm_copy/tokenizer*", "rm_copy/special_tokens_map.json"))),
    # -------- SFT links
    Case("sft-link-missing", step("link-sft"), ["policy.sft_checkpoint", "no_sft"], sft_link("no_sft")),
    Case("sft-link-no-config", step("link-sft"), ["sft_copy", "config.json"], sft_link("sft_copy"),
         damage=chain(lambda w: shutil.copytree(w / CKPT0, w / "sft_copy"), remove("sft_copy/config.json"))),
    Case("sft-link-no-tokenizer", step("link-sft"), ["sft_copy", "tokenizer"], sft_link("sft_copy"),
         damage=chain(lambda w: shutil.copytree(w / CKPT0, w / "sft_copy"),
                      remove("sft_copy/tokenizer*", "sft_copy/special_tokens_map.json"))),
    Case("sft-no-tokenizer-at-sample", step("sample"), [CKPT0, "tokenizer"],
         damage=remove(f"{CKPT0}/tokenizer*", f"{CKPT0}/special_tokens_map.json")),
    Case("sft-truncated-weights-at-sample", step("sample"), [f"{CKPT0}/model.safetensors"],
         damage=truncate(f"{CKPT0}/model.safetensors")),
    Case("sft-config-json-damaged", step("sample"), [f"{CKPT0}/config.json"],
         damage=write(f"{CKPT0}/config.json", "{not json")),
    # -------- prompt files (plan) and prompts the model cannot take (sample)
    Case("prompts-source-missing", step("plan"), ["nowhere.jsonl", "prompts.source"],
         {"prompts": {**_config()["prompts"], "source": "nowhere.jsonl"}}),
    Case("prompts-bad-json-line", step("plan"), ["p.jsonl", "line 2"],
         *reversed(prompts_file("p.jsonl", '{"prompt": "1+1"}\n{"prompt": \n'))),
    Case("prompts-field-missing", step("plan"), ["p.jsonl", "record 0", "prompt"],
         *reversed(prompts_file("p.jsonl", '{"text": "1+1"}\n'))),
    Case("prompts-bad-role", step("plan"), ["p.jsonl", "role", "robot"],
         *reversed(prompts_file("p.jsonl", json.dumps({"prompt": [{"role": "robot", "content": "1+1"}]})))),
    Case("prompts-ends-with-assistant", step("plan"), ["p.jsonl", "assistant"],
         *reversed(prompts_file("p.jsonl", json.dumps({"prompt": [{"role": "user", "content": "1+1"},
                                                                   {"role": "assistant", "content": "2"}]})))),
    Case("prompts-empty-text", step("plan"), ["p.jsonl", "empty"],
         *reversed(prompts_file("p.jsonl", json.dumps({"prompt": ""})))),
    Case("prompts-json-not-array", step("plan"), ["p.json", "array"],
         *reversed(prompts_file("p.json", json.dumps({"prompt": "1+1"})))),
    Case("prompts-unknown-suffix", step("plan"), ["p.txt", "file type"], *reversed(prompts_file("p.txt", "1+1"))),
    Case("prompts-too-few", step("plan"), ["prompts", "evaluation.num_prompts"],
         *reversed(prompts_file("p.jsonl", json.dumps({"prompt": "1+1"})))),
    Case("prompts-parquet-damaged", step("plan"), ["p.parquet"],
         *reversed(prompts_file("p.parquet", "PAR1 not really"))),
    Case("prompts-unencodable-characters", step("sample"), ["prompt_id", "☃"],
         damage=round_one_prompt("what is 2+2 ☃?")),
    Case("prompts-unencodable-at-plan", step("plan"), ["p.jsonl", "prompt_id", "☃"],
         {"prompts": {**_config()["prompts"], "source": "p.jsonl"}, **sft_link(CKPT0)},
         damage=write("p.jsonl", "\n".join(json.dumps({"prompt": f"{i}+{i}"}) for i in range(40))
                      + "\n" + json.dumps({"prompt": "2+2 ☃"}))),
    Case("prompts-longer-than-context-at-plan", step("plan"), ["p.jsonl", "prompt_id", "tokens"],
         {"prompts": {**_config()["prompts"], "source": "p.jsonl"}, **sft_link(CKPT0)},
         damage=write("p.jsonl", "\n".join(json.dumps({"prompt": f"{i}+{i}"}) for i in range(40))
                      + "\n" + json.dumps({"prompt": "1+2" * 400}))),
    Case("prompts-longer-than-context", step("sample"), ["prompt_id", "tokens", "sampling.long_prompts"],
         damage=round_one_prompt("1+2" * 400)),
    # -------- feedback files (train and reference read them)
    Case("feedback-not-json", step("train", 2), [f"{EXP}/feedback_r2.json", "JSON"],
         damage=write(f"{EXP}/feedback_r2.json", "[{")),
    Case("feedback-not-array", step("train", 2), [f"{EXP}/feedback_r2.json", "array"],
         damage=write(f"{EXP}/feedback_r2.json", "{}")),
    Case("feedback-empty", step("train", 2), [f"{EXP}/feedback_r2.json", "no feedback items"],
         damage=write(f"{EXP}/feedback_r2.json", "[]")),
    Case("feedback-item-not-object", step("train", 2), ["feedback_r2.json item 0", "object"],
         damage=write(f"{EXP}/feedback_r2.json", "[1, 2]")),
    Case("feedback-unknown-type", step("train", 2), ["feedback_r2.json item 0", "magic_feedback"],
         damage=edit_json(f"{EXP}/feedback_r2.json", _first_item(_set("type", "magic_feedback")))),
    Case("feedback-missing-key", step("train", 2), ["feedback_r2.json item 0", "output_B"],
         damage=edit_json(f"{EXP}/feedback_r2.json", _first_item(lambda item: item.pop("output_B")))),
    Case("feedback-label-not-binary", step("train", 2), ["feedback_r2.json item 0", "label"],
         damage=edit_json(f"{EXP}/feedback_r2.json", _first_item(_set("label", 2)))),
    Case("feedback-label-contradicts-rewards", step("train", 2), ["feedback_r2.json item 0", "label", "reward_A"],
         damage=edit_json(f"{EXP}/feedback_r2.json", _first_item(_contradict))),
    Case("feedback-output-shape", step("train", 2), ["feedback_r2.json item 0", "output_A"],
         damage=edit_json(f"{EXP}/feedback_r2.json", _first_item(_set("output_A", {"x": 1})))),
    Case("feedback-prompt-bad", step("train", 2), ["feedback_r2.json item 0", "prompt"],
         damage=edit_json(f"{EXP}/feedback_r2.json", _first_item(_set("prompt", None)))),
    Case("feedback-reward-not-finite", step("train", 2), ["feedback_r2.json item 0", "reward_A"],
         damage=edit_json(f"{EXP}/feedback_r2.json", _first_item(_set("reward_A", 1e400)))),
    Case("feedback-wrong-type-for-loss", step("train", 2), ["feedback_r2.json item 0", "binary_feedback"],
         damage=edit_json(f"{EXP}/feedback_r2.json", lambda items: [
             {"type": "binary_feedback", "prompt": i["prompt"], "output": i["output_A"], "label": 1}
             for i in items])),
    Case("feedback-at-reference-damaged", step("reference", 2), [f"{EXP}/feedback_r2.json", "JSON"],
         damage=write(f"{EXP}/feedback_r2.json", "[{")),
    # -------- damaged tables
    Case("samples-truncated", step("score"), [f"{EXP}/samples_r1.parquet"],
         damage=truncate(f"{EXP}/samples_r1.parquet")),
    Case("samples-missing-column", step("score"), [f"{EXP}/samples_r1.parquet", "output"],
         damage=edit_table(f"{EXP}/samples_r1.parquet", lambda f: f.drop(columns=["output"]))),
    Case("rewards-truncated", step("feedback"), [f"{EXP}/rewards_r1.parquet"],
         damage=truncate(f"{EXP}/rewards_r1.parquet")),
    Case("rewards-missing-column", step("feedback"), [f"{EXP}/rewards_r1.parquet", "reward"],
         damage=edit_table(f"{EXP}/rewards_r1.parquet", lambda f: f.drop(columns=["reward"]))),
    Case("rewards-rows-missing", step("feedback"), [f"{EXP}/rewards_r1.parquet", "rows"],
         damage=edit_table(f"{EXP}/rewards_r1.parquet", lambda f: f.iloc[:-3])),
    Case("rewards-duplicate-rows", step("feedback"), [f"{EXP}/rewards_r1.parquet", "prompt_id"],
         damage=edit_table(f"{EXP}/rewards_r1.parquet", lambda f: pd.concat([f, f.iloc[:1]]))),
    Case("rewards-all-equal-give-no-pairs", step("feedback"), [f"{EXP}/rewards_r1.parquet", "no pairwise feedback"],
         damage=edit_table(f"{EXP}/rewards_r1.parquet", lambda f: f.assign(reward=0.5))),
    Case("rewards-plus-inf", step("feedback"), [f"{EXP}/rewards_r1.parquet", "prompt_id", "sample_id", "inf"],
         damage=edit_table(f"{EXP}/rewards_r1.parquet", _with_reward(float("inf")))),
    Case("rewards-minus-inf", step("feedback"), [f"{EXP}/rewards_r1.parquet", "prompt_id", "sample_id", "inf"],
         damage=edit_table(f"{EXP}/rewards_r1.parquet", _with_reward(float("-inf")))),
    Case("prompts-table-truncated", step("sample"), [f"{EXP}/prompts.parquet"],
         damage=truncate(f"{EXP}/prompts.parquet")),
    Case("prompts-table-no-round", step("sample", 1, round="9"), [f"{EXP}/prompts.parquet", "round 9"]),
    Case("reflogps-truncated", step("train", 2), [f"{EXP}/reflogps_r2.parquet"],
         damage=truncate(f"{EXP}/reflogps_r2.parquet")),
    Case("reflogps-rows-missing", step("train", 2), [f"{EXP}/reflogps_r2.parquet", "prompt_id"],
         damage=edit_table(f"{EXP}/reflogps_r2.parquet", lambda f: f.iloc[2:])),
    # -------- checkpoint files
    Case("ckpt-optimizer-corrupt", step("train", 2), [f"{CKPT1}/optimizer.pt"],
         damage=write(f"{CKPT1}/optimizer.pt", b"\x80\x04not a pickle at all")),
    Case("ckpt-optimizer-truncated", step("train", 2), [f"{CKPT1}/optimizer.pt"],
         damage=truncate(f"{CKPT1}/optimizer.pt")),
    Case("ckpt-scheduler-missing", step("train", 2), [CKPT1, "scheduler.pt"],
         damage=remove(f"{CKPT1}/scheduler.pt")),
    Case("ckpt-trainer-state-damaged", step("train", 2), [f"{CKPT1}/trainer_state.json"],
         damage=write(f"{CKPT1}/trainer_state.json", "{oops")),
    Case("ckpt-weights-truncated", step("train", 2), [f"{CKPT1}/model.safetensors"],
         damage=truncate(f"{CKPT1}/model.safetensors")),
    Case("ckpt-weights-missing", step("sample", 2), [CKPT1, "model.safetensors"],
         damage=remove(f"{CKPT1}/model.safetensors")),
    Case("ckpt-folder-missing", step("sample", 2), [CKPT1, "does not exist"],
         damage=remove(f"{EXP}/ckpt_r1")),
    Case("ckpt-reference-weights-truncated", step("reference", 2), [f"{CKPT0}/model.safetensors"],
         damage=truncate(f"{CKPT0}/model.safetensors")),
    # -------- the judge (a real HTTP server on 127.0.0.1)
    Case("judge-wrong-key", step("score"), ["HTTP 401", "max_failed_fraction"], judge_scorer(),
         env={KEY_ENV: "sk-wrong-000000"}, judge=lambda c, a: Action(status=401)),
    Case("judge-unparsable", step("score"), ["unparsable judge reply", "max_failed_fraction"], judge_scorer(),
         env={KEY_ENV: "k-123456"}, judge=lambda c, a: reply("I refuse to grade this.")),
    Case("judge-malformed-body", step("score"), ["malformed", "max_failed_fraction"], judge_scorer(),
         env={KEY_ENV: "k-123456"}, judge=lambda c, a: Action(body=b'{"choices": [')),
    Case("judge-server-errors", step("score"), ["HTTP 503"], judge_scorer(), env={KEY_ENV: "k-123456"},
         judge=lambda c, a: Action(status=503)),
    Case("judge-score-out-of-range", step("score"), ["score_range"], judge_scorer(score_range=[0, 10]),
         env={KEY_ENV: "k-123456"}, judge=lambda c, a: reply("Final Score: 99")),
    Case("judge-unreachable", step("score"), ["connection error"],
         judge_scorer(base_url="http://127.0.0.1:9/v1"), env={KEY_ENV: "k-123456"}),
]


# ---------------------------------------------------------------- running a case
def snapshot(root: Path) -> dict[str, str]:
    """Every file under results/ by its content hash."""
    files = sorted(p for p in (root / "results").rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


NOISE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) |\d+%\|")


@dataclass
class Outcome:
    code: int | None
    stderr: str
    traceback: bool
    lost: list[str]

    @property
    def lines(self) -> list[str]:
        """stderr without the job's log lines and progress bars: what is left is the message."""
        return [line for line in self.stderr.splitlines() if line.strip() and not NOISE.search(line)]


def run_step(argv: list[str], capsys) -> tuple[int | None, str, bool]:
    """``iteralign <argv>`` in this process: (exit code, stderr, whether it raised)."""
    import traceback

    from iteralign import cli

    logging.root.handlers.clear()  # each run logs to this case's captured stderr
    capsys.readouterr()
    try:
        code, raised = cli.main(argv), False
    except BaseException as exc:  # noqa: BLE001 (a case that escapes main is a traceback)
        if isinstance(exc, KeyboardInterrupt):
            raise
        code, raised = None, True
        sys.stderr.write("Traceback (most recent call last):\n" + "".join(traceback.format_exception(exc)))
    finally:
        logging.root.handlers.clear()
    return code, capsys.readouterr().err, raised


def run_case(case: Case, micro_run: Path, tmp_path: Path, monkeypatch, capsys) -> Outcome:
    work = tmp_path / "run"
    shutil.copytree(micro_run, work, symlinks=True)
    monkeypatch.chdir(work)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    if KEY_ENV not in case.env:
        monkeypatch.delenv(KEY_ENV, raising=False)
    sections = dict(case.config or {})
    if case.damage is not None:
        case.damage(work)
    config_file = work / ("bad.yaml" if case.config is not None or (work / "bad.yaml").exists() else "config.yaml")
    with FakeJudge(case.judge or (lambda c, a: reply("Final Score: 5"))) as judge:
        if "scoring" in sections and sections["scoring"].get("scorer") == "judge":
            sections["scoring"]["judge"] = {"base_url": judge.base_url, **sections["scoring"]["judge"]}
        if case.config is not None and not (work / "bad.yaml").exists():
            config_file.write_text(yaml.safe_dump(_config(**sections)))
        argv = [a.replace("{C}", str(config_file)) for a in case.argv]
        before = snapshot(work)
        code, stderr, raised = run_step(argv, capsys)
    after = snapshot(work)
    # lost: gone, or changed by a run that failed (a run that succeeds may replace its outputs)
    lost = [name for name, digest in before.items() if name not in after or (after[name] != digest and code != 0)]
    return Outcome(code, stderr, raised or "Traceback" in stderr, lost)


def classify(case: Case, outcome: Outcome) -> str:
    """clear / traceback / late / accepted (exit 0) / unclear (exit 2, but not one line naming it)."""
    if outcome.traceback:
        return "traceback"
    if outcome.code == 0:
        return "late" if case.parse_time else "accepted"
    lines = outcome.lines
    one = len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint:"))
    named = all(s.lower() in outcome.stderr.lower() for s in case.expect)
    return "clear" if outcome.code == 2 and one and named else "unclear"


def test_the_matrix_has_at_least_60_cases_with_unique_names():
    names = [case.id for case in CASES]
    assert len(names) >= 60 and len(set(names)) == len(names)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_with_one_line_naming_it_and_loses_nothing(case, micro_run, tmp_path, monkeypatch,
                                                                    capsys):
    outcome = run_case(case, micro_run, tmp_path, monkeypatch, capsys)
    record = os.environ.get("ITERALIGN_MATRIX_RECORD")
    if record:  # counting mode: one JSON line per case, for the before/after table
        with open(record, "a") as handle:
            handle.write(json.dumps({"case": case.id, "stage": case.argv[0], "class": classify(case, outcome),
                                     "lost": outcome.lost, "code": outcome.code,
                                     "stderr": outcome.stderr[-600:]}) + "\n")
    assert not outcome.traceback, outcome.stderr[-3000:]
    assert outcome.code == 2, outcome.stderr[-3000:]
    assert outcome.lines, "nothing on stderr"
    assert outcome.lines[0].startswith(f"iteralign {case.argv[0]}: error: "), outcome.lines
    assert len(outcome.lines) == 1 or (len(outcome.lines) == 2 and outcome.lines[1].startswith("hint: ")), \
        outcome.lines
    assert case.expect, case.id
    for expected in case.expect:
        assert expected.lower() in outcome.stderr.lower(), (expected, outcome.lines)
    assert outcome.lost == []


# ---------------------------------------------------------------- the Snakemake path (parse time)
SNAKEMAKE_CASES = {
    "reward-module-missing": (python_scorer("no_such_module:f"), ["scoring.python.function", "no_such_module"]),
    "judge-key-unset": (judge_scorer(base_url="http://127.0.0.1:9/v1"), ["scoring.judge.api_key_env", KEY_ENV]),
    "greedy-several-samples": ({"sampling": {**_config()["sampling"], "temperature": 0.0}},
                               ["sampling.temperature"]),
}


@pytest.mark.parametrize("name", sorted(SNAKEMAKE_CASES))
def test_snakemake_refuses_a_bad_config_at_parse_time_with_one_line(name, micro_run, tmp_path, monkeypatch):
    sections, expect = SNAKEMAKE_CASES[name]
    work = tmp_path / "run"
    shutil.copytree(micro_run, work, symlinks=True)
    (work / "bad.yaml").write_text(yaml.safe_dump(_config(**sections)))
    before, logs = snapshot(work), sorted((work / "logs").rglob("*"))
    env = {k: v for k, v in venv_env().items() if k != KEY_ENV}
    result = subprocess.run(snakemake_command(work, work / "bad.yaml", "--cores", "1"), capture_output=True, text=True,
                            env=env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if line.startswith("iteralign workflow: error: ")]
    assert len(errors) == 1, result.stderr
    assert expect, name
    for expected in expect:
        assert expected in errors[0]
    assert sorted((work / "logs").rglob("*")) == logs  # no job ran
    assert snapshot(work) == before
