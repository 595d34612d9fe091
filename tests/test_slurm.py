"""The micro workflow on a real single-node SLURM with fake GPUs (scripts/slurm_test_cluster.sh).

Every job but the local ones (audit) is submitted by sbatch through
`snakemake --profile profiles/slurm` (plus tests/slurm_profile for this cluster),
and each job's log says which SLURM job ran it and which GPUs it was granted.
The config declares GPUs for sample, score, train ... while every job still runs on
CPU: torch sees no CUDA behind the fake devices. One GPU for training keeps the
plain `iteralign` launcher (accelerate would start one CPU process per GPU).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import (
    DPO,
    EXP,
    REPO,
    dry_run_jobs,
    micro_config,
    snakemake_command,
    stub_workdir,
    two_node_train_command,
    variant,
    venv_env,
    write_reward_module,
)

pytestmark = [pytest.mark.workflow, pytest.mark.slurm]
SETUP = REPO / "scripts" / "slurm_test_cluster.sh"
PARTITION = "iteralign"
# The GPUs each rule declares under the config below (sampling.tensor_parallel_size
# for sample/evaluate, training.gpus x nodes for sft/reference/train; the Python scorer
# runs no model, so the config refuses scoring.gpus > 0 for it).
DECLARED_GPUS = {"plan": 0, "sft": 1, "sample": 2, "score": 0, "feedback": 0, "reference": 1, "train": 1,
                 "evaluate": 2}
LOCAL_RULES = {"audit", "report", "prune_checkpoint", "round_summary"}
GRANT = re.compile(r"job environment (\{.*\})")


def slurm_config() -> dict:
    return micro_config(
        rounds=1,
        sampling={"tensor_parallel_size": 2},
        training={"gpus": 1},
        resources={"default": {"threads": 1, "mem_mb": 1000, "runtime": 10, "partition": PARTITION}},
    )


@pytest.fixture(scope="module")
def slurm_cluster():
    """Bring the test cluster up (installing slurm-wlm and munge when missing); stop what this started."""
    env = {**os.environ, "ITERALIGN_SLURM_PARTITION": PARTITION}
    result = subprocess.run([str(SETUP), "up"], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if result.returncode == 3 and not os.environ.get("CI"):
        pytest.skip(f"no test SLURM on this machine: {result.stderr.strip()}")
    assert result.returncode == 0, f"{SETUP} up failed:\n{result.stdout}\n{result.stderr}"
    started = result.stdout.strip().removeprefix("started:").split() if "started:" in result.stdout else []
    yield
    if started:
        subprocess.run([str(SETUP), "down", *started], check=True)


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("slurm")
    (workdir / "config.yaml").write_text(yaml.safe_dump(slurm_config()))
    write_reward_module(workdir)
    env = venv_env({key: value for key, value in os.environ.items()
                    if key != "CUDA_VISIBLE_DEVICES" and not key.startswith(("SLURM_", "SBATCH_"))})
    command = snakemake_command(workdir, workdir / "config.yaml", "--profile", str(REPO / "profiles/slurm"),
                                "--profile", str(REPO / "tests/slurm_profile"))
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=workdir, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted(workdir.rglob("*.log"))
                         if "slurm_logs" in str(p) or "logs/micro" in str(p))
        raise AssertionError(f"snakemake on SLURM failed:\n{result.stderr[-5000:]}\n{logs}")
    return workdir


def job_logs(workdir: Path) -> dict[str, dict]:
    """Each job's recorded environment, by log name (e.g. sample_r1)."""
    grants = {}
    for log in sorted((workdir / "logs/micro").glob("*.log")):
        match = GRANT.search(log.read_text())
        assert match, f"{log} has no 'job environment' line"
        grants[log.stem] = json.loads(match.group(1))
    return grants


def rule_of(log_name: str) -> str:
    return re.sub(r"_r\d+$", "", log_name)


def test_the_workflow_completes_on_slurm(slurm_run):
    assert json.loads((slurm_run / EXP / "eval_r1.json").read_text())["round"] == 1
    assert (slurm_run / EXP / "audit.tsv").exists()


def test_every_job_but_the_local_ones_ran_in_its_own_slurm_job(slurm_run):
    grants = job_logs(slurm_run)
    remote = {name: env for name, env in grants.items() if rule_of(name) not in LOCAL_RULES}
    assert {rule_of(name) for name in remote} == set(DECLARED_GPUS)
    job_ids = [env.get("SLURM_JOB_ID") for env in remote.values()]
    assert None not in job_ids and len(set(job_ids)) == len(job_ids)
    local = grants.keys() - remote.keys()
    assert local, grants
    for name in local:
        assert "SLURM_JOB_ID" not in grants[name], name
    submitted = list((slurm_run / ".snakemake/slurm_logs").rglob("*.log"))
    assert len(submitted) == len(remote)  # one sbatch submission per job


def test_each_job_was_granted_the_gpus_its_rule_declared(slurm_run):
    remote = {name: env for name, env in job_logs(slurm_run).items() if rule_of(name) not in LOCAL_RULES}
    assert {rule_of(name) for name in remote} == set(DECLARED_GPUS)  # a job of every rule is checked
    for name, env in remote.items():
        visible = [index for index in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if index]
        assert len(visible) == DECLARED_GPUS[rule_of(name)], f"{name}: {env}"


def test_artefact_provenance_names_the_slurm_job(slurm_run):
    from iteralign.artifacts import read_provenance

    meta = read_provenance(slurm_run / EXP / "samples_r1.parquet")
    assert meta["job"]["SLURM_JOB_ID"]
    assert len(meta["job"]["CUDA_VISIBLE_DEVICES"].split(",")) == DECLARED_GPUS["sample"]


def test_multinode_train_command_gets_its_rank_main_node_and_gpus_inside_a_slurm_allocation(slurm_cluster,
                                                                                             tmp_path):
    """The two-node train command, run by sbatch on this one node: rank 0, this node as main, its GPUs."""
    workdir = stub_workdir(tmp_path / "w")
    config = variant(DPO, tmp_path / "two_nodes.yaml", training={"nodes": 2})
    command = two_node_train_command(dry_run_jobs(workdir, config))
    fake = tmp_path / "bin/accelerate"  # stands in for accelerate: prints what it was given and the GPUs it sees
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\necho "accelerate $* CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"\n')
    fake.chmod(0o755)
    (workdir / "logs/llama3-8b-dpo-online").mkdir(parents=True)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    subprocess.run(["sbatch", "--wait", "--quiet", "-p", PARTITION, "--nodes=1", "--ntasks=1", "--gpus-per-node=2",
                    "-t", "2", "--mem", "100", "-D", str(workdir), "-o", str(tmp_path / "sbatch.out"),
                    "--wrap", command], check=True, env=env, stdin=subprocess.DEVNULL, timeout=120)
    (launch,) = (workdir / "logs/llama3-8b-dpo-online/train_r1.log").read_text().splitlines()
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    assert f"--num_machines 2 --machine_rank 0 --main_process_ip {host} --main_process_port " in launch
    assert " -m iteralign.cli train --config " in launch
    assert re.search(r" CUDA_VISIBLE_DEVICES=\d+,\d+$", launch)  # the node's two GPUs of the allocation
