# Paths, round helpers, resources and input functions shared by every rule.
# Rules stay declarative: anything computed lives here.
import os
import subprocess
import sys
from pathlib import Path

from iteralign import config as iteralign_config
from iteralign.cluster import commands_beside_python_first, gpu_shortfall_note, visible_gpus
from iteralign.prompts import PromptError, fewer_rounds_note, planned_rounds


EXP = iteralign_config.experiment_dir(config)
LOGS = Path("logs") / config["experiment"]
BENCH = Path("benchmarks") / config["experiment"]
ROUNDS = iteralign_config.exit_on_input_error(planned_rounds, config, errors=(PromptError,))
if fewer_rounds_note(config, ROUNDS):
    print(f"iteralign: {fewer_rounds_note(config, ROUNDS)}", file=sys.stderr)
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


# Rules call `iteralign` (and `accelerate`): those beside the Python that runs Snakemake come
# first, so `.venv/bin/snakemake` works from a shell without .venv/bin on its PATH.
commands_beside_python_first(sys.executable)
os.environ.setdefault("ITERALIGN_GIT_COMMIT", _git_commit())
# envs/install-iteralign.sh (the post-deploy script of every conda env) installs the package from here.
os.environ.setdefault("ITERALIGN_SOURCE", str(workflow.basedir))
CONFIG_FILE = _resolved_config_file()


# ---------------------------------------------------------------- run handlers
def start_experiment_run():
    """onstart: take the experiment's lock, then keep the last good version of its artefacts."""
    from snakemake.exceptions import WorkflowError

    from iteralign.artifacts import ExperimentInUse, lock_experiment
    from iteralign.last_good import keep_last_good

    try:
        lock_experiment(EXP)
    except ExperimentInUse as exc:
        raise WorkflowError(str(exc)) from None
    try:
        keep_last_good(EXP)
    except OSError as exc:  # e.g. a file system without hard links: the run goes on, unprotected
        print(f"iteralign: no last-good store for this run: {exc}", file=sys.stderr)


def recover_failed_run():
    """onerror: put back what the failed run removed and did not rebuild, and say which.

    Snakemake may have recorded the failed job's inputs for those outputs; their records
    are dropped, so that it judges the restored files by modification time alone.
    """
    from snakemake.io import IOFile

    from iteralign.last_good import report_failed_run

    for unit in report_failed_run(EXP):
        workflow.persistence.cleanup_metadata(IOFile(str(EXP / unit)))


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
# Content stamps of the inputs outside the experiment, written now (iteralign.external);
# a path that does not exist stops the workflow here in one line naming its config key.
from iteralign.external import write_stamps

STAMPED_INPUTS = iteralign_config.exit_on_input_error(write_stamps, config, EXP)


def stamped_input(key):
    """What rules read for config key ``key``'s external file or folder, namely its
    content stamp, which changes only when the content does (none when the config has none)."""
    return [STAMPED_INPUTS[key]] if key in STAMPED_INPUTS else []


def prompt_source_file():
    return stamped_input("prompts.source")


def sft_data_file():
    return stamped_input("sft.data")


def sft_checkpoint_stamp():
    return stamped_input("policy.sft_checkpoint")


def scorer_files(section="scoring"):
    """What a scorer reads besides the samples: the reward model's folder, if any, as its
    content stamp (``section``: the config section of the scorer)."""
    return stamped_input(f"{section}.reward_model.path")


def evaluation_scorer_files():
    """The held-out evaluation scores with the training scorer and, if set, evaluation.scorer."""
    return scorer_files() + scorer_files("evaluation.scorer")


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


def pruned_checkpoint_note(wildcards):
    """The train job's message when the checkpoint it writes was deleted by retention (else empty):
    a dry run then says plainly that an earlier round is re-trained."""
    from iteralign.retention import was_pruned

    n = int(wildcards.n)
    if not was_pruned(Path(checkpoint_dir(n))):
        return ""
    return (f"train round {n} AGAIN: ckpt_r{n}/FINAL was deleted by checkpoints.keep_last "
            f"({config['checkpoints']['keep_last']}; see {result(f'ckpt_r{n}/pruned.json')}) and a later round "
            f"needs it, so round {n} is re-trained from ckpt_r{n - 1} and every job that reads its checkpoint "
            f"runs again. Keep it next time with a larger checkpoints.keep_last, or null.")


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


def round_feedback(wildcards):
    """feedback_r{n}.json of a trained round (its sidecar counts what was kept); none for round 0."""
    return [] if int(wildcards.n) == 0 else [result(f"feedback_r{wildcards.n}.json")]


def final_targets():
    return (expand(result("eval_r{n}.json"), n=range(ROUNDS + 1)) + [result("audit.tsv"), result("report.html")]
            + expand(log_file("round_r{n}.txt"), n=range(ROUNDS + 1)))


def print_audit_table():
    """The audit table of the experiment on the console (after a successful run that made audit.tsv)."""
    if Path(result("audit.tsv")).exists():
        from iteralign.audit import audit_rows, format_table

        print(f"\n{EXP}:\n{format_table(audit_rows(EXP, BENCH))}\n", flush=True)


# ---------------------------------------------------------------- resources
# Optional keys (None) are left out of a job's resources, so a profile's
# default-resources still apply to them.
_RESOURCE_DEFAULTS = {"mem_mb": 8000, "runtime": 120, "threads": 1, "cpus_per_gpu": None, "gpu_model": None,
                      "partition": None, "account": None, "qos": None, "constraint": None, "slurm_extra": None}


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
    address, read from SLURM when the task starts (multinode_launch_options()). On one
    node the launch goes through iteralign.cluster, which fits it to the GPUs visible
    when the job starts (one process on CPU where there are none).
    """
    training_step = step in MULTINODE_STEPS
    processes = gpus(step)
    if processes == 0 or (processes == 1 and not (training_step and config["training"]["accelerate_config"])):
        return "iteralign"
    config_file = f"--config_file {accelerate_config_file()} " if training_step else ""
    command = (f"accelerate launch {config_file}{multinode_launch_options(step)}"
               f"--num_processes {processes} -m iteralign.cli")
    if nodes(step) > 1:
        return per_node(step, command)
    # fitted to the GPUs the job sees when it starts (fewer than asked: said in its log)
    return f"python -m iteralign.cluster --gpus {processes} -- {command}"


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

    Each is a resource snakemake-executor-plugin-slurm reads: GPUs (gpu_request()),
    cpus_per_gpu, mem_mb, runtime, slurm_partition, slurm_account, qos, constraint
    and slurm_extra; multi-node steps add nodes, tasks and mpi. Partition and
    account fall back to $SBATCH_PARTITION / $SBATCH_ACCOUNT. Unset keys are left out.
    """
    count = gpus(step)
    values = {
        **gpu_request(step),
        "cpus_per_gpu": resource(step, "cpus_per_gpu") if count else None,
        "mem_mb": resource(step, "mem_mb"),
        "runtime": resource(step, "runtime"),
        "slurm_partition": resource(step, "partition") or os.environ.get("SBATCH_PARTITION"),
        "slurm_account": resource(step, "account") or os.environ.get("SBATCH_ACCOUNT"),
        "qos": resource(step, "qos"),
        "constraint": resource(step, "constraint"),
        "slurm_extra": resource(step, "slurm_extra"),
        **multinode_resources(step),
    }
    return {key: value for key, value in values.items() if value is not None}


def gpu_request(step):
    """How a step asks for its GPUs, once: `gpu` (sbatch --gpus=[model:]n) for a one-node job;
    `gres: gpu[:model]:<training.gpus>` (GPUs per node) for a multi-node job, with no total beside it."""
    count, model = gpus(step), resource(step, "gpu_model")
    if nodes(step) > 1:
        per_node = config["training"]["gpus"]
        return {"gres": f"gpu:{model}:{per_node}" if model else f"gpu:{per_node}"}
    return {"gpu": count, "gpu_model": model if count else None}


# ---------------------------------------------------------------- multi-node training
# Steps that may span training.nodes nodes: SLURM starts one task per node
# (`mpi: srun`), and each task runs one `accelerate launch` for its node's GPUs,
# with the first node of the allocation as the main process.
MULTINODE_STEPS = ("reference", "train")
MAIN_PROCESS_PORT = "$((29500 + SLURM_JOB_ID % 10000))"  # jobs sharing a node get different ports


def nodes(step):
    return config["training"]["nodes"] if step in MULTINODE_STEPS else 1


def multinode_resources(step):
    """nodes, one task per node and `mpi: srun` (the GPUs per node: gpu_request())."""
    count = nodes(step)
    if count <= 1:
        return {}
    return {"nodes": count, "tasks": count, "mpi": "srun"}


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


def say_gpu_shortfall():
    """One console line when the config asks for more GPUs than this machine shows."""
    asked = {step: gpus(step) for step in ("sample", "score", "reference", "train")}
    if max(asked.values()) > 0:
        note = gpu_shortfall_note(asked, visible_gpus())
        if note:
            print(f"iteralign: {note}", file=sys.stderr)


# ---------------------------------------------------------------- environments
# One conda env per kind of rule (--sdm conda on a cluster); `make demo` uses .venv,
# and sampling.backend vllm runs sample and evaluate with .venv-vllm's Python (make vllm).
_CONDA_ENVS = {"sample": "vllm", "evaluate": "vllm"}
VLLM_STEPS = ("sample", "evaluate")


def conda_env(step):
    """The rule's conda env file (relative to rules/): vllm for sampling, judge for a served scorer
    (an API judge or a reward model server), else train."""
    name = _CONDA_ENVS.get(step, "train")
    if step == "score" and config["scoring"]["scorer"] in ("judge", "reward_server"):
        name = "judge"
    return f"../envs/{name}.yaml"


def snakemake_manages_envs():
    from snakemake.settings.types import DeploymentMethod

    return DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method


def vllm_python():
    """sampling.vllm_python, else .venv-vllm/bin/python beside the Snakefile."""
    return config["sampling"]["vllm_python"] or str(Path(workflow.basedir) / ".venv-vllm" / "bin" / "python")


def uses_vllm_environment(step):
    return step in VLLM_STEPS and config["sampling"]["backend"] == "vllm" and not snakemake_manages_envs()


def iteralign_command(step):
    """The command a step's shell runs: `iteralign`, or the vLLM environment's (docs/cluster.md)."""
    return f"{vllm_python()} -m iteralign.cli" if uses_vllm_environment(step) else "iteralign"


def check_vllm_environment():
    if uses_vllm_environment("sample") and not Path(vllm_python()).is_file():
        raise iteralign_config.ConfigError(
            f"sampling.backend is 'vllm' but the vLLM environment's Python {vllm_python()} does not exist",
            hint="build it with `make vllm`, set sampling.vllm_python, or use --sdm conda")


iteralign_config.exit_on_input_error(check_vllm_environment)


say_gpu_shortfall()
