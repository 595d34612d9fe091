# Paths, round helpers, resources and input functions shared by every rule.
# Rules stay declarative: anything computed lives here.
import os
import subprocess
import sys
from pathlib import Path

# The package is normally installed (make install); fall back to the source tree.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from iteralign import config as iteralign_config
from iteralign.prompts import planned_rounds


config.update(iteralign_config.validate(config, source="workflow config"))

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


def previous_checkpoint(wildcards):
    return checkpoint_dir(int(wildcards.n) - 1)


def round_checkpoint(wildcards):
    return checkpoint_dir(int(wildcards.n))


def eval_baseline(wildcards):
    return [] if int(wildcards.n) == 0 else [result("eval_r0.parquet")]


def baseline_option(wildcards, input):
    return f"--baseline {input.baseline}" if input.baseline else ""


def output_folder(wildcards, output):
    return str(Path(output[0]).parent)


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


def reference_option(wildcards, input):
    return f"--reference {' '.join(input.reference)}" if input.reference else ""


def final_targets():
    return expand(result("eval_r{n}.json"), n=range(ROUNDS + 1)) + [result("audit.tsv")]


# ---------------------------------------------------------------- resources
_RESOURCE_DEFAULTS = {"mem_mb": 8000, "runtime": 120, "threads": 1}


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


def launcher(step, machine_rank=None, main_process_ip=None, main_process_port=None):
    """Command that runs a step: `iteralign`, or `accelerate launch` over the step's GPUs.

    One process on CPU or one GPU runs plain `iteralign` (unless training.accelerate_config
    names a file); more run `accelerate launch` with the config file of
    accelerate_config_file() and --num_processes/--num_machines from training.gpus and
    training.nodes. Multi-node launches need each node's rank and the main node's
    address, known only inside the job: pass them (e.g. "$SLURM_NODEID") and they are
    added to the command as given.
    """
    training = config["training"]
    processes = gpus(step)
    if processes == 0 or (processes == 1 and training["accelerate_config"] is None):
        return "iteralign"
    command = ["accelerate", "launch", "--config_file", accelerate_config_file(),
               "--num_processes", str(processes), "--num_machines", str(training["nodes"])]
    for flag, value in (("--machine_rank", machine_rank), ("--main_process_ip", main_process_ip),
                        ("--main_process_port", main_process_port)):
        if value is not None:
            command += [flag, str(value)]
    return " ".join(command + ["-m", "iteralign.cli"])


def gpus(step):
    """GPUs a step's job needs; all come from the engine settings, never from the rules."""
    if step in ("sample", "evaluate"):
        return config["sampling"]["tensor_parallel_size"]
    if step == "score":
        return config["scoring"]["gpus"]
    if step in ("reference", "train"):
        return config["training"]["gpus"] * config["training"]["nodes"]
    return 0
