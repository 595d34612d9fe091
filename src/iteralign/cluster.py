"""Where a step runs: the scheduler job and the GPUs it was granted.

Every command logs this at start and every artefact's provenance records it, so a
job's log shows what SLURM gave it (tests/test_slurm.py checks from the logs that
each job was granted the GPUs its rule declared).
"""

from __future__ import annotations

import os
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
