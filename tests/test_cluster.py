"""Cluster wiring checked by dry-runs: planned jobs, their resources, the multi-node command, envs.

The example configs are dry-run (`snakemake -n`) in a folder holding a stub SFT
checkpoint and a stub prompt file at the paths the configs name.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import (
    BIN,
    DPO,
    KTO,
    LORA_DPO,
    REPO,
    dry_run,
    dry_run_jobs,
    new_workdir,
    snakemake_command,
    stub_workdir,
    two_node_train_command,
    variant,
    venv_env,
)

from iteralign.cluster import visible_gpus


def gpus_by_rule(jobs: list[dict]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for job in jobs:
        if job["rule"] != "all":
            found.setdefault(job["rule"], set()).add(job["resources"].get("gpu", "none"))
    return found


@pytest.fixture(scope="module")
def stubs(tmp_path_factory) -> Path:
    return stub_workdir(tmp_path_factory.mktemp("stubs"))


@pytest.fixture(scope="module")
def planned(stubs) -> dict[str, list[dict]]:
    """The dry-run jobs of each example config."""
    return {"dpo": dry_run_jobs(stubs, DPO), "kto": dry_run_jobs(stubs, KTO), "lora": dry_run_jobs(stubs, LORA_DPO)}


EXAMPLE_JOBS = {"link_sft": 1, "plan": 1, "sample": 4, "score": 4, "feedback": 4, "reference": 4, "train": 4,
                "evaluate": 5, "prune_checkpoint": 3, "round_summary": 5, "audit": 1, "report": 1, "all": 1}


@pytest.mark.parametrize("example", ["dpo", "kto"])
def test_example_config_plans_four_rounds_of_512_prompts_from_the_sft_link(planned, example):
    assert Counter(job["rule"] for job in planned[example]) == EXAMPLE_JOBS


def test_lora_example_trains_on_one_gpu_over_the_sft_model_and_keeps_two_checkpoints(planned):
    from iteralign.config import load

    config = load(LORA_DPO)
    assert config["training"]["lora"]["r"] == 16 and config["training"]["gradient_checkpointing"]
    # keep_last 2: one prune job fewer than the FSDP examples' keep_last 1
    assert Counter(job["rule"] for job in planned["lora"]) == {**EXAMPLE_JOBS, "prune_checkpoint": 2}
    assert gpus_by_rule(planned["lora"])["train"] == {"1"} and gpus_by_rule(planned["lora"])["reference"] == {"1"}
    trains = [job["shell"] for job in planned["lora"] if job["rule"] == "train"]
    assert len(trains) == 4
    for shell in trains:  # one process: plain iteralign, the SFT checkpoint as the adapter's base
        assert shell.startswith("iteralign train ") and " --base results/llama3-8b-dpo-lora/ckpt_r0/FINAL " in shell


@pytest.mark.parametrize("example", ["dpo", "kto"])
def test_example_config_gives_training_four_gpus_and_sampling_and_scoring_one(planned, example):
    # link_sft, prune_checkpoint, audit and report run on the submitting machine (localrule): no resources
    assert gpus_by_rule(planned[example]) == {
        "link_sft": {"none"}, "plan": {"0"}, "sample": {"1"}, "score": {"1"}, "feedback": {"0"},
        "reference": {"4"}, "train": {"4"}, "evaluate": {"1"}, "prune_checkpoint": {"none"}, "audit": {"none"},
        "report": {"none"}, "round_summary": {"none"},
    }


def test_example_configs_differ_in_samples_feedback_and_loss():
    from iteralign.config import load

    dpo, kto = load(DPO), load(KTO)
    assert (dpo["sampling"]["num_samples"], dpo["feedback"]["type"], dpo["training"]["loss"]) == (4, "pairwise", "dpo")
    assert (kto["sampling"]["num_samples"], kto["feedback"]["type"], kto["training"]["loss"]) == (8, "binary", "kto")
    assert dpo["policy"]["sft_checkpoint"] and dpo["training"]["gpus"] == 4


def test_gpu_jobs_ask_cpus_per_gpu_and_cpu_jobs_do_not(planned):
    jobs = {job["rule"]: job["resources"] for job in planned["dpo"]}
    assert jobs["train"]["cpus_per_gpu"] == "8" and jobs["train"]["mem_mb"] == "256000"
    assert "cpus_per_gpu" not in jobs["plan"]


def test_partition_and_account_come_from_the_config_then_the_environment(tmp_path):
    workdir = new_workdir(tmp_path / "w", resources={"default": {"partition": "cpu"}, "train": {"partition": "gpu"}})
    env = {**os.environ, "SBATCH_ACCOUNT": "alignment", "SBATCH_PARTITION": "ignored"}
    jobs = {job["rule"]: job["resources"] for job in dry_run_jobs(workdir, workdir / "config.yaml", env=env)}
    assert jobs["train"]["slurm_partition"] == "gpu" and jobs["sample"]["slurm_partition"] == "cpu"
    assert jobs["train"]["slurm_account"] == "alignment"


def test_without_partition_or_account_none_is_asked(tmp_path):
    workdir = new_workdir(tmp_path / "w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBATCH_")}
    jobs = dry_run_jobs(workdir, workdir / "config.yaml", env=env)
    assert {"sample", "train"} <= {job["rule"] for job in jobs}  # the plan has jobs that submit
    for job in jobs:
        assert not {"slurm_partition", "slurm_account"} & set(job["resources"]), job


# ---------------------------------------------------------------- multi-node training
@pytest.fixture(scope="module")
def two_node_jobs(stubs, tmp_path_factory) -> list[dict]:
    config = variant(DPO, tmp_path_factory.mktemp("nodes") / "two_nodes.yaml", training={"nodes": 2})
    return dry_run_jobs(stubs, config)


def test_two_node_training_asks_two_nodes_one_task_each_and_four_gpus_per_node(two_node_jobs):
    train = next(job["resources"] for job in two_node_jobs if job["rule"] == "train")
    assert {k: train[k] for k in ("gres", "nodes", "tasks", "mpi")} == {
        "gres": "gpu:4", "nodes": "2", "tasks": "2", "mpi": "srun"}
    assert "gpu" not in train and "slurm_extra" not in train  # the GPUs are asked for once, per node
    sample = next(job["resources"] for job in two_node_jobs if job["rule"] == "sample")
    assert sample["gpu"] == "1" and "nodes" not in sample and "mpi" not in sample


STUB_SRUN = """#!/bin/bash
# two nodes: run the task once per node with its SLURM_NODEID (options before the command are dropped)
while [[ $1 == --* ]]; do shift; done
for node in 0 1; do SLURM_NODEID=$node "$@"; done
"""
STUB_SCONTROL = """#!/bin/bash
printf 'gpu-a\\ngpu-b\\n'
"""
STUB_ACCELERATE = """#!/bin/bash
echo "accelerate $*"
"""


def test_two_node_training_runs_one_accelerate_per_node_with_its_rank_and_the_main_node(two_node_jobs, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"srun": STUB_SRUN, "scontrol": STUB_SCONTROL, "accelerate": STUB_ACCELERATE}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    command = two_node_train_command(two_node_jobs)
    (tmp_path / "logs/llama3-8b-dpo-online").mkdir(parents=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "1234",
           "SLURM_JOB_NODELIST": "gpu-[a-b]"}
    subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, check=True)
    launches = (tmp_path / "logs/llama3-8b-dpo-online/train_r1.log").read_text().splitlines()
    assert len(launches) == 2
    for rank, line in enumerate(launches):
        assert line.startswith(f"accelerate launch --config_file {REPO}/configs/accelerate/fsdp_multinode.yaml "
                               f"--num_machines 2 --machine_rank {rank} --main_process_ip gpu-a "
                               "--main_process_port 30734 --num_processes 8 -m iteralign.cli train --config ")
        assert " --round 1 --feedback results/llama3-8b-dpo-online/feedback_r1.json " in line
        assert " --output results/llama3-8b-dpo-online/ckpt_r1/FINAL " in line


# ---------------------------------------------------------------- environments and lint
def test_every_env_pins_its_packages_and_installs_iteralign_after_creation():
    for name in ("train", "vllm", "judge"):
        env = yaml.safe_load((REPO / "envs" / f"{name}.yaml").read_text())
        conda = [d for d in env["dependencies"] if isinstance(d, str)]
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
        assert conda and pip, name
        assert all(re.fullmatch(r"[\w.-]+=[\d.]+", d) for d in conda), conda
        assert all(re.fullmatch(r"[\w.-]+==[\w.]+", p) for p in pip), pip
        assert (REPO / "envs" / f"{name}.post-deploy.sh").resolve() == REPO / "envs/install-iteralign.sh"


@pytest.mark.parametrize("config_file", [REPO / "config.yaml", DPO], ids=["demo", "dpo"])
def test_lint_is_clean_with_a_conda_env_for_every_rule(stubs, config_file):
    result = subprocess.run(snakemake_command(stubs, config_file, "--lint"), capture_output=True, text=True,
                            env=venv_env())
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr, result.stderr


# ---------------------------------------------------------------- what the SLURM plugin submits
class PluginResources(dict):
    """A job's resources as the plugin reads them: .get(name) and attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def plugin_job(job: dict, threads: int) -> SimpleNamespace:
    """A dry-run job as the SLURM plugin's submit-string functions read it (numbers as numbers)."""
    resources = PluginResources({key: int(value) if value.isdigit() else value
                                 for key, value in job["resources"].items()})
    return SimpleNamespace(name=job["rule"], threads=threads, resources=resources)


def sbatch_call(job: dict, threads: int = 4) -> str:
    """What snakemake-executor-plugin-slurm submits for a job, from its own functions: slurm_extra validation,
    the partition argument, the submit command and the GPU (gres) string."""
    from snakemake_executor_plugin_slurm import Executor
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra

    submitted = plugin_job(job, threads)
    validate_slurm_extra(submitted)
    assert submitted.resources.get("slurm_partition"), "a partition is set, so the plugin asks no cluster for one"
    partition = Executor.get_partition_arg(SimpleNamespace(_partitions=None), submitted)
    params = {"run_uuid": "u", "slurm_logfile": "log", "comment_str": f"rule_{job['rule']}", "account": "",
              "partition": partition, "workdir": "/w"}
    return get_submit_command(submitted, params) + set_gres_string(submitted)


def docs_resources() -> dict:
    """The `resources:` example of docs/cluster.md."""
    block = re.search(r"```yaml\n(resources:\n.*?)```", (REPO / "docs/cluster.md").read_text(), re.S)
    assert block, "docs/cluster.md shows a resources example"
    return yaml.safe_load(block.group(1))["resources"]


@pytest.fixture(scope="module")
def submitted(stubs, tmp_path_factory) -> dict[str, dict[str, str]]:
    """sbatch calls of the DPO example on one node and on two, with the resources of docs/cluster.md, by rule."""
    folder = tmp_path_factory.mktemp("submit")
    calls = {}
    for name, nodes in (("one_node", 1), ("two_nodes", 2)):
        config = variant(DPO, folder / f"{name}.yaml", training={"nodes": nodes})
        raw = yaml.safe_load(config.read_text())
        raw["resources"] = docs_resources()
        config.write_text(yaml.safe_dump(raw))
        jobs = dry_run_jobs(stubs, config, "--profile", str(REPO / "profiles/slurm"))
        calls[name] = {job["rule"]: sbatch_call(job) for job in jobs
                       if job["rule"] in ("plan", "sample", "score", "feedback", "reference", "train", "evaluate")}
    return calls


GPU_FLAGS = re.compile(r"--gpus[=\s]\S+|--gres[=\s]\S+|--gpus-per-node[=\s]\S+|--ntasks-per-gpu[=\s]\S+")


@pytest.mark.parametrize(("layout", "rule", "gpu_flags"), [
    ("one_node", "plan", []), ("one_node", "feedback", []),
    ("one_node", "sample", ["--gpus=1"]), ("one_node", "evaluate", ["--gpus=1"]), ("one_node", "score", ["--gpus=1"]),
    ("one_node", "reference", ["--gpus=4"]), ("one_node", "train", ["--gpus=a100:4"]),
    ("two_nodes", "reference", ["--gres=gpu:4"]), ("two_nodes", "train", ["--gres=gpu:a100:4"]),
])
def test_each_rule_kind_asks_the_slurm_plugin_for_exactly_its_gpus_once(submitted, layout, rule, gpu_flags):
    call = submitted[layout][rule]
    assert GPU_FLAGS.findall(call) == gpu_flags, call
    if rule == "train":  # resources.train.cpus_per_gpu; the others' threads
        assert "--cpus-per-gpu=8" in call and "--cpus-per-task" not in call, call
    else:
        assert "--cpus-per-task=4" in call and "--cpus-per-gpu" not in call, call
    if not gpu_flags:
        assert "--ntasks=1" in call, call


def test_two_node_jobs_ask_two_nodes_one_task_each(submitted):
    for rule in ("reference", "train"):
        call = submitted["two_nodes"][rule]
        assert " --nodes=2" in call and " --ntasks=2" in call, call
    assert "--nodes" not in submitted["one_node"]["train"] and "--nodes" not in submitted["two_nodes"]["sample"]


def test_qos_constraint_and_partition_come_from_the_config_per_rule(submitted):
    assert any("slurm_extra" in values for values in docs_resources().values())
    train, sample, feedback = (submitted["one_node"][rule] for rule in ("train", "sample", "feedback"))
    assert " --qos=high" in train and " -C 'a100&ib'" in train and " -p gpu" in train, train
    assert " --exclusive" in train and " -A my-lab" not in train, train  # the account: get_account_arg, not here
    assert " --qos" not in sample and " -C " not in sample and " --exclusive" not in sample, sample
    assert " -p gpu" in sample and " -p cpu" in feedback, feedback


def test_slurm_extra_with_an_option_the_plugin_sets_is_refused_at_parse_time_naming_the_key(stubs, tmp_path):
    config = variant(DPO, tmp_path / "extra.yaml", resources={"train": {"slurm_extra": "--qos=high --exclusive"}})
    result = dry_run(stubs, config)
    assert result.returncode != 0
    assert "key resources.train.slurm_extra: found '--qos=high --exclusive'" in result.stderr
    assert "set resources.train.qos instead" in result.stderr


# ---------------------------------------------------------------- GPUs asked for where none are visible
LAUNCH = ["accelerate", "launch", "--config_file", "fsdp_8gpu.yaml", "--num_processes", "8", "-m", "iteralign.cli",
          "train", "--round", "1"]


@pytest.mark.parametrize(("visible", "expected", "note"), [
    (8, LAUNCH, None),
    (16, LAUNCH, None),
    (4, [*LAUNCH[:5], "4", *LAUNCH[6:]], "iteralign train: 8 GPUs asked for, 4 visible here: running 4 processes"),
    (1, ["py", "-m", "iteralign.cli", "train", "--round", "1"], "8 GPUs asked for, 1 visible here: running 1 process on the visible GPU"),
    (0, ["py", "-m", "iteralign.cli", "train", "--round", "1"], "8 GPUs asked for, 0 visible here: running 1 process on CPU"),
])
def test_a_launch_is_fitted_to_the_visible_gpus_and_says_so(visible, expected, note):
    from iteralign.cluster import fitted_command

    command, said = fitted_command(LAUNCH, 8, visible, "py")
    assert command == expected
    assert said == note or (note and said.startswith("iteralign train: ") and note in said)


STUB_ACCELERATE_CALLED = """#!/bin/bash
echo "accelerate was called: $*" >&2
exit 3
"""


NO_GPU = pytest.mark.skipif(visible_gpus() > 0, reason="needs a machine without GPUs")


@NO_GPU
def test_an_eight_gpu_step_on_a_machine_without_gpus_runs_in_one_process_and_says_so(tmp_path):
    """The judge example's training asks 8 GPUs: here (no GPU) the step runs once, on CPU, with a line saying so."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "accelerate").write_text(STUB_ACCELERATE_CALLED)
    (bin_dir / "accelerate").chmod(0o755)
    config = tmp_path / "config.yaml"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "question {i}"}}\n' for i in range(30)))
    config.write_text(yaml.safe_dump({"prompts": {"source": str(prompts), "per_round": 10},
                                      "evaluation": {"num_prompts": 5}, "training": {"gpus": 8}}))
    plan = tmp_path / "prompts.parquet"
    command = ["python", "-m", "iteralign.cluster", "--gpus", "8", "--", "accelerate", "launch", "--num_processes", "8",
               "-m", "iteralign.cli", "plan", "--config", str(config), "--output", str(plan)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PATH": f"{bin_dir}:{BIN}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    assert "accelerate was called" not in result.stderr
    assert "iteralign plan: 8 GPUs asked for, 0 visible here: running 1 process on CPU" in result.stderr
    assert plan.is_file()


@NO_GPU
def test_the_console_says_when_the_config_asks_more_gpus_than_the_machine_shows(stubs):
    judge = REPO / "configs/judge-openai.yaml"
    raw = yaml.safe_load(judge.read_text())
    raw["prompts"]["source"] = "data/ultrafeedback-binarized"
    raw["policy"]["sft_checkpoint"] = "models/llama3-8b-sft"
    config = stubs / "judge.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = dry_run(stubs, config, env={**os.environ, "OPENAI_API_KEY": "sk-unused"})
    assert result.returncode == 0, result.stderr[-2000:]
    said = [line for line in result.stderr.splitlines() if line.startswith("iteralign: GPUs asked for")]
    assert said == ["iteralign: GPUs asked for (sample 1, reference 8, train 8), 0 visible on this machine: jobs run "
                    "here use what it has (several processes only where several GPUs are visible); jobs submitted "
                    "to a cluster get what they ask for"]
