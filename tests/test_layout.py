"""iteralign.layout: the names a run writes, and reading a round back from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from iteralign import layout


def test_round_names_and_the_rules_wildcard_patterns():
    assert [layout.samples(2), layout.rewards(2), layout.feedback(2), layout.reference_logps(2)] == [
        "samples_r2.parquet", "rewards_r2.parquet", "feedback_r2.json", "reflogps_r2.parquet"]
    assert [layout.training_metrics(2), layout.eval_table(2), layout.eval_summary(2)] == [
        "train_r2.jsonl", "eval_r2.parquet", "eval_r2.json"]
    assert (layout.checkpoint(2), layout.pruned_record(2)) == ("ckpt_r2/FINAL", "ckpt_r2/pruned.json")
    assert layout.samples("{n}") == "samples_r{n}.parquet" and layout.checkpoint("{n}") == "ckpt_r{n}/FINAL"
    assert (layout.step_log("round_summary", 3), layout.benchmark("plan")) == ("round_summary_r3.log", "plan.tsv")


@pytest.mark.parametrize(("name", "parsed"), [
    ("samples_r12.parquet", ("samples", 12, "parquet")),
    ("train_r1.jsonl", ("train", 1, "jsonl")),
    ("ckpt_r3", ("ckpt", 3, None)),
    ("prune_checkpoint_r4.tsv", ("prune_checkpoint", 4, "tsv")),
    ("feedback_r1.json.meta.json", None),
    ("audit.tsv", None),
    ("all_rounds.parquet", None),
])
def test_the_round_file_pattern_reads_a_round_from_each_name_the_layout_writes(name, parsed):
    assert layout.parse_round_file(name) == parsed


def test_round_files_lists_one_kind_by_round_and_round_of_reads_checkpoints(tmp_path):
    for name in ("eval_r10.json", "eval_r2.json", "eval_r2.parquet", "eval_r2.json.meta.json", "train_r1.jsonl"):
        (tmp_path / name).write_text("{}")
    assert layout.round_files(tmp_path, "eval", "json") == [(2, tmp_path / "eval_r2.json"),
                                                           (10, tmp_path / "eval_r10.json")]
    assert layout.round_of(Path("results/exp_r9/ckpt_r3/FINAL")) == 3
    assert layout.round_of(Path("results/exp_r9/prompts.parquet")) is None
