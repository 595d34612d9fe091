# Paths, round helpers, resources and input functions shared by every rule.
# Rules stay declarative: anything computed lives here.
import os
import subprocess
import sys
from pathlib import Path

from iteralign import config as iteralign_config
from iteralign.prompts import planned_rounds


config.update(iteralign_config.validate_or_exit(config, source="workflow config"))

EXP = iteralign_config.experiment_dir(config)
LOGS = Path("logs") / config["experiment"]
BENCH = Path("benchmarks") / config["experiment"]
ROUNDS = planned_rounds(config)
TRAIN_ROUNDS = list(range(1, ROUNDS + 1))


def _git_commit():
    try:
        out = subprocess.run(["git", "-C", workflow.basedir, "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5)
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _resolved_config_file():
    """The validated config with defaults, written once per content; every step reads it.

    Rules pass it as params.config. The profiles leave `params` out of
    rerun-triggers, so editing the config does not silently re-run finished
    rounds: re-run what you mean with --forcerun (docs/workflow.md).
    """
    from iteralign.artifacts import atomic_path

    path = EXP / "config" / f"config_{iteralign_config.config_hash(config)}.yaml"
    text = iteralign_config.dump(config)
    if not path.exists() or path.read_text() != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return str(path)


os.environ.setdefault("ITERALIGN_GIT_COMMIT", _git_commit())
# envs/install-iteralign.sh (the post-deploy script of every conda env) installs the package from here.
os.environ.setdefault("ITERALIGN_SOURCE", str(workflow.basedir))
CONFIG_FILE = _resolved_config_file()


# ---------------------------------------------------------------- paths
def result(name):
    return str(EXP / name)


def log_file(name):
    return str(LOGS / name)


def bench_file(name):
    return str(BENCH / name)


def checkpoint_dir(n):
    return str(EXP / f"ckpt_r{n}" / "FINAL")


# ---------------------------------------------------------------- input functions
def prompt_source_file():
    source = config["prompts"]["source"]
    return [] if source.startswith("demo:") else [source]


def sft_data_file():
    data = config["sft"]["data"]
    return [] if data.startswith("demo:") else [data]


def scorer_files(scoring=None):
    """What a scorer reads besides the samples: the reward model's folder, if any
    (``scoring`` defaults to the training scorer, config.scoring).

    Declared as an input so that a missing folder fails before any job runs, naming it.
    """
    scoring = config["scoring"] if scoring is None else scoring
    if scoring.get("scorer") == "reward_model" and scoring.get("reward_model", {}).get("path"):
        return [scoring["reward_model"]["path"]]
    return []


def evaluation_scorer_files():
    """The held-out evaluation scores with the training scorer and, if set, evaluation.scorer."""
    second = config["evaluation"]["scorer"]
    return scorer_files() + (scorer_files(second) if second else [])


def previous_checkpoint(wildcards):
    return checkpoint_dir(int(wildcards.n) - 1)


def round_checkpoint(wildcards):
    return checkpoint_dir(int(wildcards.n))


def eval_baseline(wildcards):
    return [] if int(wildcards.n) == 0 else [result("eval_r0.parquet")]


def eval_previous(wildcards):
    n = int(wildcards.n)
    return [] if n == 0 else [result(f"eval_r{n - 1}.parquet")]


def input_option(name):
    """A params function: `--<name> <the rule's input files called name>`, or nothing when there are none."""

    def render(wildcards, input):
        files = getattr(input, name)
        files = [files] if isinstance(files, str) else list(files)
        return f"--{name} {' '.join(files)}" if files else ""

    return render


def output_folder(wildcards, output):
    return str(Path(output[0]).parent)


def later_training_metrics(wildcards):
    """train_r{n+K}.jsonl: round n+K finished training (checkpoints.keep_last = K)."""
    return result(f"train_r{int(wildcards.n) + config['checkpoints']['keep_last']}.jsonl")


def pruned_checkpoints():
    """ckpt_r{n}/pruned.json of every round whose checkpoint retention deletes (none when keep_last is null)."""
    keep = config["checkpoints"]["keep_last"]
    if keep is None:
        return []
    return expand(result("ckpt_r{n}/pruned.json"), n=range(1, ROUNDS - keep + 1))


def train_feedback(wildcards):
    """The feedback files round n trains on: its own, or several rounds' (training.history)."""
    rounds = iteralign_config.history_rounds(config["training"], int(wildcards.n))
    return [result(f"feedback_r{m}.json") for m in rounds]


def train_reference(wildcards):
    """Their reference tables, each computed once by its own round's reference job;
    none for reference-free losses, so the reference rule does not run at all."""
    if not iteralign_config.uses_reference(config["training"]):
        return []
    rounds = iteralign_config.history_rounds(config["training"], int(wildcards.n))
    return [result(f"reflogps_r{m}.parquet") for m in rounds]


def final_targets():
    return expand(result("eval_r{n}.json"), n=range(ROUNDS + 1)) + [result("audit.tsv"), result("report.html")]


# ---------------------------------------------------------------- resources
# Optional keys (None) are left out of a job's resources, so a profile's
# default-resources still apply to them.
_RESOURCE_DEFAULTS = {"mem_mb": 8000, "runtime": 120, "threads": 1, "cpus_per_gpu": None, "gpu_model": None,
                      "partition": None, "account": None, "slurm_extra": None}


def resource(step, key):
    """A step's resource from config.resources.<step>, else .default, else a built-in default."""
    section = config["resources"]
    for source in (section.get(step, {}), section.get("default", {})):
        if key in source:
            return source[key]
    return _RESOURCE_DEFAULTS[key]


ACCELERATE_CONFIGS = Path(workflow.basedir) / "configs" / "accelerate"


def accelerate_config_file():
    """training.accelerate_config, else the shipped file for the GPUs and nodes asked for."""
    training = config["training"]
    chosen = training["accelerate_config"]
    if chosen is None:
        if training["nodes"] > 1:
            chosen = ACCELERATE_CONFIGS / "fsdp_multinode.yaml"
        elif training["gpus"] > 4:
            chosen = ACCELERATE_CONFIGS / "fsdp_8gpu.yaml"
        elif training["gpus"] > 1:
            chosen = ACCELERATE_CONFIGS / "fsdp_4gpu.yaml"
        else:
            chosen = ACCELERATE_CONFIGS / "single_gpu.yaml"
    if not Path(chosen).is_file():
        raise ValueError(f"training.accelerate_config: {chosen} is not a file")
    return str(chosen)


def launcher(step):
    """Command that runs a step: `iteralign`, or `accelerate launch` over the step's GPUs.

    One process (CPU, or one GPU) runs plain `iteralign`, unless a training step names
    training.accelerate_config. More run `accelerate launch --num_processes <gpus>`;
    training steps (sft, reference, train) pass the accelerate config of
    accelerate_config_file() (FSDP on several GPUs). A multi-node training job runs one
    launcher per node through srun, each with its node's rank and the main node's
    address, read from SLURM when the task starts (multinode_launch_options()).
    """
    training_step = step in MULTINODE_STEPS
    processes = gpus(step)
    if processes == 0 or (processes == 1 and not (training_step and config["training"]["accelerate_config"])):
        return "iteralign"
    config_file = f"--config_file {accelerate_config_file()} " if training_step else ""
    command = (f"accelerate launch {config_file}{multinode_launch_options(step)}"
               f"--num_processes {processes} -m iteralign.cli")
    return per_node(step, command)


def gpus(step):
    """GPUs a step's job needs; all come from the engine settings, never from the rules."""
    if step in ("sample", "evaluate"):
        return config["sampling"]["tensor_parallel_size"]
    if step == "score":
        return config["scoring"]["gpus"]
    if step in ("reference", "train"):
        return config["training"]["gpus"] * config["training"]["nodes"]
    if step == "sft":  # the built-in SFT (the demo's) runs in one process
        return min(config["training"]["gpus"], 1)
    return 0


def job_resources(step):
    """Scheduler resources of a step's jobs, every value from the config (docs/cluster.md).

    gpu, cpus_per_gpu, gpu_model, mem_mb, runtime, slurm_partition, slurm_account
    and slurm_extra are what snakemake-executor-plugin-slurm reads; multi-node
    steps add nodes, tasks and mpi. Partition and account fall back to
    $SBATCH_PARTITION / $SBATCH_ACCOUNT. Unset keys are left out.
    """
    count = gpus(step)
    values = {
        "gpu": count,
        "cpus_per_gpu": resource(step, "cpus_per_gpu") if count else None,
        "gpu_model": resource(step, "gpu_model") if count else None,
        "mem_mb": resource(step, "mem_mb"),
        "runtime": resource(step, "runtime"),
        "slurm_partition": resource(step, "partition") or os.environ.get("SBATCH_PARTITION"),
        "slurm_account": resource(step, "account") or os.environ.get("SBATCH_ACCOUNT"),
        "slurm_extra": resource(step, "slurm_extra"),
    }
    values.update(multinode_resources(step, values["slurm_extra"]))
    return {key: value for key, value in values.items() if value is not None}


# ---------------------------------------------------------------- multi-node training (issue 5)
# Steps that may span training.nodes nodes: SLURM starts one task per node
# (`mpi: srun`), and each task runs one `accelerate launch` for its node's GPUs,
# with the first node of the allocation as the main process.
MULTINODE_STEPS = ("reference", "train")
MAIN_PROCESS_PORT = "$((29500 + SLURM_JOB_ID % 10000))"  # jobs sharing a node get different ports


def nodes(step):
    return config["training"]["nodes"] if step in MULTINODE_STEPS else 1


def multinode_resources(step, slurm_extra):
    """nodes, one task per node, `mpi: srun`, and the GPUs spread evenly over the nodes."""
    count = nodes(step)
    if count <= 1:
        return {}
    per_node_gpus = f"--gpus-per-node={config['training']['gpus']}"
    return {"nodes": count, "tasks": count, "mpi": "srun",
            "slurm_extra": f"{slurm_extra} {per_node_gpus}" if slurm_extra else per_node_gpus}


def multinode_launch_options(step):
    """accelerate launch options naming this node's rank and the main node (read when the task starts)."""
    count = nodes(step)
    if count <= 1:
        return ""
    main_node = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
    return (f"--num_machines {count} --machine_rank $SLURM_NODEID --main_process_ip {main_node} "
            f"--main_process_port {MAIN_PROCESS_PORT} ")


def per_node(step, command):
    """Run ``command`` once per node through srun; the rule's arguments follow as "$@"."""
    if nodes(step) <= 1:
        return command
    return f"srun --ntasks-per-node=1 bash -c 'exec {command} \"$@\"' iteralign"


# ---------------------------------------------------------------- environments
# One conda env per kind of rule (--sdm conda on a cluster); `make demo` uses .venv.
_CONDA_ENVS = {"sample": "vllm", "evaluate": "vllm"}


def conda_env(step):
    """The rule's conda env file (relative to rules/): vllm for sampling, judge for an API judge, else train."""
    name = _CONDA_ENVS.get(step, "train")
    if step == "score" and config["scoring"]["scorer"] == "judge":
        name = "judge"
    return f"../envs/{name}.yaml"
