"""Where a step runs: the scheduler job and the GPUs it was granted.

Every command logs this at start and every artefact's provenance records it, so a
job's log shows what SLURM gave it (tests/test_slurm.py checks from the logs that
each job was granted the GPUs its rule declared).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

# SLURM's job identity and GPU grant; CUDA_VISIBLE_DEVICES is what torch and vLLM obey.
JOB_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_NODEID",
    "SLURM_JOB_GPUS",
    "SLURM_STEP_GPUS",
    "CUDA_VISIBLE_DEVICES",
)


def job_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The job variables that are set (all of them absent outside a scheduler and without GPUs)."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in JOB_VARIABLES if name in environ}


def is_main_process() -> bool:
    """False in the non-zero ranks of an ``accelerate launch``ed step (they leave writing to rank 0)."""
    return int(os.environ.get("RANK", "0")) == 0


def commands_beside_python_first(python: str, environ: dict | None = None) -> None:
    """Put the folder of ``python`` first on PATH when the iteralign command is installed there.

    The workflow calls this with the Python that runs Snakemake, so its rules run the
    `iteralign` and `accelerate` of the same environment (.venv/bin/snakemake from any
    shell). A rule's conda env (--sdm conda) is activated in front of it, and wins.
    """
    environ = os.environ if environ is None else environ
    folder = Path(python).parent
    if (folder / "iteralign").exists():
        environ["PATH"] = f"{folder}{os.pathsep}{environ.get('PATH', '')}"


# ---------------------------------------------------------------- GPUs asked for, GPUs visible
def visible_gpus() -> int:
    """CUDA devices torch can use in this process (0 on a machine without them)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def fitted_command(command: list[str], asked: int, visible: int, python: str) -> tuple[list[str], str | None]:
    """``accelerate launch ... --num_processes <asked> -m iteralign.cli <step> ...`` fitted to the visible GPUs.

    With ``asked`` GPUs visible the command is unchanged. With fewer, but at least two, it starts
    one process per visible GPU. With one or none it runs the step in one process
    (``<python> -m iteralign.cli <step> ...``: on CPU without a GPU). The second value is the line
    that says what changed (None when nothing did).
    """
    if visible >= asked:
        return command, None
    step_arguments = command[command.index("iteralign.cli") + 1:]
    if visible >= 2:
        fitted = list(command)
        fitted[fitted.index("--num_processes") + 1] = str(visible)
        how = f"{visible} processes, one per visible GPU"
    else:
        fitted = [python, "-m", "iteralign.cli", *step_arguments]
        how = "1 process on " + ("the visible GPU" if visible else "CPU")
    step = step_arguments[0] if step_arguments else "the step"
    return fitted, f"iteralign {step}: {asked} GPUs asked for, {visible} visible here: running {how}"


def gpu_shortfall_note(asked: Mapping[str, int], visible: int) -> str | None:
    """One line for the console when steps ask for more GPUs than this machine shows (None otherwise)."""
    short = {step: count for step, count in asked.items() if count > visible}
    if not short:
        return None
    steps = ", ".join(f"{step} {count}" for step, count in short.items())
    return (f"GPUs asked for ({steps}), {visible} visible on this machine: jobs run here use what it has "
            "(several processes only where several GPUs are visible); jobs submitted to a cluster get what they ask for")


def main(argv: list[str] | None = None) -> int:
    """``python -m iteralign.cluster --gpus N -- accelerate launch ...``: run the launch fitted to the visible GPUs."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 4 or argv[0] != "--gpus" or argv[2] != "--" or "iteralign.cli" not in argv:
        print("usage: python -m iteralign.cluster --gpus N -- accelerate launch ... -m iteralign.cli <step> ...",
              file=sys.stderr)
        return 2
    command, note = fitted_command(argv[3:], int(argv[1]), visible_gpus(), sys.executable)
    if note:
        print(note, file=sys.stderr, flush=True)
    os.execvp(command[0], command)
    return 0  # not reached: execvp replaces this process


if __name__ == "__main__":
    sys.exit(main())
