"""What the workflow benchmarks share (bench_jobs.py, bench_lag.py): the demo's config in a
scratch workdir, Snakemake run on it, and the seconds of its benchmark files.
(No bench_ prefix: `make bench` runs only the scripts that have one.)"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def demo_config(workdir: Path, **updates) -> Path:
    """The demo's config.yaml in ``workdir``, with top-level keys replaced or sections updated
    (``sampling={"lag": 1}`` changes one key of the section); returns its path."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for key, value in updates.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_snakemake(workdir: Path, config_file: Path, *args: str) -> subprocess.CompletedProcess:
    """The repository's workflow in ``workdir`` with ``config_file``; exits naming the failure."""
    command = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile",
               str(config_file), *args]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"snakemake {' '.join(args)} failed in {workdir}:\n{result.stderr[-4000:]}")
    return result


def benchmark_seconds(path: Path) -> list[float]:
    """The wall seconds (column ``s``) of a Snakemake benchmark file."""
    with path.open() as rows:
        return [float(row["s"]) for row in csv.DictReader(rows, delimiter="\t")]
