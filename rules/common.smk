# Paths, round helpers and input functions shared by every rule. Rules stay declarative:
# file names come from iteralign.layout, commands and resources from iteralign.launch.
import os
import sys
from functools import partial
from pathlib import Path

from iteralign import config as iteralign_config
from iteralign import launch, layout
from iteralign.artifacts import git_commit
from iteralign.cluster import commands_beside_python_first, visible_gpus
from iteralign.external import write_stamps
from iteralign.prompts import PromptError, fewer_rounds_note, planned_rounds
from iteralign.retention import retrain_note


EXP = iteralign_config.experiment_dir(config)
LOGS = Path("logs") / config["experiment"]
BENCH = Path("benchmarks") / config["experiment"]
ROUNDS = iteralign_config.exit_on_input_error(planned_rounds, config, errors=(PromptError,))
if fewer_rounds_note(config, ROUNDS):
    print(f"iteralign: {fewer_rounds_note(config, ROUNDS)}", file=sys.stderr)
TRAIN_ROUNDS = list(range(1, ROUNDS + 1))

# Rules call `iteralign` (and `accelerate`): those beside the Python that runs Snakemake come
# first, so `.venv/bin/snakemake` works from a shell without .venv/bin on its PATH.
commands_beside_python_first(sys.executable)
os.environ.setdefault("ITERALIGN_GIT_COMMIT", git_commit(workflow.basedir) or "")
# envs/install-iteralign.sh (the post-deploy script of every conda env) installs the package from here.
os.environ.setdefault("ITERALIGN_SOURCE", str(workflow.basedir))
# The validated config with defaults, written once per content; every step reads it (params.config).
# The profiles leave `params` out of rerun-triggers, so editing the config does not silently
# re-run finished rounds: re-run what you mean with --forcerun (docs/workflow.md).
CONFIG_FILE = str(iteralign_config.write_resolved(config))
# Content stamps of the inputs outside the experiment, written now (iteralign.external);
# a path that does not exist stops the workflow here in one line naming its config key.
STAMPED_INPUTS = iteralign_config.exit_on_input_error(write_stamps, config, EXP)


# ---------------------------------------------------------------- run handlers
def start_experiment_run():
    """onstart: take the experiment's lock, then keep the last good version of its artefacts."""
    from snakemake.exceptions import WorkflowError

    from iteralign.artifacts import ExperimentInUse
    from iteralign.last_good import start_run

    try:
        start_run(EXP)
    except ExperimentInUse as exc:
        raise WorkflowError(str(exc)) from None


def recover_failed_run():
    """onerror: put back what the failed run removed and did not rebuild, and say which.

    Snakemake may have recorded the failed job's inputs for those outputs; their records
    are dropped, so that it judges the restored files by modification time alone.
    """
    from snakemake.io import IOFile

    from iteralign.last_good import report_failed_run

    for unit in report_failed_run(EXP):
        workflow.persistence.cleanup_metadata(IOFile(str(EXP / unit)))


def print_audit_table():
    """onsuccess: the audit table of the experiment on the console, as `iteralign audit` prints it."""
    if Path(result(layout.AUDIT)).exists():
        from iteralign.audit import audit_rows, format_table

        print(f"\n{EXP}:\n{format_table(audit_rows(EXP, BENCH))}\n", flush=True)


# ---------------------------------------------------------------- paths (names: iteralign.layout)
def result(name):
    return str(EXP / name)


def log_file(step, n=None):
    return str(LOGS / layout.step_log(step, n))


def bench_file(step, n=None):
    return str(BENCH / layout.benchmark(step, n))


def checkpoint_dir(n):
    return result(layout.checkpoint(n))


def every_round(name, rounds):
    """``name`` (a layout function) of each of ``rounds``, in the experiment folder."""
    return [result(name(n)) for n in rounds]


# ---------------------------------------------------------------- input functions
def stamped_input(key):
    """What rules read for config key ``key``'s external file or folder, namely its
    content stamp, which changes only when the content does (none when the config has none)."""
    return [STAMPED_INPUTS[key]] if key in STAMPED_INPUTS else []


def scorer_files(section="scoring"):
    """What a scorer reads besides the samples: the reward model's folder, if any, as its
    content stamp (``section``: the config section of the scorer)."""
    return stamped_input(f"{section}.reward_model.path")


def evaluation_scorer_files():
    """The held-out evaluation scores with the training scorer and, if set, evaluation.scorer."""
    return scorer_files() + scorer_files("evaluation.scorer")


def previous_checkpoint(wildcards):
    return checkpoint_dir(int(wildcards.n) - 1)


def sampling_checkpoint(wildcards):
    """The checkpoint that samples round n: ckpt_r{n-1}, or sampling.lag rounds older."""
    return checkpoint_dir(iteralign_config.sampling_round(config, int(wildcards.n)))


def round_checkpoint(wildcards):
    return checkpoint_dir(int(wildcards.n))


def eval_baseline(wildcards):
    return [] if int(wildcards.n) == 0 else [result(layout.eval_table(0))]


def eval_previous(wildcards):
    n = int(wildcards.n)
    return [] if n == 0 else [result(layout.eval_table(n - 1))]


def input_options(*names):
    """A params function: `--<name, with hyphens> <the rule's input files called name>` for each
    of ``names`` that has files, one space apart (nothing for those without)."""

    def render(wildcards, input):
        options = []
        for name in names:
            files = getattr(input, name)
            files = [files] if isinstance(files, str) else list(files)
            if files:
                options.append(f"--{name.replace('_', '-')} {' '.join(files)}")
        return " ".join(options)

    return render


def output_folder(wildcards, output):
    return str(Path(output[0]).parent)


def later_training_metrics(wildcards):
    """train_r{n+K}.jsonl: round n+K finished training (checkpoints.keep_last = K)."""
    return result(layout.training_metrics(int(wildcards.n) + config["checkpoints"]["keep_last"]))


def lagged_readers(wildcards):
    """Under sampling.lag, what round n+1+lag reads from ckpt_r{n}: its samples and old-policy
    table (none without a lag: round n+1 samples before round n+K trains)."""
    reader = int(wildcards.n) + 1 + config["sampling"]["lag"]
    if not config["sampling"]["lag"] or reader > ROUNDS:
        return []
    tables = [layout.old_policy_logps(reader)] if iteralign_config.old_policy_job(config) else []
    return [result(name) for name in [layout.samples(reader), *tables]]


def pruned_checkpoint_note(wildcards):
    return retrain_note(config, int(wildcards.n))


def pruned_checkpoints():
    """ckpt_r{n}/pruned.json of every round whose checkpoint retention deletes (none when keep_last is null)."""
    keep = config["checkpoints"]["keep_last"]
    return [] if keep is None else every_round(layout.pruned_record, range(1, ROUNDS - keep + 1))


def train_feedback(wildcards):
    """The feedback files round n trains on: its own, or several rounds' (training.history)."""
    return every_round(layout.feedback, iteralign_config.history_rounds(config["training"], int(wildcards.n)))


def train_reference(wildcards):
    """Their reference tables, each computed once by its own round's reference job;
    none for reference-free losses, so the reference rule does not run at all."""
    if not iteralign_config.uses_reference_job(config["training"]):
        return []
    return every_round(layout.reference_logps, iteralign_config.history_rounds(config["training"], int(wildcards.n)))


def old_policy_table(wildcards):
    """GRPO's old-policy table of round n when sampling lags (the old_policy job); none otherwise."""
    return [result(layout.old_policy_logps(wildcards.n))] if iteralign_config.old_policy_job(config) else []


def lora_base(wildcards):
    """The SFT checkpoint under a LoRA round's adapter (training.lora); none for full fine-tuning."""
    return [checkpoint_dir(0)] if config["training"]["lora"] else []


def round_feedback(wildcards):
    """feedback_r{n}.json of a trained round (its sidecar counts what was kept); none for round 0."""
    return [] if int(wildcards.n) == 0 else [result(layout.feedback(wildcards.n))]


def final_targets():
    return (every_round(layout.eval_summary, range(ROUNDS + 1)) + [result(layout.AUDIT), result(layout.REPORT)]
            + [str(LOGS / layout.round_summary(n)) for n in range(ROUNDS + 1)])


# ---------------------------------------------------------------- jobs (iteralign.launch)
def snakemake_manages_envs():
    from snakemake.settings.types import DeploymentMethod

    return DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method


# Each takes the step (the rule's name): resource(step, key), job_resources(step), ...
resource = partial(launch.resource, config)
job_resources = partial(launch.job_resources, config)
conda_env = partial(launch.conda_env, config)
launcher = partial(launch.launcher, config, basedir=workflow.basedir)
iteralign_command = partial(
    launch.iteralign_command, config, basedir=workflow.basedir, conda_managed=snakemake_manages_envs()
)

iteralign_config.exit_on_input_error(launch.check_vllm_environment, config, workflow.basedir, snakemake_manages_envs())
if GPU_NOTE := launch.gpu_shortfall(config, visible_gpus):
    print(f"iteralign: {GPU_NOTE}", file=sys.stderr)
