"""What the train and reference rules run, from a dry run: history inputs, no reference job for
reference-free losses, the accelerate launch for several GPUs or nodes."""

from __future__ import annotations

import re

import pytest
from helpers import REPO, commands_by_step

pytestmark = pytest.mark.workflow


def test_history_all_trains_on_every_round_so_far_and_computes_each_reference_once(tmp_path):
    commands = commands_by_step(tmp_path / "all", training={"history": "all"})
    assert len(commands["reference"]) == 3  # one per round, reused by the later rounds
    train_r3 = next(c for c in commands["train"] if "--round 3" in c)
    assert re.search(r"--feedback \S+feedback_r1.json \S+feedback_r2.json \S+feedback_r3.json --reference "
                     r"\S+reflogps_r1.parquet \S+reflogps_r2.parquet \S+reflogps_r3.parquet ", train_r3)


def test_reference_free_loss_runs_no_reference_job_and_multi_node_training_launches_accelerate(tmp_path):
    commands = commands_by_step(tmp_path / "simpo",
                                training={"loss": "simpo", "gpus": 4, "nodes": 2, "history": "last_k"})
    assert "reference" not in commands
    assert all("--reference" not in c for c in commands["train"])
    # one launcher per node (srun); rank and main node come from SLURM when the task starts
    assert all(c.startswith("srun --ntasks-per-node=1 bash -c 'exec accelerate launch --config_file "
                            f"{REPO}/configs/accelerate/fsdp_multinode.yaml --num_machines 2 --machine_rank $SLURM_NODEID ")
               and "--num_processes 8 -m iteralign.cli \"$@\"' iteralign train " in c for c in commands["train"])
    train_r3 = next(c for c in commands["train"] if "--round 3" in c)
    assert re.search(r"--feedback \S+feedback_r2.json \S+feedback_r3.json +--checkpoint", train_r3)


def test_one_gpu_or_cpu_runs_iteralign_directly_and_several_gpus_use_fsdp(tmp_path):
    cpu = commands_by_step(tmp_path / "cpu")
    assert all(c.startswith("iteralign train ") for c in cpu["train"])
    gpus = commands_by_step(tmp_path / "gpus", training={"gpus": 8})
    # through iteralign.cluster, which fits the launch to the GPUs visible when the job starts
    assert all(c.startswith("python -m iteralign.cluster --gpus 8 -- accelerate launch --config_file "
                            f"{REPO}/configs/accelerate/fsdp_8gpu.yaml --num_processes 8 -m iteralign.cli reference ")
               for c in gpus["reference"])
