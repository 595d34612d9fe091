"""HALOs interop both ways: we train on files HALOs' train/label.py writes, HALOs reads ours.

The HALOs files here are written from the fields HALOs documents: train/sample.py
writes samples with output, generator, dataset, prompt_id (an integer),
sample_id, type and prompt; train/label.py adds the reward, turns output into
a one-message assistant list, and writes pairwise, binary or scalar items.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from importlib import resources

import jsonschema
import pytest
import yaml
from helpers import micro_config

from iteralign import config as cfg
from iteralign.artifacts import write_json, write_parquet
from iteralign.feedback import build_feedback, load_feedback
from iteralign.reference import reference_logps
from iteralign.train.trainer import train_round

OUTPUTS = ["046", "045", "146", "056"]


def halos_samples() -> list[dict]:
    """Labelled samples as HALOs holds them just before building feedback (output already a list)."""
    samples = []
    for prompt_idx in range(4):
        prompt = [{"role": "user", "content": f"{12 + prompt_idx}+34"}]
        for sample_idx, text in enumerate(OUTPUTS):
            samples.append({
                "output": [{"role": "assistant", "content": f"{text}{prompt_idx}"}],
                "generator": "/models/llama3-8B-sft/FINAL",
                "dataset": "addition_train",
                "prompt_id": prompt_idx,
                "sample_id": sample_idx,
                "type": "sample",
                "prompt": prompt,
                "reward": float(3 - sample_idx) + 0.1 * prompt_idx,
            })
    return samples


def halos_pairwise(samples: list[dict]) -> list[dict]:
    """label.py's pairwise items (mode max): best against worst, 1 when A is preferred."""
    items = []
    for prompt_idx in sorted({s["prompt_id"] for s in samples}):
        group = sorted((s for s in samples if s["prompt_id"] == prompt_idx), key=lambda s: -s["reward"])
        a, b = (group[0], group[-1]) if prompt_idx % 2 else (group[-1], group[0])
        items.append({"prompt_id": prompt_idx, "prompt": a["prompt"], "output_A": a["output"],
                      "output_B": b["output"], "label": int(a["reward"] > b["reward"]),
                      "reward_A": a["reward"], "reward_B": b["reward"],
                      "reward_difference": abs(a["reward"] - b["reward"]), "type": "pairwise_feedback"})
    return items


def halos_binary(samples: list[dict]) -> list[dict]:
    """label.py's binary items with threshold median: label 1 when reward >= the median."""
    rewards = sorted(s["reward"] for s in samples)
    median = (rewards[len(rewards) // 2 - 1] + rewards[len(rewards) // 2]) / 2
    return [{"prompt_id": s["prompt_id"], "prompt": s["prompt"], "output": s["output"],
             "label": 1 if s["reward"] >= median else 0, "reward": s["reward"], "type": "binary_feedback"}
            for s in samples]


def halos_scalar(samples: list[dict]) -> list[dict]:
    """label.py's scalar items: the labelled samples themselves, typed scalar_feedback."""
    return [{**s, "type": "scalar_feedback"} for s in samples]


def write_halos_file(path, items) -> None:
    path.write_text(json.dumps(items, indent=2))


def feedback_schema() -> dict:
    return yaml.safe_load((resources.files("iteralign") / "schemas" / "feedback.schema.yaml").read_text())


def read_like_halos(items: list[dict]) -> dict:
    """What HALOs' get_feedback does with a file, reduced to the accesses that can fail.

    Items are grouped by prompt_id and every item of a prompt is read as the first
    one's type; pairwise outputs are looked up by output_X[0]["content"].
    """
    assert items, "HALOs refuses an empty feedback file"
    grouped = defaultdict(list)
    for item in items:
        grouped[item["prompt_id"]].append(item)
    examples = {}
    for prompt_id, group in grouped.items():
        kind = group[0]["type"]
        assert all(item["type"] == kind for item in group), prompt_id
        example = {"prompt": group[0]["prompt"], "generations": [], "scores": [], "pairs": [], "desirable": []}
        index: dict[str, int] = {}
        for item in group:
            if kind == "pairwise_feedback":
                for side in "AB":
                    text = item[f"output_{side}"][0]["content"]
                    if text not in index:
                        index[text] = len(example["generations"])
                        example["generations"].append(item[f"output_{side}"])
                        example["scores"].append(item[f"reward_{side}"])
                a, b = index[item["output_A"][0]["content"]], index[item["output_B"][0]["content"]]
                example["pairs"].append((a, b) if item["label"] == 1 else (b, a))
            else:
                example["generations"].append(item["output"])
                example["scores"].append(item["reward"])
                if kind == "binary_feedback":
                    example["desirable"].append(bool(item["label"]))
        examples[prompt_id] = example
    return examples


# ---------------------------------------------------------------- HALOs -> iteralign
@pytest.mark.parametrize("kind", ["pairwise", "binary", "scalar"])
def test_halos_files_load_with_every_field_understood(tmp_path, kind):
    samples = halos_samples()
    items = {"pairwise": halos_pairwise, "binary": halos_binary, "scalar": halos_scalar}[kind](samples)
    jsonschema.validate(items, feedback_schema())
    path = tmp_path / f"halos_{kind}.json"
    write_halos_file(path, items)
    loaded = load_feedback(path)
    assert len(loaded) == len(items)
    assert {item["prompt_id"] for item in loaded} == {"0", "1", "2", "3"}  # HALOs' integer ids, as strings
    if kind == "pairwise":
        chosen = [i["output_A_text"] if i["label"] == 1 else i["output_B_text"] for i in loaded]
        assert chosen == ["0460", "0461", "0462", "0463"]  # sample 0 has the highest reward
    else:
        assert [i["output_text"] for i in loaded] == [s["output"][0]["content"] for s in samples]


def _train_on(tmp_path, feedback_file, tiny_checkpoint, **sections) -> list[dict]:
    config = cfg.validate(micro_config(**sections))
    reference = tmp_path / "reflogps_r1.parquet"
    write_parquet(reference_logps(config, feedback_file, tiny_checkpoint), reference)
    metrics = tmp_path / "train_r1.jsonl"
    train_round(config, 1, [feedback_file], [reference], tiny_checkpoint, tmp_path / "ckpt_r1" / "FINAL", metrics)
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def test_dpo_trains_on_a_halos_pairwise_file(tmp_path, tiny_checkpoint):
    feedback = tmp_path / "halos_pairwise.json"
    write_halos_file(feedback, halos_pairwise(halos_samples()))
    rows = _train_on(tmp_path, feedback, tiny_checkpoint)
    assert sum(row["examples"] for row in rows) == 4  # every HALOs pair was trained on
    assert rows[0]["margin"] == pytest.approx(0.0, abs=1e-6) and all(math.isfinite(r["loss"]) for r in rows)


def test_kto_trains_on_a_halos_binary_file(tmp_path, tiny_checkpoint):
    feedback = tmp_path / "halos_binary.json"
    write_halos_file(feedback, halos_binary(halos_samples()))
    rows = _train_on(tmp_path, feedback, tiny_checkpoint, feedback={"type": "binary"},
                     training={"loss": "kto", "lr": 1e-3})
    assert sum(row["examples"] for row in rows) == 16
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5) and all(math.isfinite(r["loss"]) for r in rows)


# ---------------------------------------------------------------- iteralign -> HALOs
def our_samples() -> list[dict]:
    rows = []
    for p in range(5):
        prompt = [{"role": "user", "content": f"{10 + p}+{20 + p}"}]
        rewards = [0.5, 0.5, 0.5, 0.5] if p == 4 else [float((s * 3 + p) % 4) for s in range(4)]
        for s in range(4):
            rows.append({"prompt_id": f"{p:016x}", "sample_id": s, "prompt": prompt, "output": f"{30 + p}{s}",
                         "reward": math.nan if (p, s) == (1, 2) else rewards[s]})
    return rows


SETTINGS = [
    {"type": "pairwise", "pairwise": {"mode": mode}} for mode in ("random", "max", "min", "all")
] + [
    {"type": "pairwise", "pairwise": {"mode": "all", "threshold": {"quantile": 0.5}}},
    {"type": "binary", "binary": {"threshold": "median"}},
    {"type": "binary", "binary": {"threshold": {"quantile": 0.75}, "scope": "prompt"}},
    {"type": "scalar"},
]


@pytest.mark.parametrize("feedback", SETTINGS, ids=lambda f: json.dumps(f, sort_keys=True))
def test_our_feedback_files_read_as_halos_reads_them(tmp_path, feedback):
    defaults = cfg.validate({})["feedback"]  # scalar feedback has no loss yet, so no whole config takes it
    section = {**defaults, **feedback, **{k: {**defaults[k], **v} for k, v in feedback.items() if isinstance(v, dict)}}
    items, _ = build_feedback(our_samples(), {"seed": 0, "feedback": section}, round_n=1)
    path = tmp_path / "feedback_r1.json"
    write_json(items, path)

    def no_nan(constant):
        raise AssertionError(f"{constant} in a feedback file: HALOs' json.load would accept it, JSON does not")

    on_disk = json.loads(path.read_text(), parse_constant=no_nan)
    jsonschema.validate(on_disk, feedback_schema())
    for example in read_like_halos(on_disk).values():
        for better, worse in example["pairs"]:
            assert example["scores"][better] > example["scores"][worse]
        assert not any(math.isnan(score) for score in example["scores"])
