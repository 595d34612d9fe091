"""The whole loop through Snakemake at micro scale (3 rounds, a few prompts).

One run is shared by the tests below; tests that change a run work on a copy of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import EXP, copy_run, micro_config, new_workdir, snakemake, venv_env, workflow_command

from iteralign.artifacts import artifact_sha256, read_provenance

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    workdir = new_workdir(tmp_path_factory.mktemp("wf") / "a")
    snakemake(workdir)
    return workdir


def round_files(workdir: Path, n: int) -> list[Path]:
    names = [f"samples_r{n}.parquet", f"rewards_r{n}.parquet", f"feedback_r{n}.json", f"reflogps_r{n}.parquet",
             f"train_r{n}.jsonl", f"eval_r{n}.parquet", f"eval_r{n}.json", f"ckpt_r{n}/FINAL"]
    return [workdir / EXP / name for name in names]


def test_dry_run_plans_exactly_the_rounds(tmp_path):
    workdir = new_workdir(tmp_path / "dry", prompts={"num_generated": 80, "per_round": 30})
    out = subprocess.run(workflow_command(workdir, "config.yaml", "-n", "--quiet", "rules"), capture_output=True,
                         text=True, env=venv_env())
    assert out.returncode == 0, out.stderr
    counts = {line.split()[0]: int(line.split()[1]) for line in out.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    # 80 generated -> 78 distinct (2 repeats), 12 held out, 66 left: ceil(66/30) = 3 rounds
    assert counts["train"] == counts["sample"] == 3 and counts["evaluate"] == 4


def test_every_round_writes_its_artefacts_with_provenance(run):
    for n in (1, 2, 3):
        for path in round_files(run, n):
            assert path.exists(), path
        assert (run / "logs/micro" / f"train_r{n}.log").exists()
        assert (run / "benchmarks/micro" / f"sample_r{n}.tsv").exists()
    samples = pd.read_parquet(run / EXP / "samples_r1.parquet")
    assert list(samples.columns) == ["round", "prompt_id", "sample_id", "prompt", "prompt_text", "output",
                                     "num_output_tokens", "finish_reason", "generator", "seed"]
    assert samples.groupby("prompt_id").size().eq(4).all()
    rewards = pd.read_parquet(run / EXP / "rewards_r1.parquet")
    assert {"prompt_id", "sample_id", "reward", "reward_raw", "length_penalty", "scorer", "error"} <= set(rewards)
    meta = read_provenance(run / EXP / "rewards_r1.parquet")
    assert meta["inputs"]["samples"]["sha256"] == artifact_sha256(run / EXP / "samples_r1.parquet")
    assert meta["config_hash"] and meta["seed"] == 0
    summary = json.loads((run / EXP / "eval_r3.json").read_text())
    assert {"round", "num_prompts", "mean_reward", "reward_ci95", "win_rate_vs_r0", "win_rate_ci95",
            "mean_output_tokens", "kl_to_reference", "failed_scores"} <= set(summary)
    assert json.loads((run / EXP / "eval_r0.json").read_text())["kl_to_reference"] == 0.0
    audit = (run / EXP / "audit.tsv").read_text().splitlines()
    assert len(audit) == 1 + 4  # header and rounds 0..3


def test_round_three_reference_logps_are_the_sft_models(run):
    from iteralign import config as cfg
    from iteralign.reference import reference_logps

    config = cfg.load(next((run / EXP / "config").glob("config_*.yaml")))
    stored = pd.read_parquet(run / EXP / "reflogps_r3.parquet")
    from_sft = reference_logps(config, run / EXP / "feedback_r3.json", run / EXP / "ckpt_r0/FINAL")
    from_r2 = reference_logps(config, run / EXP / "feedback_r3.json", run / EXP / "ckpt_r2/FINAL")
    assert len(stored) > 0
    assert np.allclose(stored["reference_logp"], from_sft["reference_logp"], atol=1e-4)
    assert not np.allclose(stored["reference_logp"], from_r2["reference_logp"], atol=1e-4)


def test_forcing_feedback_r2_rebuilds_round_2_on_and_leaves_round_1_untouched(run, tmp_path):
    workdir = copy_run(run, tmp_path / "forced")
    before = {p: (artifact_sha256(p), p.stat().st_mtime_ns) for p in round_files(workdir, 1)}
    r2_before = {p: p.stat().st_mtime_ns for p in round_files(workdir, 2)[2:]}
    out = snakemake(workdir, "--forcerun", str(EXP / "feedback_r2.json"))
    assert f"output: {EXP / 'feedback_r1.json'}" not in out.stderr  # (the report still lists it as an input)
    for path, (digest, mtime) in before.items():
        assert (artifact_sha256(path), path.stat().st_mtime_ns) == (digest, mtime), path
    for path, mtime in r2_before.items():  # feedback, reference, train, eval of round 2 were rebuilt
        assert path.stat().st_mtime_ns > mtime, path
    assert (workdir / EXP / "ckpt_r3/FINAL").stat().st_mtime_ns > r2_before[workdir / EXP / "ckpt_r2/FINAL"]


def test_same_seed_gives_identical_samples_feedback_and_eval(run, tmp_path):
    other = new_workdir(tmp_path / "b")
    snakemake(other, str(EXP / "eval_r2.json"))  # builds rounds 1-2 and evaluates rounds 0-2
    for name in ("samples_r1.parquet", "samples_r2.parquet", "eval_r0.parquet", "eval_r2.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(run / EXP / name), pd.read_parquet(other / EXP / name))
    for name in ("feedback_r1.json", "feedback_r2.json", "eval_r0.json", "eval_r2.json"):
        assert (run / EXP / name).read_bytes() == (other / EXP / name).read_bytes(), name


def test_killed_training_leaves_no_final_and_a_rerun_completes_the_round(run, tmp_path):
    workdir = copy_run(run, tmp_path / "killed")
    slow = micro_config(training={"epochs": 400})  # ~1,200 steps: long enough to be killed mid-round
    (workdir / "slow.yaml").write_text(yaml.safe_dump(slow))
    final = workdir / EXP / "ckpt_r3/FINAL"
    log = workdir / "logs/micro/train_r3.log"
    # as if the first run had just reached round 3's training
    shutil.rmtree(workdir / EXP / "ckpt_r3")
    for name in ("train_r3.jsonl", "eval_r3.parquet", "eval_r3.json", "audit.tsv"):
        (workdir / EXP / name).unlink()
    log.unlink()
    proc = subprocess.Popen(workflow_command(workdir, "slow.yaml"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=venv_env(), start_new_session=True)
    def steps_logged():
        return len(re.findall(r"round 3 step \d+ loss", log.read_text())) if log.exists() else 0

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and steps_logged() < 5:
        time.sleep(0.05)
    assert steps_logged() >= 5, "training of round 3 never started"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not final.exists()
    assert not (workdir / EXP / "train_r3.jsonl").exists()
    snakemake(workdir, "--unlock", configfile="slow.yaml")
    snakemake(workdir, configfile="slow.yaml")
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["round"] == 3 and state["epochs"] == 400
    assert (workdir / EXP / "eval_r3.json").exists()
    assert not list(final.parent.glob(".FINAL.tmp-*"))


# ---------------------------------------------------------------- checkpoint retention (docs/cluster.md)
@pytest.fixture(scope="module")
def pruned_run(run, tmp_path_factory) -> Path:
    """The run again with checkpoints.keep_last 1: only the prune jobs run (retention is not in the config hash)."""
    workdir = copy_run(run, tmp_path_factory.mktemp("pruned") / "run")
    (workdir / "keep_last.yaml").write_text(yaml.safe_dump(micro_config(checkpoints={"keep_last": 1})))
    snakemake(workdir, configfile="keep_last.yaml")
    return workdir


def test_keep_last_deletes_older_checkpoints_once_trained_and_keeps_the_last_and_the_sft(pruned_run):
    exp = pruned_run / EXP
    for n in (1, 2):
        assert not (exp / f"ckpt_r{n}/FINAL").exists()
        assert json.loads((exp / f"ckpt_r{n}/pruned.json").read_text())["deleted"] is True
    assert (exp / "ckpt_r3/FINAL/trainer_state.json").exists()
    assert (exp / "ckpt_r0/FINAL/config.json").exists()
    # the deleted checkpoints were consumed as pruned.json recorded them: provenance still verifies
    from iteralign.audit import verify_provenance

    checked, problems = verify_provenance(exp)
    assert checked > 10 and problems == []


def test_deleted_checkpoints_do_not_make_snakemake_rerun_finished_rounds(pruned_run):
    dry = snakemake(pruned_run, "-n", configfile="keep_last.yaml")
    assert "Nothing to be done" in dry.stdout + dry.stderr
    before = {p: p.stat().st_mtime_ns for p in (pruned_run / EXP).rglob("*") if p.is_file()}
    snakemake(pruned_run, configfile="keep_last.yaml")
    assert {p: p.stat().st_mtime_ns for p in (pruned_run / EXP).rglob("*") if p.is_file()} == before


def test_evaluation_compares_each_round_with_round_0_and_the_round_before(run):
    r0, r1 = (json.loads((run / EXP / f"eval_r{n}.json").read_text()) for n in (0, 1))
    assert r0["length_controlled_reward"] == pytest.approx(r0["mean_reward"])
    assert r1["win_rate_vs_previous"] == r1["win_rate_vs_r0"]  # round 1's previous round is round 0
    meta = read_provenance(run / EXP / "eval_r2.parquet")
    assert meta["inputs"]["previous"]["sha256"] == artifact_sha256(run / EXP / "eval_r1.parquet")
    assert meta["decoding"]["max_new_tokens"] == 5


def test_run_ends_with_a_verified_report_that_snakemake_report_includes(run, tmp_path):
    html = (run / EXP / "report.html").read_text()
    assert html.count('<img class="plot"') == 7 and "Provenance verified" in html
    out = tmp_path / "snakemake_report.html"
    snakemake(run, "--report", str(out))
    text = out.read_text()
    assert "report.html" in text and "Held-out evaluation of round 3" in text
