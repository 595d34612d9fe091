"""The demo's rounds on-policy (sampling.lag 0) and lagged by one round (sampling.lag 1).

    python scripts/bench_lag.py            # what `make bench` runs
    python scripts/bench_lag.py --cores 2 --keep /tmp/lag-bench

Both runs share the part before round 1 (plan, SFT, round 0's evaluation): it runs
once, and the workdir is copied. Then each runs all rounds with Snakemake, two jobs at
a time by default (the demo's set-up), and this prints for each:

- wall: seconds from the start of round 1 to the report;
- job-seconds: the sum of the Snakemake benchmark times of those jobs;
- critical path: the longest chain of jobs through the DAG (from `snakemake -n
  --forceall`'s inputs and outputs), weighted by the same benchmark times: the wall
  time with unlimited cores, i.e. what a cluster that runs every ready job at once
  would take;
- the held-out reward (eval_r{n}.json mean_reward) reached at each round.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from workflow_bench import REPO, benchmark_seconds, demo_config, run_snakemake

sys.path.insert(0, str(REPO / "src"))

from iteralign.layout import round_files  # noqa: E402

EXPERIMENT = "demo"
SHARED_RULES = ("plan", "sft", "link_sft")


def snakemake(workdir: Path, *args: str):
    return run_snakemake(workdir, workdir / "config.yaml", *args)


def planned_jobs(workdir: Path) -> list[dict]:
    """Every job of the workflow with its inputs, outputs and benchmark file (a forced dry run)."""
    out = snakemake(workdir, "-n", "--forceall", "--cores", "1")
    jobs: list[dict] = []
    for line in (out.stdout + out.stderr).splitlines():
        header = re.match(r"^(?:local)?rule (\w+):$", line)
        if header:
            jobs.append({"rule": header.group(1), "input": [], "output": [], "benchmark": None})
        elif jobs and (field := re.match(r"^    (input|output|benchmark): (.*)$", line)):
            key, value = field.groups()
            if key == "benchmark":
                jobs[-1]["benchmark"] = value
            else:
                jobs[-1][key] = value.split(", ")
    return jobs


def seconds(workdir: Path, job: dict) -> float:
    """The job's wall time from its Snakemake benchmark file (0 for a job without one)."""
    path = workdir / job["benchmark"] if job["benchmark"] else None
    return benchmark_seconds(path)[0] if path is not None and path.exists() else 0.0


def critical_path(jobs: list[dict], weight: dict[int, float]) -> tuple[float, list[int]]:
    """Longest weighted chain of jobs: job B follows job A when B reads a file or folder A writes."""
    producer = {path: i for i, job in enumerate(jobs) for path in job["output"]}

    def parents(i: int) -> set[int]:
        found = set()
        for path in jobs[i]["input"]:
            for output, j in producer.items():
                if j != i and (path == output or path.startswith(output.rstrip("/") + "/")):
                    found.add(j)
        return found

    best: dict[int, tuple[float, list[int]]] = {}

    def longest(i: int) -> tuple[float, list[int]]:
        if i not in best:
            chains = [longest(j) for j in parents(i)]
            before = max(chains, default=(0.0, []))
            best[i] = (before[0] + weight[i], [*before[1], i])
        return best[i]

    return max((longest(i) for i in range(len(jobs))), key=lambda found: found[0])


def rounds_job(job: dict) -> bool:
    """A job of the rounds (what the timed run does), not of the shared part before them."""
    return job["rule"] not in SHARED_RULES and not re.search(r"_r0\.", " ".join(job["output"]))


def measure(workdir: Path, cores: int) -> dict:
    start = time.monotonic()
    snakemake(workdir, "--cores", str(cores))
    wall = time.monotonic() - start
    jobs = planned_jobs(workdir)
    weight = {i: seconds(workdir, job) if rounds_job(job) else 0.0 for i, job in enumerate(jobs)}
    length, chain = critical_path(jobs, weight)
    results = workdir / "results" / EXPERIMENT
    rewards = {n: json.loads(path.read_text())["mean_reward"] for n, path in round_files(results, "eval", "json")}
    return {"wall": wall, "job_seconds": sum(weight.values()), "critical_path": length,
            "chain": [f"{jobs[i]['rule']}{_round(jobs[i])}" for i in chain if weight[i] > 0], "rewards": rewards}


def _round(job: dict) -> str:
    found = re.search(r"_r(\d+)", " ".join(job["output"]))
    return f" r{found.group(1)}" if found else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", default=None, help="keep the workdirs in this folder (default: a temporary one)")
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-lag-"))
    shared = root / "lag0"
    demo_config(shared, sampling={"lag": 0})
    print(f"shared part (plan, SFT, round 0 evaluation) in {shared} ...", flush=True)
    snakemake(shared, "--cores", str(args.cores), f"results/{EXPERIMENT}/eval_r0.json")
    lagged = root / "lag1"
    shutil.copytree(shared, lagged, symlinks=True)
    demo_config(lagged, sampling={"lag": 1})
    figures = {lag: measure(root / f"lag{lag}", args.cores) for lag in (0, 1)}
    print(f"\nthe demo's {len(figures[0]['rewards']) - 1} rounds, {args.cores} jobs at a time (seconds; "
          "critical path: the benchmark times along the DAG's longest chain)")
    print(f"{'sampling.lag':>12} {'wall':>7} {'job-s':>7} {'critical':>9}   held-out reward by round")
    for lag, f in figures.items():
        rewards = " ".join(f"r{n}={r:.3f}" for n, r in sorted(f["rewards"].items()))
        print(f"{lag:>12} {f['wall']:>7.1f} {f['job_seconds']:>7.1f} {f['critical_path']:>9.1f}   {rewards}")
    for lag, f in figures.items():
        print(f"critical path, lag {lag}: {' > '.join(f['chain'])}")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
