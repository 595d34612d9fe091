"""How each rule's job is started and what it asks the scheduler for.

Pure functions of the validated config (defaults filled from the schema, the only
place they are written), the workflow's folder (``basedir``, where configs/accelerate
and .venv-vllm live) and, where it matters, whether Snakemake manages conda envs.
rules/common.smk binds the config and folder to each (functools.partial), and the rules
call them with the step alone:

- :func:`job_resources`: a step's SLURM resources (docs/cluster.md);
- :func:`launcher`: ``iteralign``, ``accelerate launch`` over the step's GPUs, or one
  launcher per node through ``srun``;
- :func:`iteralign_command`: ``iteralign`` or the vLLM environment's Python;
- :func:`conda_env`: the rule's env file.

A step is a rule's name (``sample``, ``train``, ...).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from iteralign.config import ConfigError, old_policy_job

# Steps that may span training.nodes nodes: SLURM starts one task per node
# (`mpi: srun`), and each task runs one `accelerate launch` for its node's GPUs,
# with the first node of the allocation as the main process.
MULTINODE_STEPS = ("reference", "old_policy", "train")
MAIN_PROCESS_PORT = "$((29500 + SLURM_JOB_ID % 10000))"  # jobs sharing a node get different ports
# One conda env per kind of rule (--sdm conda on a cluster); without conda, sampling.backend
# vllm runs these steps with .venv-vllm's Python (make vllm).
VLLM_STEPS = ("sample", "evaluate")
_ACCELERATE_CONFIGS = Path("configs") / "accelerate"


# ---------------------------------------------------------------- resources
def resource(config: dict, step: str, key: str):
    """config.resources.<step>.<key>, else resources.default.<key> (the schema's defaults), else None."""
    section = config["resources"]
    for source in (section.get(step, {}), section["default"]):
        if key in source:
            return source[key]
    return None


def gpus(config: dict, step: str) -> int:
    """GPUs a step's job needs; all come from the engine settings, never from resources."""
    if step in VLLM_STEPS:
        return config["sampling"]["tensor_parallel_size"]
    if step == "score":
        return config["scoring"]["gpus"]
    if step in MULTINODE_STEPS:
        return config["training"]["gpus"] * config["training"]["nodes"]
    if step == "sft":  # the built-in SFT (the demo's) runs in one process
        return min(config["training"]["gpus"], 1)
    return 0


def nodes(config: dict, step: str) -> int:
    return config["training"]["nodes"] if step in MULTINODE_STEPS else 1


def gpu_request(config: dict, step: str) -> dict:
    """How a step asks for its GPUs, once: `gpu` (sbatch --gpus=[model:]n) for a one-node job;
    `gres: gpu[:model]:<training.gpus>` (GPUs per node) for a multi-node job, with no total beside it."""
    count, model = gpus(config, step), resource(config, step, "gpu_model")
    if nodes(config, step) > 1:
        per_node = config["training"]["gpus"]
        return {"gres": f"gpu:{model}:{per_node}" if model else f"gpu:{per_node}"}
    return {"gpu": count, "gpu_model": model if count else None}


def multinode_resources(config: dict, step: str) -> dict:
    """nodes, one task per node and `mpi: srun` (the GPUs per node: gpu_request())."""
    count = nodes(config, step)
    if count <= 1:
        return {}
    return {"nodes": count, "tasks": count, "mpi": "srun"}


def job_resources(config: dict, step: str, environ: Mapping[str, str] = os.environ) -> dict:
    """Scheduler resources of a step's jobs, every value from the config (docs/cluster.md).

    Each is a resource snakemake-executor-plugin-slurm reads: GPUs (gpu_request()),
    cpus_per_gpu, mem_mb, runtime, slurm_partition, slurm_account, qos, constraint
    and slurm_extra; multi-node steps add nodes, tasks and mpi. Partition and
    account fall back to $SBATCH_PARTITION / $SBATCH_ACCOUNT of ``environ``. Unset
    keys are left out, so a profile's default-resources still apply to them.
    """
    def get(key):
        return resource(config, step, key)

    values = {
        **gpu_request(config, step),
        "cpus_per_gpu": get("cpus_per_gpu") if gpus(config, step) else None,
        "mem_mb": get("mem_mb"),
        "runtime": get("runtime"),
        "slurm_partition": get("partition") or environ.get("SBATCH_PARTITION"),
        "slurm_account": get("account") or environ.get("SBATCH_ACCOUNT"),
        "qos": get("qos"),
        "constraint": get("constraint"),
        "slurm_extra": get("slurm_extra"),
        **multinode_resources(config, step),
    }
    return {key: value for key, value in values.items() if value is not None}


# ---------------------------------------------------------------- launch commands
def accelerate_config_file(config: dict, basedir: str | Path) -> str:
    """training.accelerate_config, else the shipped file (basedir/configs/accelerate) for the GPUs and nodes asked for."""
    training = config["training"]
    chosen = training["accelerate_config"]
    if chosen is None:
        if training["nodes"] > 1:
            name = "fsdp_multinode.yaml"
        elif training["gpus"] > 1 and training["lora"]:
            name = "ddp.yaml"  # LoRA trains under DDP, not FSDP (docs/training.md)
        elif training["gpus"] > 4:
            name = "fsdp_8gpu.yaml"
        elif training["gpus"] > 1:
            name = "fsdp_4gpu.yaml"
        else:
            name = "single_gpu.yaml"
        chosen = Path(basedir) / _ACCELERATE_CONFIGS / name
    if not Path(chosen).is_file():
        raise ValueError(f"training.accelerate_config: {chosen} is not a file")
    return str(chosen)


def multinode_launch_options(config: dict, step: str) -> str:
    """accelerate launch options naming this node's rank and the main node (read when the task starts)."""
    count = nodes(config, step)
    if count <= 1:
        return ""
    main_node = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
    return (f"--num_machines {count} --machine_rank $SLURM_NODEID --main_process_ip {main_node} "
            f"--main_process_port {MAIN_PROCESS_PORT} ")


def per_node(command: str) -> str:
    """Run ``command`` once per node through srun; the rule's arguments follow as "$@"."""
    return f"srun --ntasks-per-node=1 bash -c 'exec {command} \"$@\"' iteralign"


def launcher(config: dict, step: str, basedir: str | Path) -> str:
    """Command that runs a step: `iteralign`, or `accelerate launch` over the step's GPUs.

    One process (CPU, or one GPU) runs plain `iteralign`, unless a training step names
    training.accelerate_config. More run `accelerate launch --num_processes <gpus>`;
    training steps (reference, train) pass the accelerate config of
    accelerate_config_file() (FSDP on several GPUs). A multi-node training job runs one
    launcher per node through srun, each with its node's rank and the main node's
    address, read from SLURM when the task starts (multinode_launch_options()). On one
    node the launch goes through iteralign.cluster, which fits it to the GPUs visible
    when the job starts (one process on CPU where there are none).
    """
    training_step = step in MULTINODE_STEPS
    processes = gpus(config, step)
    if processes == 0 or (processes == 1 and not (training_step and config["training"]["accelerate_config"])):
        return "iteralign"
    config_file = f"--config_file {accelerate_config_file(config, basedir)} " if training_step else ""
    command = (f"accelerate launch {config_file}{multinode_launch_options(config, step)}"
               f"--num_processes {processes} -m iteralign.cli")
    if nodes(config, step) > 1:
        return per_node(command)
    # fitted to the GPUs the job sees when it starts (fewer than asked: said in its log)
    return f"python -m iteralign.cluster --gpus {processes} -- {command}"


def gpu_shortfall(config: dict, visible_gpus: Callable[[], int]) -> str | None:
    """The console's note when the config asks for more GPUs than ``visible_gpus()`` counts
    (cluster.visible_gpus, asked only when some step wants a GPU)."""
    from iteralign.cluster import gpu_shortfall_note

    steps = ("sample", "score", "reference", *(("old_policy",) if old_policy_job(config) else ()), "train")
    asked = {step: gpus(config, step) for step in steps}
    return gpu_shortfall_note(asked, visible_gpus()) if max(asked.values()) > 0 else None


# ---------------------------------------------------------------- environments
def conda_env(config: dict, step: str) -> str:
    """The rule's conda env file (relative to rules/): vllm for sampling, judge for a served scorer
    (an API judge or a reward model server), else train."""
    name = "vllm" if step in VLLM_STEPS else "train"
    if step == "score" and config["scoring"]["scorer"] in ("judge", "reward_server"):
        name = "judge"
    return f"../envs/{name}.yaml"


def vllm_python(config: dict, basedir: str | Path) -> str:
    """sampling.vllm_python, else .venv-vllm/bin/python beside the Snakefile."""
    return config["sampling"]["vllm_python"] or str(Path(basedir) / ".venv-vllm" / "bin" / "python")


def uses_vllm_environment(config: dict, step: str, conda_managed: bool) -> bool:
    """Whether a step runs with the vLLM environment's Python: a sampling step of sampling.backend
    vllm when Snakemake does not manage conda envs (with --sdm conda, envs/vllm.yaml runs it)."""
    return step in VLLM_STEPS and config["sampling"]["backend"] == "vllm" and not conda_managed


def iteralign_command(config: dict, step: str, basedir: str | Path, conda_managed: bool) -> str:
    """The command a step's shell runs: `iteralign`, or the vLLM environment's (docs/cluster.md)."""
    if uses_vllm_environment(config, step, conda_managed):
        return f"{vllm_python(config, basedir)} -m iteralign.cli"
    return "iteralign"


def check_vllm_environment(config: dict, basedir: str | Path, conda_managed: bool) -> None:
    """Refuse (ConfigError) a run whose sampling needs the vLLM environment's Python where it does not exist."""
    python = vllm_python(config, basedir)
    if uses_vllm_environment(config, "sample", conda_managed) and not Path(python).is_file():
        raise ConfigError(
            f"sampling.backend is 'vllm' but the vLLM environment's Python {python} does not exist",
            hint="build it with `make vllm`, set sampling.vllm_python, or use --sdm conda")
