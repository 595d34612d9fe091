"""iteralign.launch: each rule's command and scheduler resources, from the config alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import REPO

from iteralign import launch
from iteralign.config import ConfigError, load_schema, validate

STEPS = ("plan", "sft", "sample", "score", "feedback", "reference", "train", "evaluate")
SINGLE_NODE_MAIN = "-m iteralign.cli"


def config_with(**sections) -> dict:
    return validate({**sections})


def test_a_cpu_config_runs_plain_iteralign_with_the_schema_defaults_and_no_gpu():
    config = config_with()
    assert [launch.launcher(config, step, REPO) for step in STEPS] == ["iteralign"] * len(STEPS)
    for step in STEPS:
        assert launch.job_resources(config, step, environ={}) == {"gpu": 0, "mem_mb": 8000, "runtime": 120}
        assert launch.resource(config, step, "threads") == 1


def test_the_defaults_are_the_schemas_and_every_rule_that_asks_has_a_key():
    default = load_schema()["properties"]["resources"]["properties"]["default"]
    assert {key: value["default"] for key, value in default["properties"].items()} == {
        "mem_mb": 8000, "runtime": 120, "threads": 1}
    config = config_with(resources={"report": {"mem_mb": 500}, "link_sft": {"runtime": 5}})
    assert launch.resource(config, "report", "mem_mb") == 500
    assert launch.resource(config, "report", "runtime") == 120
    assert launch.resource(config, "link_sft", "runtime") == 5


def test_a_rules_own_entry_wins_over_default_and_default_over_the_schema():
    config = config_with(resources={"default": {"mem_mb": 16000}, "train": {"mem_mb": 64000, "runtime": 30}})
    assert launch.job_resources(config, "train", environ={}) == {"gpu": 0, "mem_mb": 64000, "runtime": 30}
    assert launch.job_resources(config, "plan", environ={}) == {"gpu": 0, "mem_mb": 16000, "runtime": 120}
    assert launch.resource(config, "train", "threads") == 1


def test_one_gpu_runs_one_process_and_asks_one_gpu_of_its_model_with_cpus_per_gpu():
    config = config_with(training={"gpus": 1}, resources={"train": {"gpu_model": "a100", "cpus_per_gpu": 8},
                                                           "feedback": {"cpus_per_gpu": 8}})
    assert launch.launcher(config, "train", REPO) == "iteralign"
    assert launch.job_resources(config, "train", environ={}) == {
        "gpu": 1, "gpu_model": "a100", "cpus_per_gpu": 8, "mem_mb": 8000, "runtime": 120}
    # a step without GPUs asks none of a GPU's resources
    assert launch.job_resources(config, "feedback", environ={}) == {"gpu": 0, "mem_mb": 8000, "runtime": 120}


def test_one_gpu_with_an_accelerate_config_launches_accelerate_with_that_file(tmp_path):
    chosen = tmp_path / "mine.yaml"
    chosen.write_text("{}")
    config = config_with(training={"gpus": 1, "accelerate_config": str(chosen)})
    assert launch.launcher(config, "train", REPO) == (
        f"python -m iteralign.cluster --gpus 1 -- accelerate launch --config_file {chosen} --num_processes 1 "
        f"{SINGLE_NODE_MAIN}")
    assert launch.launcher(config, "sft", REPO) == "iteralign"  # the built-in SFT: one process


@pytest.mark.parametrize(("count", "shipped"), [(2, "fsdp_4gpu.yaml"), (4, "fsdp_4gpu.yaml"), (8, "fsdp_8gpu.yaml")])
def test_several_gpus_launch_accelerate_with_the_shipped_fsdp_config_fitted_to_the_visible_gpus(count, shipped):
    config = config_with(training={"gpus": count})
    expected = (f"python -m iteralign.cluster --gpus {count} -- accelerate launch --config_file "
                f"{REPO}/configs/accelerate/{shipped} --num_processes {count} {SINGLE_NODE_MAIN}")
    assert launch.launcher(config, "train", REPO) == expected
    assert launch.launcher(config, "reference", REPO) == expected
    assert launch.job_resources(config, "train", environ={})["gpu"] == count


def test_a_sampling_step_on_several_gpus_uses_accelerate_without_a_training_config():
    config = config_with(sampling={"tensor_parallel_size": 2})
    assert launch.launcher(config, "evaluate", REPO) == (
        f"python -m iteralign.cluster --gpus 2 -- accelerate launch --num_processes 2 {SINGLE_NODE_MAIN}")
    assert launch.job_resources(config, "sample", environ={})["gpu"] == 2


def test_a_missing_accelerate_config_is_named():
    config = config_with(training={"gpus": 2, "accelerate_config": "/nowhere/fsdp.yaml"})
    with pytest.raises(ValueError, match="training.accelerate_config: /nowhere/fsdp.yaml is not a file"):
        launch.launcher(config, "train", REPO)


def test_multi_node_training_runs_one_launcher_per_node_and_asks_gpus_per_node():
    config = config_with(training={"gpus": 4, "nodes": 2}, sampling={"tensor_parallel_size": 1},
                         resources={"train": {"gpu_model": "h100"}})
    assert launch.launcher(config, "train", REPO) == (
        "srun --ntasks-per-node=1 bash -c 'exec accelerate launch --config_file "
        f"{REPO}/configs/accelerate/fsdp_multinode.yaml --num_machines 2 --machine_rank $SLURM_NODEID "
        '--main_process_ip $(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) '
        f"--main_process_port $((29500 + SLURM_JOB_ID % 10000)) --num_processes 8 {SINGLE_NODE_MAIN} \"$@\"' "
        "iteralign")
    assert launch.job_resources(config, "train", environ={}) == {
        "gres": "gpu:h100:4", "mem_mb": 8000, "runtime": 120, "nodes": 2, "tasks": 2, "mpi": "srun"}
    assert launch.job_resources(config, "reference", environ={})["gres"] == "gpu:4"
    # sampling stays on one node, with its own GPU count
    assert launch.job_resources(config, "sample", environ={}) == {"gpu": 1, "mem_mb": 8000, "runtime": 120}


def test_partition_and_account_come_from_the_config_then_the_environment():
    environ = {"SBATCH_PARTITION": "env-part", "SBATCH_ACCOUNT": "env-acc"}
    config = config_with(resources={"train": {"partition": "gpu", "qos": "high", "constraint": "a100&ib",
                                              "slurm_extra": "--exclusive"}})
    train = launch.job_resources(config, "train", environ=environ)
    assert (train["slurm_partition"], train["slurm_account"]) == ("gpu", "env-acc")
    assert (train["qos"], train["constraint"], train["slurm_extra"]) == ("high", "a100&ib", "--exclusive")
    plan = launch.job_resources(config, "plan", environ=environ)
    assert (plan["slurm_partition"], plan["slurm_account"]) == ("env-part", "env-acc")
    assert "qos" not in plan and "slurm_partition" not in launch.job_resources(config, "plan", environ={})


def test_the_vllm_backend_runs_sampling_with_the_vllm_python_unless_conda_manages_envs(tmp_path):
    config = config_with(sampling={"backend": "vllm"})
    vllm_python = f"{tmp_path}/.venv-vllm/bin/python"
    assert launch.iteralign_command(config, "sample", tmp_path, conda_managed=False) == (
        f"{vllm_python} {SINGLE_NODE_MAIN}")
    assert launch.iteralign_command(config, "evaluate", tmp_path, conda_managed=False) == (
        f"{vllm_python} {SINGLE_NODE_MAIN}")
    assert launch.iteralign_command(config, "score", tmp_path, conda_managed=False) == "iteralign"
    assert launch.iteralign_command(config, "sample", tmp_path, conda_managed=True) == "iteralign"
    chosen = config_with(sampling={"backend": "vllm", "vllm_python": "/opt/vllm/bin/python"})
    assert launch.iteralign_command(chosen, "sample", tmp_path, conda_managed=False) == (
        f"/opt/vllm/bin/python {SINGLE_NODE_MAIN}")
    assert launch.iteralign_command(config_with(), "sample", tmp_path, conda_managed=False) == "iteralign"


def test_a_missing_vllm_python_is_refused_naming_it_and_conda_needs_none(tmp_path):
    config = config_with(sampling={"backend": "vllm"})
    with pytest.raises(ConfigError, match=f"{tmp_path}/.venv-vllm/bin/python does not exist"):
        launch.check_vllm_environment(config, tmp_path, conda_managed=False)
    launch.check_vllm_environment(config, tmp_path, conda_managed=True)
    python = Path(tmp_path / ".venv-vllm/bin/python")
    python.parent.mkdir(parents=True)
    python.write_text("")
    launch.check_vllm_environment(config, tmp_path, conda_managed=False)


def test_each_rule_gets_its_conda_env():
    config = config_with()
    assert launch.conda_env(config, "sample") == launch.conda_env(config, "evaluate") == "../envs/vllm.yaml"
    assert launch.conda_env(config, "score") == launch.conda_env(config, "train") == "../envs/train.yaml"
    judged = config_with(scoring={"scorer": "judge", "judge": {"model": "gpt-4o-mini"}})
    assert launch.conda_env(judged, "score") == "../envs/judge.yaml"
    assert launch.conda_env(judged, "feedback") == "../envs/train.yaml"


def test_the_gpu_shortfall_note_names_the_steps_asking_more_than_is_visible():
    def never_asked() -> int:
        raise AssertionError("a config without GPUs does not count the visible ones")

    assert launch.gpu_shortfall(config_with(), never_asked) is None
    note = launch.gpu_shortfall(config_with(training={"gpus": 4}), lambda: 1)
    assert note is not None and "reference 4, train 4" in note and "1 visible" in note
    assert launch.gpu_shortfall(config_with(training={"gpus": 4}), lambda: 4) is None
