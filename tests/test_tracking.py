"""Experiment tracking: one micro workflow (2 rounds) with TensorBoard, MLflow and W&B on,
read back with each library's own reader and compared with the run's artefacts."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from helpers import BIN, EXP, REPO, micro_config, snakemake_command, venv_env, write_reward_module

pytestmark = pytest.mark.workflow
TRACKING = {"trackers": ["tensorboard", "mlflow", "wandb"]}
# Secrets the run has in its environment or config; none may reach a file it writes.
API_KEY = "wandb-key-that-must-not-leak-5f3a"
URL_PASSWORD = "url-password-that-must-not-leak-9c1d"
# The jobs of a 2-round run that log their time: (step, round).
JOBS = [("plan", 0), ("sft", 0), ("evaluate", 0)] + [
    (step, n) for n in (1, 2) for step in ("sample", "score", "feedback", "reference", "train", "evaluate")]


def _environment() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    return {**venv_env(env), "WANDB_API_KEY": API_KEY}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("tracked")
    judge = {"base_url": f"https://someone:{URL_PASSWORD}@judge.invalid/v1"}  # not used: the scorer is python
    config = micro_config(rounds=2, tracking=TRACKING)
    config["scoring"] = {**config["scoring"], "judge": judge}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    write_reward_module(workdir)
    command = snakemake_command(workdir, workdir / "config.yaml", "--cores", "2")
    result = subprocess.run(command, capture_output=True, text=True, env=_environment())
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def _train_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for n in (1, 2) for line in (run / EXP / f"train_r{n}.jsonl").read_text().splitlines()]
    assert rows and [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # one global step axis
    return rows


def _evaluations(run: Path) -> dict[int, dict]:
    return {n: json.loads((run / EXP / f"eval_r{n}.json").read_text()) for n in (0, 1, 2)}


def _expected(run: Path) -> dict[str, dict[int, float]]:
    """key -> {step or round: value}, from train_r{n}.jsonl, eval_r{n}.json and the feedback sidecars."""
    expected: dict[str, dict[int, float]] = defaultdict(dict)
    for row in _train_rows(run):
        for key in ("loss", "margin", "accuracy", "lr", "grad_norm", "reward_chosen", "examples_seen", "round"):
            expected[f"train/{key}"][row["step"]] = row[key]
    for n, summary in _evaluations(run).items():
        for key in ("mean_reward", "win_rate_vs_r0", "kl_to_reference", "mean_output_tokens", "failed_scores"):
            expected[f"eval/{key}"][n] = summary[key]
        expected["eval/reward_ci95_lo"][n], expected["eval/reward_ci95_hi"][n] = summary["reward_ci95"]
        expected["eval/output_tokens_quantiles/p50"][n] = summary["output_tokens_quantiles"]["p50"]
    for n in (1, 2):
        stats = json.loads((run / EXP / f"feedback_r{n}.meta.json").read_text())["stats"]
        for key in ("pairs", "prompts_kept", "pairs_dropped_tie", "samples"):
            expected[f"feedback/{key}"][n] = stats[key]
    return expected


def _assert_same(logged: dict[str, dict[int, float]], expected: dict[str, dict[int, float]], rel: float) -> None:
    assert expected["train/loss"] and expected["eval/mean_reward"]
    for key, values in expected.items():
        assert logged.get(key), f"{key} was not logged"
        assert sorted(logged[key]) == sorted(values), key
        for index, value in values.items():
            assert math.isclose(logged[key][index], value, rel_tol=rel, abs_tol=1e-7), (key, index)


def _tensorboard(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / EXP / "tracking/tensorboard")).Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def _mlflow(run: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / EXP / 'tracking/mlflow.db'}")
    return client, json.loads((run / EXP / "tracking/run.json").read_text())["mlflow"]["run_id"]


def _mlflow_metrics(run: Path) -> dict[str, dict[int, float]]:
    client, run_id = _mlflow(run)
    keys = client.get_run(run_id).data.metrics
    return {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in keys}


def _wandb_records(run: Path) -> list[list[dict]]:
    """Each job's offline run file, as W&B's own reader (`wandb leet inspect --json`) prints it."""
    folders = sorted((run / EXP / "tracking/wandb").glob("offline-run-*"))
    records = []
    for folder in folders:
        out = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(folder)], capture_output=True,
                             text=True, stdin=subprocess.DEVNULL, check=True)
        records.append([json.loads(line) for line in out.stdout.splitlines() if line.strip()])
    return records


def _wandb_metrics(run: Path) -> dict[str, dict[int, float]]:
    """key -> {axis value: value}: train/* against train/global_step, the rest against round."""
    logged: dict[str, dict[int, float]] = defaultdict(dict)
    for job in _wandb_records(run):
        for record in job:
            if record["type"] != "history":
                continue
            item = record["history"]["item"]
            axis = "train/global_step" if "train/global_step" in item else "round"
            for key, value in item.items():
                if not key.startswith("_") and key != axis:
                    logged[key][int(item[axis])] = value
    return logged


def test_one_tracker_run_spans_every_job(run):
    state = json.loads((run / EXP / "tracking/run.json").read_text())
    client, run_id = _mlflow(run)
    experiment = client.get_experiment_by_name("iteralign")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    assert client.get_run(run_id).info.run_name == "micro"
    jobs = _wandb_records(run)
    assert len(jobs) == len(JOBS)  # one offline run file per job that logged, all of the same run
    assert {record["run"]["run_id"] for job in jobs for record in job if record["type"] == "run"} == \
        {state["wandb"]["run_id"]}
    steps = [r["history"]["step"]["num"] for job in jobs for r in job if r["type"] == "history"]
    assert steps == list(range(len(steps)))  # W&B's own step grows across jobs, so `wandb sync` keeps them all
    tensorboard = list((run / EXP / "tracking/tensorboard").iterdir())
    assert [p.name for p in (run / EXP / "tracking").iterdir() if p.is_dir()] and tensorboard and \
        all(p.is_file() for p in tensorboard)  # one TensorBoard run


def test_tensorboard_holds_the_run_step_and_round_metrics(run):
    logged = _tensorboard(run)
    _assert_same(logged, _expected(run), rel=1e-6)  # TensorBoard keeps float32
    assert not [key for key in logged if key.startswith("eval/decoding")]  # settings are not curves


def test_mlflow_holds_the_run_step_and_round_metrics(run):
    _assert_same(_mlflow_metrics(run), _expected(run), rel=1e-12)


def test_wandb_offline_run_holds_the_run_step_and_round_metrics(run):
    _assert_same(_wandb_metrics(run), _expected(run), rel=1e-12)


def test_every_job_logs_its_time_at_its_round(run):
    for logged in (_mlflow_metrics(run), _wandb_metrics(run), _tensorboard(run)):
        times = {key: values for key, values in logged.items() if key.startswith("time/")}
        assert sorted((key[5:-8], n) for key, values in times.items() for n in values) == sorted(JOBS)
        for step, n in JOBS:
            benchmark = (run / "benchmarks/micro" / (f"{step}_r{n}.tsv" if step not in ("plan", "sft")
                                                    else f"{step}.tsv")).read_text().splitlines()
            wall = float(benchmark[1].split("\t")[0])
            assert 0 < times[f"time/{step}_seconds"][n] <= wall + 0.01  # the job's own part of its wall time


def test_config_is_logged_without_secrets(run):
    client, run_id = _mlflow(run)
    params = client.get_run(run_id).data.params
    assert params["training.loss"] == "dpo" and float(params["training.lr"]) == 1e-3
    assert params["scoring.judge.base_url"] == "https://***@judge.invalid/v1"
    configs = [r["config"]["update"] for job in _wandb_records(run) for r in job if r["type"] == "config"]
    assert configs and configs[0]["training"]["lr"] == 1e-3
    assert configs[0]["scoring"]["judge"]["base_url"] == "https://***@judge.invalid/v1"
    files = [p for folder in ("results", "logs") for p in (run / folder).rglob("*") if p.is_file()]
    tracked = [p for p in files if p.is_relative_to(run / EXP / "tracking")]
    assert len(tracked) > 20
    for path in files:  # (the config's own dump and the report show the config as the user wrote it)
        assert API_KEY.encode() not in path.read_bytes(), path
    for path in tracked:
        assert URL_PASSWORD.encode() not in path.read_bytes(), path


def _feedback_job(run: Path, config_path: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """``iteralign feedback`` of round 1 on the tracked run's files, in a fresh interpreter."""
    args = ["feedback", "--config", str(config_path), "--round", "1", "--samples", str(EXP / "samples_r1.parquet"),
            "--rewards", str(EXP / "rewards_r1.parquet"), "--output", str(config_path.with_suffix(".json"))]
    code = f"import sys\n{prelude}\nfrom iteralign.cli import main\nstatus = main({args!r})\n" \
           "print('TRACKER MODULES', sorted(m for m in sys.modules if m.split('.')[0] in " \
           "('tensorboard', 'mlflow', 'wandb')))\nsys.exit(status)"
    return subprocess.run([sys.executable, "-c", code], cwd=run, capture_output=True, text=True,
                          env={**_environment(), "PYTHONPATH": str(REPO / "src")})


def _config_file(run: Path, tmp_path: Path, tracking: dict) -> Path:
    config = yaml.safe_load(next((run / EXP / "config").glob("config_*.yaml")).read_text())
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**config, "tracking": tracking}))
    return path


def test_a_tracker_that_fails_to_start_is_one_warning_and_the_job_finishes(run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(run / EXP, workdir / EXP, ignore=shutil.ignore_patterns("ckpt_*", "tracking"))
    config = _config_file(workdir, tmp_path, {"trackers": ["mlflow", "wandb", "tensorboard"],
                                              "mlflow": {"tracking_uri": "no-such-store://nowhere"}})
    result = _feedback_job(workdir, config, prelude="sys.modules['wandb'] = None  # as if not installed")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(config.with_suffix(".json").read_text()) == json.loads((run / EXP / "feedback_r1.json").read_text())
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 2, warnings
    assert "tracker mlflow failed to start" in warnings[0] and "no-such-store" in warnings[0]
    assert "tracker wandb failed to start" in warnings[1] and "ModuleNotFoundError" in warnings[1]
    pairs = json.loads((run / EXP / "feedback_r1.meta.json").read_text())["stats"]["pairs"]
    assert _tensorboard(workdir)["feedback/pairs"] == {1: pairs}  # the tracker that started still logs


def test_a_job_that_does_not_track_imports_no_tracker_library(run, tmp_path):
    result = _feedback_job(run, _config_file(run, tmp_path, {"trackers": []}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TRACKER MODULES []" in result.stdout


def test_tracking_is_not_part_of_the_config_hash_and_a_wrong_tracker_is_named():
    from iteralign import config as cfg

    assert cfg.config_hash(cfg.validate({})) == cfg.config_hash(cfg.validate({"tracking": TRACKING}))
    with pytest.raises(cfg.ConfigError, match=r"key tracking.trackers.0: found \"comet\""):
        cfg.validate({"tracking": {"trackers": ["comet"]}})
