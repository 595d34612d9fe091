"""Start-up of the steps that run no model: real runs of the CLI in a subprocess, on the crafted
experiment's artefacts, must finish without importing torch or transformers (docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from crafted import write_crafted_experiment
from helpers import REPO, micro_config

from iteralign.config import ConfigError, validate

# Runs `iteralign <step> ...` in this process, then writes the model libraries it imported.
RUNNER = """
import json, sys
from iteralign.cli import main
status = main(sys.argv[2:])
loaded = sorted({name.split(".")[0] for name in sys.modules} & {"torch", "transformers"})
with open(sys.argv[1], "w") as out:
    json.dump({"status": status, "loaded": loaded}, out)
"""

REWARD_MODULE = "def by_length(prompt, output):\n    return float(len(output))\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The crafted experiment, a Python reward module and the micro config (scored by it)."""
    folder = tmp_path_factory.mktemp("startup")
    previous = Path.cwd()
    os.chdir(folder)  # the crafted artefacts record paths relative to the folder their steps ran in
    try:
        write_crafted_experiment(folder)
    finally:
        os.chdir(previous)
    (folder / "startup_rewards.py").write_text(REWARD_MODULE)
    config = micro_config(scoring={"scorer": "python", "python": {"function": "startup_rewards:by_length"}})
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def model_libraries_imported(workdir: Path, *args: str) -> list[str]:
    """Runs the step for real; returns the model libraries it imported (it must succeed)."""
    record = workdir / "loaded.json"
    record.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(workdir)])}
    result = subprocess.run([sys.executable, "-c", RUNNER, str(record), *args], cwd=workdir, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(record.read_text())
    assert outcome["status"] == 0, result.stderr[-3000:]
    return outcome["loaded"]


STEPS = {
    "plan": ["plan", "--config", "config.yaml", "--output", "out/prompts.parquet"],
    "score": ["score", "--config", "config.yaml", "--round", "1", "--samples", "results/crafted/samples_r1.parquet",
              "--output", "out/rewards_r1.parquet", "--threads", "1"],
    "feedback": ["feedback", "--config", "config.yaml", "--round", "1", "--samples",
                 "results/crafted/samples_r1.parquet", "--rewards", "results/crafted/rewards_r1.parquet",
                 "--output", "out/feedback_r1.json"],
    "audit": ["audit", "results/crafted", "--output", "out/audit.tsv"],
    "report": ["report", "results/crafted", "--config", "config.yaml", "--output", "out/report.html"],
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_a_step_without_a_model_imports_neither_torch_nor_transformers(workdir, step):
    args = STEPS[step]
    output = workdir / args[args.index("--output") + 1]
    assert not output.exists()
    assert model_libraries_imported(workdir, *args) == []
    assert output.stat().st_size > 0  # the step did its work


def test_the_runner_sees_torch_when_a_step_imports_it(workdir):
    """The check above can fail: a reward function that imports torch shows it."""
    (workdir / "torch_rewards.py").write_text("def by_length(prompt, output):\n    import torch\n\n"
                                              "    return float(torch.tensor(len(output)))\n")
    config = micro_config(scoring={"scorer": "python", "python": {"function": "torch_rewards:by_length"}})
    (workdir / "torch_config.yaml").write_text(yaml.safe_dump(config))
    args = ["score", "--config", "torch_config.yaml", "--round", "1", "--samples", "results/crafted/samples_r1.parquet",
            "--output", "out/torch_rewards_r1.parquet"]
    assert model_libraries_imported(workdir, *args) == ["torch"]


def test_an_option_the_slurm_plugin_sets_is_still_refused_in_slurm_extra():
    pytest.importorskip("snakemake_executor_plugin_slurm")
    config = micro_config(resources={"default": {"threads": 1}, "train": {"slurm_extra": "--partition=gpu"}})
    with pytest.raises(ConfigError, match=r"resources\.train\.slurm_extra.*resources\.train\.partition"):
        validate(config)
