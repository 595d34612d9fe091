"""The score rule as Snakemake plans it (dry runs): the reward model is an input, the key stays out."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import dry_run, micro_config

pytestmark = pytest.mark.workflow
SECRET = "sk-workflow-0a1b2c3d4e5f60718293"


def plan(workdir: Path, config: dict) -> subprocess.CompletedProcess:
    """A dry run of ``config``, with the judge's key in the environment."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return dry_run(workdir, workdir / "config.yaml", "--cores", "1",
                   env={**os.environ, "ITERALIGN_TEST_JUDGE_KEY": SECRET})


def test_a_missing_reward_model_stops_the_workflow_before_any_job(tmp_path):
    missing = tmp_path / "no-such-reward-model"
    done = plan(tmp_path / "wf", micro_config(scoring={"scorer": "reward_model",
                                                        "reward_model": {"path": str(missing)}}))
    said = done.stdout + done.stderr
    assert done.returncode != 0
    # when the workflow is parsed, before the DAG: the config key and the path
    assert f"scoring.reward_model.path: {missing} does not exist" in said
    assert "Job stats" not in said


def test_every_score_job_reads_the_reward_model(tmp_path):
    model = tmp_path / "rm"
    model.mkdir()
    done = plan(tmp_path / "wf", micro_config(scoring={"scorer": "reward_model",
                                                        "reward_model": {"path": str(model)}}))
    assert done.returncode == 0, done.stderr[-2000:]
    stamp = "results/micro/inputs/scoring.reward_model.path.json"  # its content stamp stands for it
    score_jobs = [block for block in done.stdout.split("\n\n") if "rule score:" in block]
    assert len(score_jobs) == 3 and all(stamp in block for block in score_jobs)
    assert json.loads((tmp_path / "wf" / stamp).read_text())["path"] == str(model.resolve())


def test_the_judge_key_never_reaches_the_resolved_config(tmp_path):
    workdir = tmp_path / "wf"
    done = plan(workdir, micro_config(scoring={
        "scorer": "judge", "judge": {"model": "m", "base_url": "http://127.0.0.1:9/v1",
                                     "api_key_env": "ITERALIGN_TEST_JUDGE_KEY"}}))
    assert done.returncode == 0, done.stderr[-2000:]
    [resolved] = (workdir / "results/micro/config").glob("config_*.yaml")
    text = resolved.read_text()
    assert "api_key_env: ITERALIGN_TEST_JUDGE_KEY" in text
    assert SECRET not in text and SECRET not in done.stdout + done.stderr
