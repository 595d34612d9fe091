"""Fixed cost per job: what each rule's job spends besides its work, over a demo-like run.

Runs the workflow (the demo config, or the micro config of the tests with --micro) under
a separate experiment name in a temporary folder, then, for each rule, re-runs one of its
jobs by hand (its own command, from the artefact's provenance) --repeats times under
``python -X importtime`` through a small runner that times the step's work window: from the
step's Provenance (or, for audit and report, the start of the step's function) to the
artefact's record, less the imports made inside that window. Prints per rule:

    wall     median of Snakemake's benchmark ``s`` over the workflow's jobs of that rule
    rerun    median wall of the by-hand re-runs (interpreter start to exit)
    work     median work of the re-runs (window minus the imports inside it)
    fixed    rerun - work: interpreter, imports, config, what runs before and after the work
    torch, transformers, pandas: import seconds of each in the step, with what it pulls in (0: not imported)
    imports  import seconds of everything the step imports (under -X importtime, which adds a little)

and the workflow's own wall time and the sum of its jobs' benchmark seconds.

    python scripts/bench_jobs.py [--micro] [--cores 2] [--repeats 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from workflow_bench import BIN, REPO, benchmark_seconds, demo_config, run_snakemake

HEAVY = ("torch", "transformers", "pandas")

# Runs `iteralign <step> ...` and writes the step's work window to $BENCH_JOBS_WINDOW (JSON):
# its start and end (monotonic seconds) and the modules already imported at its start.
RUNNER = r'''
import json, os, sys, time
from iteralign import artifacts, cli

window = {}

def opened():
    if "start" not in window:
        window["start"], window["modules"] = time.monotonic(), sorted(sys.modules)

original_init, original_record = artifacts.Provenance.__init__, artifacts.Provenance.record

def init(self, *args, **kwargs):
    opened()
    original_init(self, *args, **kwargs)

def record(self, **extra):
    window["end"] = time.monotonic()
    return original_record(self, **extra)

def timed(func):
    def run(args):
        opened()
        try:
            return func(args)
        finally:
            window.setdefault("end", time.monotonic())
    return run

artifacts.Provenance.__init__, artifacts.Provenance.record = init, record
cli._COMMANDS = [(name, timed(func), *rest) for name, func, *rest in cli._COMMANDS]
status = cli.main(sys.argv[1:])
with open(os.environ["BENCH_JOBS_WINDOW"], "w") as out:
    json.dump(window, out)
sys.exit(status)
'''

IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


def workflow_config(workdir: Path, micro: bool) -> Path:
    """The demo's config (or the tests' micro config) as experiment bench-jobs in ``workdir``."""
    if micro:
        sys.path.insert(0, str(REPO / "tests"))
        from helpers import new_workdir

        new_workdir(workdir, experiment="bench-jobs-micro")
        return workdir / "config.yaml"
    return demo_config(workdir, experiment="bench-jobs")


def run_workflow(workdir: Path, config_file: Path, cores: int) -> float:
    """Runs the workflow to its end; returns its wall seconds."""
    started = time.monotonic()
    run_snakemake(workdir, config_file, "--cores", str(cores))
    return time.monotonic() - started


def benchmark_walls(bench_dir: Path) -> dict[str, list[float]]:
    """Snakemake's benchmark seconds by rule (the file name less its round)."""
    walls: dict[str, list[float]] = {}
    for path in sorted(bench_dir.glob("*.tsv")):
        walls.setdefault(re.sub(r"_r\d+$", "", path.stem), []).extend(benchmark_seconds(path))
    return walls


def job_commands(workdir: Path, exp: Path, bench_dir: Path, config_file: str) -> dict[str, list[str]]:
    """One job's `iteralign` arguments per rule (paths relative to ``workdir``): from its artefact's
    provenance, or as the rule writes them."""
    from iteralign.artifacts import read_provenance

    artefacts = {"plan": "prompts.parquet", "sft": "sft.jsonl", "sample": "samples_r1.parquet",
                 "score": "rewards_r1.parquet", "feedback": "feedback_r1.json", "reference": "reflogps_r1.parquet",
                 "train": "train_r1.jsonl", "evaluate": "eval_r1.parquet"}
    commands = {}
    for rule, name in artefacts.items():
        provenance = read_provenance(workdir / exp / name) if (workdir / exp / name).exists() else None
        if provenance:
            commands[rule] = provenance["command"].split()[1:]
    commands["audit"] = ["audit", str(exp), "--benchmarks", str(bench_dir), "--output", str(exp / "audit.tsv")]
    commands["report"] = ["report", str(exp), "--config", config_file, "--benchmarks", str(bench_dir),
                          "--output", str(exp / "report.html")]
    return commands


def import_seconds(lines: list[str], modules_before: set[str]) -> tuple[dict[str, float], float]:
    """Import seconds by HEAVY package, of everything, and of the imports made after ``modules_before``.

    A package's figure is the cumulative time of its outermost imports: those not made while
    another HEAVY package was importing (torch._dynamo and sympy, which transformers pulls in,
    count for transformers). ``imports`` sums the top-level imports.
    """
    entries = [match.groups() for match in map(IMPORT_LINE.match, lines) if match]
    seconds = dict.fromkeys((*HEAVY, "imports"), 0.0)
    inside, enclosing = 0.0, []  # enclosing: (indent, package) of the imports the current one is part of
    for self_us, cumulative_us, indent, name in reversed(entries):  # -X importtime prints children first
        while enclosing and enclosing[-1][0] >= len(indent):
            enclosing.pop()
        package = name.split(".")[0]
        if package in HEAVY and not any(p in HEAVY for _, p in enclosing):
            seconds[package] += int(cumulative_us) / 1e6
        if len(indent) == 1:
            seconds["imports"] += int(cumulative_us) / 1e6
        if name not in modules_before:
            inside += int(self_us) / 1e6
        enclosing.append((len(indent), package))
    return seconds, inside


def rerun(workdir: Path, arguments: list[str], runner: Path) -> dict:
    """One by-hand run of a job under -X importtime: wall, work and import seconds."""
    window_file = workdir / "window.json"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "BENCH_JOBS_WINDOW": str(window_file),
           "PYTHONPATH": f"{workdir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-X", "importtime", str(runner), *arguments], cwd=workdir, env=env,
                            capture_output=True, text=True)
    wall = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"bench_jobs: iteralign {' '.join(arguments)} failed:\n{result.stderr[-3000:]}")
    window = json.loads(window_file.read_text())
    heavy, inside = import_seconds(result.stderr.splitlines(), set(window["modules"]))
    return {"wall": wall, "work": max(window["end"] - window["start"] - inside, 0.0), **heavy}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(walls: dict[str, list[float]], reruns: dict[str, list[dict]]) -> None:
    header = f"{'rule':<10} {'jobs':>4} {'wall':>6} {'rerun':>6} {'work':>6} {'fixed':>6}" + "".join(
        f" {name:>12}" for name in (*HEAVY, "imports"))
    print(header)
    for rule in sorted(set(walls) | set(reruns)):
        runs = reruns.get(rule, [])
        rerun_wall, work = median([r["wall"] for r in runs]), median([r["work"] for r in runs])
        imports = "".join(f" {median([r.get(name, 0.0) for r in runs]):>12.2f}" for name in (*HEAVY, "imports"))
        print(f"{rule:<10} {len(walls.get(rule, [])):>4} {median(walls.get(rule, [])):>6.2f} {rerun_wall:>6.2f} "
              f"{work:>6.2f} {rerun_wall - work:>6.2f}{imports}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", action="store_true", help="the tests' micro config instead of the demo's")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="by-hand re-runs of each rule's job")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))

    workdir = Path(tempfile.mkdtemp(prefix="bench_jobs_"))
    try:
        config_file = workflow_config(workdir, args.micro)
        experiment = yaml.safe_load(config_file.read_text())["experiment"]
        seconds = run_workflow(workdir, config_file, args.cores)
        exp, bench_dir = workdir / "results" / experiment, workdir / "benchmarks" / experiment
        walls = benchmark_walls(bench_dir)
        runner = workdir / "bench_jobs_runner.py"
        runner.write_text(RUNNER)
        resolved = str(next((exp / "config").glob("*.yaml")).relative_to(workdir))
        commands = job_commands(workdir, exp.relative_to(workdir), bench_dir.relative_to(workdir), resolved)
        reruns = {rule: [rerun(workdir, arguments, runner) for _ in range(1 if rule == "sft" else args.repeats)]
                  for rule, arguments in commands.items()}  # sft: once, it trains for half a minute
        print(f"workflow ({'micro' if args.micro else 'demo'} config, --cores {args.cores}): {seconds:.1f} s wall, "
              f"{sum(sum(v) for v in walls.values()):.1f} job-seconds (sum of benchmark s)")
        print_table(walls, reruns)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
