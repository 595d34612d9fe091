"""Plain functions and constants the tests share (conftest.py holds the fixtures).

The micro experiment's config, running the CLI and Snakemake as the rules and
`make` do, dry-run plans, and the stub folder the example configs point at.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtual environment's bin: snakemake, accelerate, torchrun, iteralign
EXP = Path("results/micro")  # the micro experiment's results, relative to its workdir
DPO = REPO / "configs/llama3-8b-dpo-online.yaml"
KTO = REPO / "configs/llama3-8b-kto-online.yaml"
LORA_DPO = REPO / "configs/llama3-8b-dpo-lora.yaml"

# A graded reward so that micro runs with a barely trained model still get pairs:
# digits in the right place count, an exact answer gets the full point.
REWARD_MODULE = '''
def graded(prompt, output):
    a, b = prompt[-1]["content"].split("+")
    expected = str(int(a) + int(b)).zfill(3)
    return sum(x == y for x, y in zip(output, expected)) / 3 - 0.1 * abs(len(output) - 3)
'''

MICRO = {
    "experiment": "micro",
    "seed": 0,
    "rounds": 3,
    "prompts": {"source": "demo:addition", "num_generated": 80, "per_round": 12},
    "evaluation": {"num_prompts": 12, "max_new_tokens": 5, "bootstrap_samples": 200},
    "sft": {
        "num_examples": 1024,
        "batch_size": 64,
        "lr": 0.003,
        "warmup_steps": 2,
        "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2},
    },
    "sampling": {"backend": "hf", "num_samples": 4, "temperature": 1.0, "max_new_tokens": 5},
    "scoring": {"scorer": "python", "python": {"function": "micro_rewards:graded"}},
    "feedback": {"type": "pairwise", "pairwise": {"mode": "max"}},
    "training": {"loss": "dpo", "lr": 1.0e-3, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 2,
                 "max_length": 24, "max_prompt_length": 12},
    "resources": {"default": {"threads": 1, "mem_mb": 1000, "runtime": 10}},
    "checkpoints": {"keep_last": None},  # tests read every round's checkpoint; retention: test_retention.py
}


def micro_config(**sections) -> dict:
    """The micro experiment (as a raw config dict), with sections updated."""
    config = copy.deepcopy(MICRO)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def write_reward_module(folder: Path) -> None:
    (folder / "micro_rewards.py").write_text(REWARD_MODULE)


def new_workdir(root: Path, **sections) -> Path:
    """A workdir holding the micro config (sections updated) as config.yaml and its reward module."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(micro_config(**sections)))
    write_reward_module(root)
    return root


def copy_run(run: Path, target: Path) -> Path:
    shutil.copytree(run, target, symlinks=True)
    return target


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``iteralign <args>`` in a subprocess (as the rules do)."""
    result = subprocess.run([sys.executable, "-m", "iteralign.cli", *args], cwd=cwd, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    if check and result.returncode != 0:
        raise AssertionError(f"iteralign {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


# ---------------------------------------------------------------- Snakemake
def venv_env(env: dict | None = None) -> dict:
    """``env`` (by default this process's environment) with the virtual environment's bin first on PATH."""
    base = os.environ if env is None else env
    return {**base, "PATH": f"{BIN}:{base.get('PATH', os.environ['PATH'])}"}


def fresh_shell_env() -> dict:
    """A shell right after `make install`: no virtual environment on PATH."""
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p).resolve() != BIN.resolve())
    return {"HOME": os.environ.get("HOME", "/root"), "PATH": path, "LANG": "C.UTF-8"}


def snakemake_command(workdir: Path, config_file: Path, *options: str) -> list[str]:
    """``snakemake`` of the repository's Snakefile in ``workdir`` with ``config_file``."""
    return [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir),
            "--configfile", str(config_file), *options]


def workflow_command(workdir: Path, configfile: str, *args: str) -> list[str]:
    """The workflow as `make` runs it: 2 cores, rerun on changed inputs or code, finish incomplete jobs."""
    return snakemake_command(workdir, workdir / configfile, "--rerun-triggers", "mtime", "input", "code",
                             "--cores", "2", "--rerun-incomplete", *args)


def snakemake(workdir: Path, *args: str, configfile: str = "config.yaml") -> subprocess.CompletedProcess:
    """Run the workflow; a failure raises with the end of its stderr and of every job's log."""
    result = subprocess.run(workflow_command(workdir, configfile, *args), capture_output=True, text=True,
                            env=venv_env())
    if result.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted((workdir / "logs").rglob("*.log")))
        raise AssertionError(f"snakemake failed:\n{result.stderr[-4000:]}\n{logs}")
    return result


def dry_run(workdir: Path, config_file: Path, *options: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``snakemake -n`` (plus ``options``) with the virtual environment's bin first on PATH."""
    return subprocess.run(snakemake_command(workdir, config_file, "-n", *options), capture_output=True, text=True,
                          env=venv_env(env))


JOB_HEADER = re.compile(r"^(?:local)?rule (\w+):$")


def dry_run_jobs(workdir: Path, config_file: Path, *options: str, env: dict | None = None) -> list[dict]:
    """The jobs `snakemake -n -p` plans: rule, resources (as printed) and shell command."""
    result = dry_run(workdir, config_file, "-p", *options, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs: list[dict] = []
    for line in (result.stdout + result.stderr).splitlines():
        header = JOB_HEADER.match(line)
        if header:
            jobs.append({"rule": header.group(1), "resources": {}, "shell": None})
        elif jobs and line.startswith("    resources: "):
            pairs = (item.split("=", 1) for item in line.removeprefix("    resources: ").split(", "))
            jobs[-1]["resources"] = dict(pairs)
        elif jobs and line.startswith("Shell command: "):
            jobs[-1]["shell"] = line.removeprefix("Shell command: ")
    return jobs


# ---------------------------------------------------------------- the example configs
def stub_workdir(root: Path) -> Path:
    """The files the example configs point at: SFT and reward-model folders, 2304 prompts saved by `datasets`."""
    import datasets

    for model in ("llama3-8b-sft", "ArmoRM-Llama3-8B-v0.1"):
        (root / "models" / model).mkdir(parents=True)
        (root / "models" / model / "config.json").write_text("{}")
    prompts = [f"Question {i}: what is {i} squared?" for i in range(2304)]
    datasets.Dataset.from_dict({"prompt": prompts}).save_to_disk(root / "data/ultrafeedback-binarized")
    return root


def variant(config_file: Path, target: Path, **changes: dict) -> Path:
    """A copy of an example config with some sections updated."""
    config = yaml.safe_load(config_file.read_text())
    for section, values in changes.items():
        config[section] = {**config.get(section, {}), **values}
    target.write_text(yaml.safe_dump(config))
    return target


def two_node_train_command(jobs: list[dict]) -> str:
    return next(job["shell"] for job in jobs if job["rule"] == "train")


def commands_by_step(workdir: Path, **sections) -> dict[str, list[str]]:
    """Shell commands of a dry run of the micro config (sections updated), by iteralign step."""
    workdir = new_workdir(workdir, **sections)  # the config names micro_rewards:graded, checked at parse time
    commands: dict[str, list[str]] = {}
    for job in dry_run_jobs(workdir, workdir / "config.yaml", "--cores", "2"):
        step = re.search(r"(?:iteralign|iteralign\.cli) ([a-z-]+) ", job["shell"] or "")
        if step:  # rules without a shell command print None
            commands.setdefault(step.group(1), []).append(job["shell"])
    return commands


def launch_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def accelerate_launch(*args: str, cwd: Path) -> None:
    command = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "configs/accelerate/cpu.yaml"),
               "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "iteralign.cli", *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=launch_env())
    assert result.returncode == 0, result.stderr[-4000:]
