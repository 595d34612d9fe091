"""What a person sees on the console: Snakemake's progress, one line per evaluated round, the
audit table at the end; a config typo or a short prompt set said in one line at parse time."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from helpers import fresh_shell_env, new_workdir, snakemake_command

from iteralign.artifacts import read_sidecar
from iteralign.cluster import visible_gpus
from iteralign.console import round_line

pytestmark = pytest.mark.workflow


def venv_snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """`.venv/bin/snakemake ...` typed in a fresh shell (the workflow's own rules then call `iteralign`)."""
    command = snakemake_command(workdir, workdir / "config.yaml", *args)
    return subprocess.run(command, capture_output=True, text=True, env=fresh_shell_env())


@pytest.fixture(scope="module")
def console(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A one-round micro run (the prompts allow 1 of the 3 rounds asked) from a shell without the venv;
    training asks for 2 GPUs, which this machine does not have."""
    workdir = new_workdir(tmp_path_factory.mktemp("console") / "w", rounds=3,
                          prompts={"num_generated": 24, "per_round": 12}, training={"gpus": 2})
    result = venv_snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_each_evaluated_round_prints_one_line_with_its_numbers(console):
    workdir, result = console
    lines = [line for line in result.stdout.splitlines() if re.match(r"round \d+", line)]
    assert [line.split(":")[0] for line in lines] == ["round 0 (SFT)", "round 1"]
    for n, line in enumerate(lines):
        evaluation = json.loads((workdir / f"results/micro/eval_r{n}.json").read_text())
        assert f"reward {evaluation['mean_reward']:.3f} [{evaluation['reward_ci95'][0]:.3f}, " in line
    meta = read_sidecar(workdir / "results/micro/feedback_r1.json")
    assert f"win rate vs r0 {json.loads((workdir / 'results/micro/eval_r1.json').read_text())['win_rate_vs_r0']:.2f}" \
        in lines[1]
    assert f"| {meta['stats']['pairs']} pairs kept from {meta['stats']['prompts_kept']} prompts" in lines[1]
    assert " KL " in lines[1]


def test_the_audit_table_ends_the_run_and_snakemake_progress_stays(console):
    workdir, result = console
    table_start = result.stdout.index("results/micro:")
    header = result.stdout[table_start:].splitlines()[1].split()
    assert header[0] == "round" and "eval_reward" in header
    assert result.stdout.index("round 1:") < table_start  # the round lines came as the rounds finished
    assert "steps (100%) done" in result.stderr and "rule train:" in result.stderr


def test_fewer_rounds_than_asked_is_said_once_at_parse_time(console):
    _, result = console
    said = [line for line in result.stderr.splitlines() if line.startswith("iteralign: rounds: 3 asked")]
    assert said == ["iteralign: rounds: 3 asked, but demo:addition has training prompts for 1 (prompts.per_round 12, "
                    "evaluation.num_prompts 12 held out): the workflow has 1 round"]


def test_a_config_typo_is_one_line_first_through_snakemake(tmp_path):
    workdir = new_workdir(tmp_path / "w", training={"lrr": 0.1})
    result = venv_snakemake(workdir, "-n")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if not line.startswith("Using workflow specific profile")]
    assert len(lines) == 1 and lines[0].startswith(f"iteralign workflow: error: {workdir / 'config.yaml'}: key training.lrr: unknown")
    assert "known keys here: accelerate_config, " in lines[0] and result.stdout == ""


def test_round_zero_has_no_win_rates_and_round_one_no_second_comparison():
    evaluation = {"round": 0, "mean_reward": 0.25, "reward_ci95": [0.2, 0.3], "win_rate_vs_r0": 0.5,
                  "kl_to_reference": 0.0}
    assert round_line(evaluation, None) == "round 0 (SFT): reward 0.250 [0.200, 0.300]"
    evaluation.update(round=1, win_rate_vs_previous=0.6, win_rate_ci95=[0.5, 0.7], kl_to_reference=0.1)
    line = round_line(evaluation, {"pairs": 8, "prompts": 10, "prompts_kept": 8})
    assert line == ("round 1: reward 0.250 [0.200, 0.300] | win rate vs r0 0.50 [0.500, 0.700] | KL 0.100 | "
                    "8 pairs kept from 8 prompts (2 dropped)")


@pytest.mark.skipif(visible_gpus() > 0, reason="needs a machine without GPUs")
def test_training_that_asks_for_gpus_runs_in_one_cpu_process_here_and_says_so(console):
    workdir, result = console
    assert "iteralign: GPUs asked for (reference 2, train 2), 0 visible on this machine" in result.stderr
    for step in ("reference", "train"):
        log = (workdir / f"logs/micro/{step}_r1.log").read_text()
        assert f"iteralign {step}: 2 GPUs asked for, 0 visible here: running 1 process on CPU" in log
    assert "python -m iteralign.cluster --gpus 2 -- accelerate launch" in result.stdout + result.stderr
