"""Losing nothing and raising no false alarm, on folders real Snakemake runs wrote (micro scale).

A failed re-run puts back what it removed; two runs of one experiment are refused; the audit
is clean on an untouched run and catches a folder two seeds wrote; redoing the last round
leaves earlier rounds alone under the default retention; external inputs count by content.
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

import pytest
import yaml
from helpers import (
    EXP,
    copy_run,
    micro_config,
    new_workdir,
    run_cli,
    snakemake,
    venv_env,
    workflow_command,
)

from iteralign.artifacts import dir_sha256, file_sha256

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory) -> Path:
    workdir = new_workdir(tmp_path_factory.mktemp("recovery") / "a")
    snakemake(workdir)
    return workdir


def run_snakemake(workdir: Path, *args: str, configfile: str = "config.yaml") -> subprocess.CompletedProcess:
    """snakemake that may fail (the caller looks at the outcome)."""
    return subprocess.run(workflow_command(workdir, configfile, *args), capture_output=True, text=True, env=venv_env())


def planned_jobs(dry_run: subprocess.CompletedProcess) -> dict[str, int]:
    """The "Job stats" table of a dry run: rule -> count."""
    table = dry_run.stdout.split("Job stats:", 1)[1].split("total", 1)[0] if "Job stats:" in dry_run.stdout else ""
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, flags=re.M)}


def tree_state(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file of a folder (Snakemake's timestamp included): content hash and modification time."""
    files = {str(p.relative_to(folder)): (file_sha256(p), p.stat().st_mtime_ns)
             for p in folder.rglob("*") if p.is_file()}
    assert files, f"{folder} holds no file"
    return files


# ---------------------------------------------------------------- a failed re-run loses nothing
def test_a_failed_rerun_puts_back_the_checkpoint_it_removed(micro_run, tmp_path):
    workdir = copy_run(micro_run, tmp_path / "damaged")
    exp = workdir / EXP
    checkpoint, metrics = tree_state(exp / "ckpt_r1/FINAL"), file_sha256(exp / "train_r1.jsonl")
    assert ".snakemake_timestamp" in checkpoint
    (exp / "reflogps_r1.parquet").write_bytes(b"not a parquet file")  # newer: train r1 is planned again

    failed = run_snakemake(workdir)

    assert failed.returncode != 0
    assert "Error in rule train" in failed.stdout + failed.stderr
    assert tree_state(exp / "ckpt_r1/FINAL") == checkpoint  # same bytes, same modification times
    assert file_sha256(exp / "train_r1.jsonl") == metrics
    said = re.search(r"iteralign: the failed run had removed .*", failed.stderr)
    assert said and "ckpt_r1/FINAL" in said[0] and "train_r1.jsonl" in said[0]
    assert f"iteralign restore {exp.relative_to(workdir)}" in said[0]
    # Snakemake still sees round 1's training as out of date: nothing restored looks newer than it is
    dry = snakemake(workdir, "-n")
    assert planned_jobs(dry).get("train", 0) >= 1 and "reflogps_r1.parquet" in dry.stdout


def test_restore_puts_back_what_a_killed_run_took_and_never_overwrites(micro_run, tmp_path):
    from iteralign.last_good import keep_last_good

    workdir = copy_run(micro_run, tmp_path / "killed")
    exp = workdir / EXP
    checkpoint = tree_state(exp / "ckpt_r2/FINAL")
    keep_last_good(exp)  # what the run's onstart does
    # as a run killed with SIGKILL leaves it: Snakemake had removed round 2's outputs, no handler ran
    shutil.rmtree(exp / "ckpt_r2/FINAL")
    (exp / "eval_r2.json").unlink()
    newer = b'{"rewritten": true}\n'
    (exp / "eval_r3.json").write_bytes(newer)  # rebuilt since: must stay

    out = run_cli("restore", str(exp), cwd=workdir).stdout

    assert f"restored {exp / 'ckpt_r2/FINAL'}" in out and f"restored {exp / 'eval_r2.json'}" in out
    assert tree_state(exp / "ckpt_r2/FINAL") == checkpoint
    assert (exp / "eval_r3.json").read_bytes() == newer
    assert "nothing to restore" in run_cli("restore", str(exp), cwd=workdir).stdout


def test_the_store_costs_no_copy_of_a_checkpoint(micro_run, tmp_path):
    from iteralign.last_good import keep_last_good

    exp = copy_run(micro_run, tmp_path / "stored") / EXP
    keep_last_good(exp)  # what the next run's onstart does
    weights = exp / "ckpt_r3/FINAL/model.safetensors"
    stored = exp / ".last-good/ckpt_r3/FINAL/model.safetensors"
    assert stored.is_file() and os.path.samefile(weights, stored)  # one inode, two names


# ---------------------------------------------------------------- one run per experiment
def test_a_second_run_of_the_same_experiment_from_another_folder_is_refused(tmp_path):
    results = tmp_path / "shared-results"
    slow = new_workdir(tmp_path / "first", results_dir=str(results), training={"epochs": 400})
    second = new_workdir(tmp_path / "second", results_dir=str(results), seed=1)
    first = subprocess.Popen(workflow_command(slow, "config.yaml"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=venv_env(), start_new_session=True)
    try:
        lock = results / "micro/.lock"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (lock.exists() and f"pid {first.pid}" in lock.read_text()):
            time.sleep(0.2)
        assert f"pid {first.pid}" in lock.read_text(), "the first run never took the lock"
        refused = run_snakemake(second)
        assert first.poll() is None, "the first run ended before the second was refused"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert f"{results / 'micro'} is in use by another run (pid {first.pid}" in said
    assert not (tmp_path / "second/logs").exists()  # refused before any job ran
    # the holder was killed: its lock went with it, nothing stale is left to clear by hand
    assert "nothing to restore" in run_cli("restore", str(results / "micro")).stdout


def test_the_audit_flags_a_folder_two_seeds_wrote(micro_run, tmp_path):
    workdir = copy_run(micro_run, tmp_path / "mixed")
    (workdir / "seed1.yaml").write_text(yaml.safe_dump(micro_config(seed=1)))
    target = str(EXP / "feedback_r3.json")
    snakemake(workdir, "--forcerun", target, "--until", target, configfile="seed1.yaml")

    done = run_cli("audit", str(EXP), "--strict", cwd=workdir, check=False)

    assert done.returncode == 1
    mixed = [line for line in done.stdout.splitlines() if line.strip().startswith("mixed:")]
    assert len(mixed) == 1 and "seed 0:" in mixed[0] and "seed 1: feedback_r3.json (1)" in mixed[0]


# ---------------------------------------------------------------- no false alarm
def test_deep_strict_audit_is_clean_on_an_untouched_run(micro_run):
    exp = micro_run / EXP
    assert (exp / "ckpt_r1/FINAL/.snakemake_timestamp").is_file()  # written by Snakemake after the job
    done = run_cli("audit", str(EXP), "--deep", "--strict", cwd=micro_run, check=False)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "every recorded input matches" in done.stdout
    meta = json.loads((exp / "ckpt_r1/FINAL.meta.json").read_text())
    assert dir_sha256(exp / "ckpt_r1/FINAL") == meta["sha256"]


@pytest.fixture(scope="module")
def retained_run(micro_run, tmp_path_factory) -> Path:
    """The micro run under the default checkpoints.keep_last (only the prune jobs run)."""
    workdir = copy_run(micro_run, tmp_path_factory.mktemp("retained") / "run")
    default = micro_config()
    del default["checkpoints"]
    (workdir / "default.yaml").write_text(yaml.safe_dump(default))
    snakemake(workdir, configfile="default.yaml")
    return workdir


def test_redoing_the_last_round_leaves_every_earlier_round_untouched(retained_run):
    exp = retained_run / EXP
    assert not (exp / "ckpt_r1/FINAL").exists() and (exp / "ckpt_r2/FINAL").is_dir()
    dry = snakemake(retained_run, "-n", "--forcerun", str(EXP / "feedback_r3.json"), configfile="default.yaml")
    jobs = planned_jobs(dry)
    assert jobs.get("feedback") == 1 and jobs.get("train") == 1 and jobs.get("evaluate") == 1
    planned = re.findall(r"wildcards: n=(\d+)", dry.stdout)
    assert planned and set(planned) == {"3"}
    assert "AGAIN" not in dry.stdout


def test_redoing_an_earlier_round_says_plainly_that_a_pruned_checkpoint_is_retrained(retained_run):
    dry = snakemake(retained_run, "-n", "--forcerun", str(EXP / "feedback_r2.json"), configfile="default.yaml")
    assert "train round 1 AGAIN: ckpt_r1/FINAL was deleted by checkpoints.keep_last" in dry.stdout
    assert planned_jobs(dry).get("train") == 3  # round 1 again, then rounds 2 and 3


# ---------------------------------------------------------------- external inputs count by content
@pytest.fixture(scope="module")
def linked_run(micro_run, tmp_path_factory) -> Path:
    """One round from a user's SFT checkpoint (a copy of the micro run's), linked by link_sft."""
    root = tmp_path_factory.mktemp("linked")
    user_sft = root / "my-sft"
    shutil.copytree(micro_run / EXP / "ckpt_r0/FINAL", user_sft, ignore=shutil.ignore_patterns(".snakemake_*"))
    workdir = new_workdir(root / "run", rounds=1, policy={"sft_checkpoint": str(user_sft)})
    snakemake(workdir)
    return workdir


def test_touching_the_users_sft_folder_re_plans_nothing_and_the_audit_agrees(linked_run, tmp_path):
    workdir = copy_run(linked_run, tmp_path / "touched")
    user_sft = Path(yaml.safe_load((workdir / "config.yaml").read_text())["policy"]["sft_checkpoint"])
    assert (workdir / EXP / "ckpt_r0/FINAL/config.json").resolve() == user_sft / "config.json"
    later = time.time() + 60
    for path in [user_sft, *user_sft.rglob("*")]:
        os.utime(path, (later, later))

    assert "Nothing to be done" in snakemake(workdir, "-n").stdout
    audit = run_cli("audit", str(EXP), "--strict", cwd=workdir, check=False)
    assert audit.returncode == 0, audit.stdout[-2000:]


def test_changing_a_byte_of_the_users_sft_folder_re_plans_and_the_audit_says_so(linked_run):
    # the last test of the module: it changes the fixture's SFT folder
    workdir = linked_run
    user_sft = Path(yaml.safe_load((workdir / "config.yaml").read_text())["policy"]["sft_checkpoint"])
    config_json = user_sft / "config.json"
    mtime = config_json.stat().st_mtime_ns
    with open(config_json, "a") as handle:
        handle.write(" ")  # one byte more (JSON all the same) ...
    os.utime(config_json, ns=(mtime, mtime))  # ... and the old modification time

    audit = run_cli("audit", str(EXP), "--strict", cwd=workdir, check=False)
    assert audit.returncode == 1 and f"policy.sft_checkpoint: the content of {user_sft} changed" in audit.stdout
    jobs = planned_jobs(snakemake(workdir, "-n"))
    assert jobs.get("link_sft") == 1 and jobs.get("train") == 1 and jobs.get("evaluate") == 2


def test_win_rates_say_which_tie_margin_they_used(micro_run):
    exp = micro_run / EXP
    evaluations = [json.loads((exp / f"eval_r{n}.json").read_text()) for n in range(4)]
    margins = {(e["tie_margin"], e["tie_margin_reward"]) for e in evaluations}
    assert len(margins) == 1  # every round against the same margin, from round 0's spread
    [(fraction, reward)] = margins
    assert fraction == 0.1 and reward > 0
    assert f"win-rate tie margin: 0.1 x round-0 reward std = {reward:.4g} reward" in (exp / "report.html").read_text()


def test_restore_is_refused_while_a_run_holds_the_experiment(tmp_path):
    import sys

    exp = tmp_path / "results/exp"
    exp.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from iteralign.artifacts import "
                               f"lock_experiment; lock_experiment({str(exp)!r}); print('held', flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = run_cli("restore", str(exp), check=False)
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert f"{exp} is in use by another run (pid {holder.pid} on host" in line
    assert "nothing to restore" in run_cli("restore", str(exp)).stdout  # released with its holder
