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


def eval_previous(wildcards):
    n = int(wildcards.n)
    return [] if n == 0 else [result(f"eval_r{n - 1}.parquet")]


def baseline_option(wildcards, input):
    return f"--baseline {input.baseline}" if input.baseline else ""


def previous_option(wildcards, input):
    return f"--previous {input.previous}" if input.previous else ""


def output_folder(wildcards, output):
    return str(Path(output[0]).parent)


def final_targets():
    return expand(result("eval_r{n}.json"), n=range(ROUNDS + 1)) + [result("audit.tsv"), result("report.html")]


# ---------------------------------------------------------------- resources
_RESOURCE_DEFAULTS = {"mem_mb": 8000, "runtime": 120, "threads": 1}


def resource(step, key):
    """A step's resource from config.resources.<step>, else .default, else a built-in default."""
    section = config["resources"]
    for source in (section.get(step, {}), section.get("default", {})):
        if key in source:
            return source[key]
    return _RESOURCE_DEFAULTS[key]


def launcher(step):
    """Command that runs a step: `iteralign`, or `accelerate launch` over the step's GPUs."""
    processes = gpus(step)
    if processes <= 1:
        return "iteralign"
    return f"accelerate launch --num_processes {processes} -m iteralign.cli"


def gpus(step):
    """GPUs a step's job needs; all come from the engine settings, never from the rules."""
    if step in ("sample", "evaluate"):
        return config["sampling"]["tensor_parallel_size"]
    if step == "score":
        return config["scoring"]["gpus"]
    if step in ("reference", "train"):
        return config["training"]["gpus"] * config["training"]["nodes"]
    return 0
