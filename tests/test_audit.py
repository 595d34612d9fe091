"""`iteralign audit`: the per-round table and provenance verification, on a crafted experiment."""

import json
import shutil

import pytest
from helpers import run_cli

from iteralign.artifacts import write_json
from iteralign.audit import audit_rows, experiment_workdir, verify_provenance


def test_a_consistent_experiment_verifies(crafted):
    checked, problems = verify_provenance(crafted)
    assert problems == []
    assert checked == 16  # prompts, 3 checkpoints, 2 x (samples, rewards, feedback), 3 x eval (json + parquet)


def test_an_input_rewritten_after_it_was_consumed_is_flagged_naming_both_files(crafted):
    write_json([], crafted / "feedback_r1.json", {"step": "feedback", "inputs": {}})  # as a re-run of feedback alone
    _, problems = verify_provenance(crafted)
    assert [(p.kind, p.artefact, p.input) for p in problems] == [
        ("changed", str(crafted / "ckpt_r1/FINAL"), "results/crafted/feedback_r1.json")]
    assert "feedback_r1.json changed after FINAL consumed it" in problems[0].message


def test_a_hand_edited_file_is_flagged_against_its_own_sidecar(crafted):
    path = crafted / "feedback_r2.json"
    items = json.loads(path.read_text())
    items[0]["label"] = 0
    path.write_text(json.dumps(items))
    _, problems = verify_provenance(crafted)
    kinds = {(p.kind, p.artefact) for p in problems}
    assert ("modified", str(path)) in kinds
    assert ("changed", str(crafted / "ckpt_r2/FINAL")) in kinds


def test_a_missing_input_is_flagged(crafted):
    (crafted / "samples_r2.parquet").unlink()
    _, problems = verify_provenance(crafted)
    missing = [p for p in problems if p.kind == "missing"]
    assert {p.artefact for p in missing} == {str(crafted / "rewards_r2.parquet"), str(crafted / "feedback_r2.json")}
    assert all(p.input == "results/crafted/samples_r2.parquet" for p in missing)


def test_a_rewritten_checkpoint_is_caught_only_by_a_deep_check(crafted):
    (crafted / "ckpt_r1/FINAL/model.safetensors").write_bytes(b"tampered")
    assert verify_provenance(crafted)[1] == []
    _, problems = verify_provenance(crafted, deep=True)
    assert [(p.kind, p.artefact) for p in problems] == [("modified", str(crafted / "ckpt_r1/FINAL"))]


def test_recorded_paths_resolve_from_another_folder(crafted, tmp_path, monkeypatch):
    moved = shutil.copytree(tmp_path / "results", tmp_path / "elsewhere/results")
    monkeypatch.chdir(tmp_path / "elsewhere/results")
    assert experiment_workdir(moved / "crafted", ["results/crafted/x.parquet"]) == tmp_path / "elsewhere"
    assert verify_provenance(moved / "crafted")[1] == []


def test_audit_rows_carry_the_new_evaluation_fields(crafted):
    rows = {r["round"]: r for r in audit_rows(crafted)}
    assert rows[2]["win_rate_vs_previous"] == pytest.approx((0.5 * 5 + 1) / 6)
    assert rows[2]["max_length_fraction"] == pytest.approx(1 / 6)
    assert rows[1]["pairs"] == 2 and rows[1]["prompts_dropped"] == 1


def test_audit_command_prints_problems_and_fails_only_when_strict(crafted, tmp_path):
    write_json([], crafted / "feedback_r1.json", {"step": "feedback", "inputs": {}})
    plain = run_cli("audit", str(crafted), cwd=tmp_path)
    assert "provenance: 1 problem(s)" in plain.stdout and "feedback_r1.json" in plain.stdout
    strict = run_cli("audit", str(crafted), "--strict", cwd=tmp_path, check=False)
    assert strict.returncode == 1
    machine = json.loads(run_cli("audit", str(crafted), "--json", cwd=tmp_path).stdout)
    assert [r["round"] for r in machine["rounds"]] == [0, 1, 2]
    assert machine["provenance"]["problems"][0]["input"] == "results/crafted/feedback_r1.json"
