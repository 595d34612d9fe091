"""Lagged rounds (sampling.lag): round n samples from ckpt_r{n-1-lag}, so round n+1's sampling
does not wait for round n's training; GRPO's ratio uses the log-probs of the checkpoint that
sampled; provenance and the audit name that checkpoint; re-running a round leaves earlier ones."""

from __future__ import annotations

import json
import re

import pytest
from feedback_data import write_feedback
from helpers import (
    EXP,
    commands_by_step,
    copy_run,
    dry_run,
    dry_run_jobs,
    micro_config,
    new_workdir,
    run_cli,
    snakemake,
)

from iteralign import config as cfg
from iteralign.artifacts import read_parquet, read_provenance, write_parquet
from iteralign.audit import audit_rows
from iteralign.errors import UserError
from iteralign.layout import round_of_checkpoint
from iteralign.reference import completion_logps, old_policy_logps
from iteralign.train.trainer import train_round

GRPO = {"feedback": {"type": "scalar"}, "training": {"loss": "grpo"}}


def _sampling_checkpoints(commands: list[str]) -> dict[int, int]:
    """round -> round of the checkpoint its sample (or old-policy) command reads."""
    found = {}
    for command in commands:
        round_n = int(re.search(r"--round (\d+)", command).group(1))
        found[round_n] = round_of_checkpoint(re.search(r"--checkpoint (\S+)", command).group(1))
    return found


# ---------------------------------------------------------------- the DAG (dry runs)
@pytest.mark.workflow
def test_lag_one_samples_from_two_rounds_back_and_lag_zero_from_the_previous_round(tmp_path):
    on_policy = commands_by_step(tmp_path / "lag0")
    lagged = commands_by_step(tmp_path / "lag1", sampling={"lag": 1})
    assert _sampling_checkpoints(on_policy["sample"]) == {1: 0, 2: 1, 3: 2}
    assert _sampling_checkpoints(lagged["sample"]) == {1: 0, 2: 0, 3: 1}
    # training still resumes from the previous round: only what samples changes
    assert _sampling_checkpoints(lagged["train"]) == _sampling_checkpoints(on_policy["train"]) == {1: 0, 2: 1, 3: 2}
    assert "old-policy" not in lagged  # DPO has no importance ratio: no old-policy job


@pytest.mark.workflow
def test_with_lag_one_round_n_plus_one_samples_without_waiting_for_round_n_training(tmp_path):
    """The jobs that produce samples_r3: with lag 1 they stop at round 1's training."""
    def rules_for_samples_r3(workdir):
        jobs = dry_run_jobs(workdir, workdir / "config.yaml", "--cores", "2", str(EXP / "samples_r3.parquet"))
        assert jobs, "the dry run planned nothing"
        return sorted(re.search(r"--round (\d+)", j["shell"]).group(0) + " " + j["rule"] for j in jobs
                      if j["shell"] and "--round" in j["shell"])

    on_policy = rules_for_samples_r3(new_workdir(tmp_path / "lag0"))
    lagged = rules_for_samples_r3(new_workdir(tmp_path / "lag1", sampling={"lag": 1}))
    assert "--round 2 train" in on_policy and "--round 3 sample" in on_policy
    assert "--round 3 sample" in lagged and "--round 1 train" in lagged
    assert not [job for job in lagged if job.startswith("--round 2")]  # nothing of round 2, its training least of all


@pytest.mark.workflow
def test_lag_set_on_the_command_line_reaches_the_rules(tmp_path):
    workdir = new_workdir(tmp_path)
    jobs = dry_run_jobs(workdir, workdir / "config.yaml", "--cores", "2", "--config", "sampling={lag: 1}",
                        "checkpoints={keep_last: 1}")
    samples = [j["shell"] for j in jobs if j["rule"] == "sample"]
    assert _sampling_checkpoints(samples) == {1: 0, 2: 0, 3: 1}
    assert [j for j in jobs if j["rule"] == "prune_checkpoint"]


@pytest.mark.workflow
def test_grpo_under_lag_scores_each_round_with_its_sampling_checkpoint_even_without_a_reference(tmp_path):
    commands = commands_by_step(tmp_path / "grpo", sampling={"lag": 1},
                                **{**GRPO, "training": {"loss": "grpo", "grpo": {"kl_weight": 0.0}}})
    assert "reference" not in commands  # kl_weight 0: reference-free
    assert _sampling_checkpoints(commands["old-policy"]) == {1: 0, 2: 0, 3: 1}
    assert len(commands["train"]) == 3
    for command in commands["train"]:
        round_n = re.search(r"--round (\d+)", command).group(1)
        assert re.search(rf"--old-policy \S+/oldlogps_r{round_n}\.parquet ", command)
    assert "old-policy" not in commands_by_step(tmp_path / "grpo0", **GRPO)  # on policy: scored in the train job


@pytest.mark.workflow
def test_checkpoint_retention_waits_for_the_lagged_round_that_samples_from_it(tmp_path):
    workdir = new_workdir(tmp_path, sampling={"lag": 1}, checkpoints={"keep_last": 1}, **GRPO)
    plan = dry_run(workdir, workdir / "config.yaml").stdout
    inputs = re.findall(r"input: (.*)\n    output: results/micro/ckpt_r1/pruned.json", plan)
    assert inputs, plan[-2000:]
    assert "samples_r3.parquet" in inputs[0] and "oldlogps_r3.parquet" in inputs[0]


# ---------------------------------------------------------------- GRPO's ratio (in process)
def test_grpo_ratio_uses_the_old_policy_table_of_the_sampling_checkpoint(tmp_path, tiny_checkpoint):
    """Lowering every old-policy log-prob by delta per token raises every ratio by exp(delta):
    the first step's logged ratio moves exactly so, whatever the policy."""
    config = cfg.validate(micro_config(sampling={"lag": 1}, feedback={"type": "scalar"},
                                       training={"loss": "grpo", "lr": 1e-3, "batch_size": 8, "micro_batch_size": 4,
                                                 "grpo": {"kl_weight": 0.0}}))
    feedback = write_feedback(tmp_path, "scalar")
    table = old_policy_logps(config, feedback, tiny_checkpoint)
    assert len(table) > 0 and table["old_policy_logp"].notna().all()
    delta = 0.25
    shifted = table.assign(old_policy_logp=table["old_policy_logp"] - delta * table["num_tokens"])
    first_ratio = {}
    for name, frame in (("table", table), ("shifted", shifted)):
        path = tmp_path / f"oldlogps_{name}.parquet"
        write_parquet(frame, path)
        metrics = tmp_path / f"train_{name}.jsonl"
        train_round(config, 2, [feedback], [], tiny_checkpoint, tmp_path / name / "FINAL", metrics,
                    old_policy_paths=[path])
        first_ratio[name] = json.loads(metrics.read_text().splitlines()[0])["ratio"]
    assert first_ratio["table"] == pytest.approx(1.0, abs=1e-5)  # the table is this policy's own
    assert first_ratio["shifted"] == pytest.approx(first_ratio["table"] * 2.718281828 ** delta, rel=1e-4)


def test_grpo_under_lag_without_an_old_policy_table_is_refused_before_loading_anything(tmp_path):
    config = cfg.validate(micro_config(sampling={"lag": 1}, **GRPO))
    with pytest.raises(UserError, match=r"sampling.lag 1: the train step needs --old-policy"):
        train_round(config, 2, [tmp_path / "feedback_r2.json"], [], tmp_path / "missing", tmp_path / "out",
                    tmp_path / "train_r2.jsonl")


def test_old_policy_table_equals_the_log_probs_the_reference_computation_gives(tmp_path, tiny_checkpoint):
    config = cfg.validate(micro_config(sampling={"lag": 1}, **GRPO))
    feedback = write_feedback(tmp_path, "scalar")
    old = old_policy_logps(config, feedback, tiny_checkpoint)
    same = completion_logps(config, feedback, tiny_checkpoint, "reference_logp")
    assert len(old) > 0
    assert list(old["old_policy_logp"]) == list(same["reference_logp"])


# ---------------------------------------------------------------- a real lagged run
@pytest.fixture(scope="module")
def lagged_run(tmp_path_factory):
    workdir = new_workdir(tmp_path_factory.mktemp("lagged"), sampling={"lag": 1}, **GRPO)
    snakemake(workdir)
    return workdir


@pytest.mark.workflow
def test_each_round_records_and_audits_the_checkpoint_that_sampled_it(lagged_run):
    results = lagged_run / EXP
    recorded = {n: read_provenance(results / f"samples_r{n}.parquet") for n in (1, 2, 3)}
    assert {n: p["sampling_round"] for n, p in recorded.items()} == {1: 0, 2: 0, 3: 1}
    assert all(p["lag"] == 1 for p in recorded.values())
    assert recorded[3]["inputs"]["checkpoint"]["path"].endswith("ckpt_r1/FINAL")
    assert set(read_parquet(results / "samples_r3.parquet")["generator"]) == {str(EXP / "ckpt_r1" / "FINAL")}
    rows = {r["round"]: r for r in audit_rows(results)}
    assert {n: rows[n].get("sampled_by") for n in (1, 2, 3)} == {1: "ckpt_r0", 2: "ckpt_r0", 3: "ckpt_r1"}
    # the old-policy table of round 3 came from ckpt_r1, and the train job read it
    old_policy = read_provenance(results / "oldlogps_r3.parquet")
    assert old_policy["inputs"]["checkpoint"]["path"].endswith("ckpt_r1/FINAL")
    assert read_provenance(results / "train_r3.jsonl")["inputs"]["old_policy_0"]["path"].endswith("oldlogps_r3.parquet")


@pytest.mark.workflow
def test_sample_refuses_a_checkpoint_that_the_lag_does_not_name(lagged_run, tmp_path):
    results = lagged_run / EXP
    config = next((results / "config").glob("config_*.yaml"))
    result = run_cli("sample", "--config", str(config), "--round", "3", "--prompts", str(results / "prompts.parquet"),
                     "--checkpoint", str(results / "ckpt_r2" / "FINAL"), "--output", str(tmp_path / "s.parquet"),
                     cwd=lagged_run, check=False)
    assert result.returncode == 2
    assert "round 3 samples from ckpt_r1 with sampling.lag 1, found ckpt_r2" in result.stderr
    assert not (tmp_path / "s.parquet").exists()


@pytest.mark.workflow
def test_rerunning_a_round_under_lag_leaves_earlier_rounds_and_the_later_sample_untouched(lagged_run, tmp_path):
    workdir = copy_run(lagged_run, tmp_path / "rerun")
    results = workdir / EXP

    def fingerprint():
        files = [p for p in results.rglob("*") if p.is_file() and "config" not in p.parts]
        return {str(p.relative_to(results)): p.stat().st_mtime_ns for p in files}

    before = fingerprint()
    assert any(name.startswith("ckpt_r1/") for name in before)
    snakemake(workdir, "--forcerun", str(EXP / "feedback_r2.json"))
    after = fingerprint()
    redone = {name for name in before if after.get(name) != before[name]}
    assert "feedback_r2.json" in redone and "train_r2.jsonl" in redone and "train_r3.jsonl" in redone
    round_1 = [name for name in before if re.search(r"_r1[./]", name)]
    assert round_1 and not redone & set(round_1)
    # round 3 samples from ckpt_r1, which did not change: its samples and their scores stay
    assert not redone & {"samples_r3.parquet", "rewards_r3.parquet", "samples_r2.parquet", "rewards_r2.parquet"}


def test_a_negative_lag_is_one_line_naming_the_key():
    with pytest.raises(cfg.ConfigError, match=r"sampling.lag.*-1"):
        cfg.validate(micro_config(sampling={"lag": -1}))
