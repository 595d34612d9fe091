"""`iteralign export --format trl`: feedback files as TRL datasets, loaded back with `datasets`."""

from __future__ import annotations

import json
from pathlib import Path

from feedback_data import write_feedback
from helpers import run_cli

from iteralign.artifacts import write_json

ROUNDS = (1, 2)


def write_experiment(folder: Path, kind: str) -> Path:
    """results/<exp> with the feedback files of two rounds, as the feedback step writes them."""
    experiment = folder / "results" / "exp"
    experiment.mkdir(parents=True)
    for n in ROUNDS:
        write_feedback(folder, kind, round_n=n, n_prompts=5, offset=10 * n).rename(experiment / f"feedback_r{n}.json")
    return experiment


def load(paths: list[Path], cache: Path):
    import datasets

    return datasets.load_dataset("parquet", data_files=[str(p) for p in paths], split="train", cache_dir=str(cache))


def export(experiment: Path) -> list[Path]:
    out = run_cli("export", str(experiment), "--format", "trl")
    written = [Path(line) for line in out.stdout.splitlines()]
    trl = experiment / "export" / "trl"
    assert written == [trl / "feedback_r1.parquet", trl / "feedback_r2.parquet", trl / "all_rounds.parquet"]
    return written


def feedback(experiment: Path, n: int) -> list[dict]:
    items = json.loads((experiment / f"feedback_r{n}.json").read_text())
    assert items
    return items


def assert_messages(value, roles: list[str]) -> None:
    """A message list stays a list of {role, content} dicts after the round trip."""
    assert isinstance(value, list) and [m["role"] for m in value] == roles
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in value)


def test_pairwise_feedback_becomes_trls_preference_type(tmp_path):
    experiment = write_experiment(tmp_path, "pairwise")
    written = export(experiment)
    for n, path in zip(ROUNDS, written, strict=False):
        dataset = load([path], tmp_path / "cache")
        assert {"prompt", "chosen", "rejected"} <= set(dataset.column_names)
        items = feedback(experiment, n)
        assert len(dataset) == len(items)
        for row, item in zip(dataset, items, strict=True):
            winner, loser = ("A", "B") if item["label"] == 1 else ("B", "A")
            assert_messages(row["prompt"], ["user"])
            assert_messages(row["chosen"], ["assistant"])
            assert row["prompt"] == item["prompt"]
            assert row["chosen"] == item[f"output_{winner}"] and row["rejected"] == item[f"output_{loser}"]
            assert (row["score_chosen"], row["score_rejected"]) == (item[f"reward_{winner}"], item[f"reward_{loser}"])
            assert row["score_chosen"] > row["score_rejected"]
            assert (row["prompt_id"], row["round"]) == (item["prompt_id"], n)
    every_round = load([written[-1]], tmp_path / "cache")
    assert len(every_round) == sum(len(feedback(experiment, n)) for n in ROUNDS)
    assert every_round["round"] == [n for n in ROUNDS for _ in feedback(experiment, n)]


def test_binary_feedback_becomes_trls_unpaired_preference_type(tmp_path):
    experiment = write_experiment(tmp_path, "binary")
    written = export(experiment)
    dataset = load(written[:2], tmp_path / "cache")  # the per-round files together
    items = feedback(experiment, 1) + feedback(experiment, 2)
    assert len(dataset) == len(items)
    assert {True, False} == {row["label"] for row in dataset}
    for row, item in zip(dataset, items, strict=True):
        assert_messages(row["prompt"], ["user"])
        assert_messages(row["completion"], ["assistant"])
        assert row["prompt"] == item["prompt"] and row["completion"] == item["output"]
        assert row["label"] is (item["label"] == 1) and row["reward"] == item["reward"]
        assert (row["prompt_id"], row["round"]) == (item["prompt_id"], item["round"])


def test_an_empty_feedback_file_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    experiment = write_experiment(tmp_path, "pairwise")
    write_json([], experiment / "feedback_r2.json")  # the feedback step never writes one; a hand-made file may
    out = run_cli("export", str(experiment), "--format", "trl", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "feedback_r2.json: no feedback items" in out.stderr
    assert not (experiment / "export").exists()


def test_scalar_feedback_is_refused_in_one_line(tmp_path):
    experiment = write_experiment(tmp_path, "scalar")
    out = run_cli("export", str(experiment), "--format", "trl", check=False)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "feedback_r1.json" in out.stderr and "scalar_feedback has no TRL dataset type" in out.stderr
    assert not (experiment / "export").exists()
