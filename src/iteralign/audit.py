"""``iteralign audit results/<exp>``: one row per round, read from the artefacts alone."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

AUDIT_COLUMNS = [
    "round", "prompts", "samples", "failed_scores", "sample_reward", "pairs", "prompts_dropped",
    "train_steps", "train_loss", "train_accuracy", "eval_reward", "eval_ci_lo", "eval_ci_hi",
    "win_rate_vs_r0", "kl_to_reference", "eval_tokens", "seconds",
]
_ROUND_FILE = re.compile(r"^(?P<kind>[a-z]+)_r(?P<n>\d+)\.(?P<ext>parquet|json|jsonl|tsv)$")


def _rounds(results: Path) -> list[int]:
    found = set()
    for file in results.iterdir():
        match = _ROUND_FILE.match(file.name)
        if match:
            found.add(int(match["n"]))
    for folder in results.glob("ckpt_r*"):
        if folder.name[6:].isdigit():
            found.add(int(folder.name[6:]))
    return sorted(found)


def _seconds(benchmarks: Path | None, n: int) -> dict[str, float]:
    """Wall seconds per rule of round n, from Snakemake's benchmark files."""
    out: dict[str, float] = {}
    if benchmarks is None or not benchmarks.is_dir():
        return out
    for file in benchmarks.glob(f"*_r{n}.tsv"):
        lines = file.read_text().splitlines()
        if len(lines) >= 2:
            header, values = lines[0].split("\t"), lines[1].split("\t")
            try:
                out[file.name[: -len(f"_r{n}.tsv")]] = float(values[header.index("s")])
            except (ValueError, IndexError):
                continue
    return out


def audit_rows(results: str | Path, benchmarks: str | Path | None = None) -> list[dict]:
    import numpy as np
    import pandas as pd

    from iteralign.artifacts import read_sidecar

    results = Path(results)
    if not results.is_dir():
        raise FileNotFoundError(f"{results} is not a results folder")
    bench = Path(benchmarks) if benchmarks else None
    if bench is None:
        guess = Path("benchmarks") / results.name
        bench = guess if guess.is_dir() else None
    plan = results / "prompts.parquet"
    prompts = pd.read_parquet(plan, columns=["split", "round"]) if plan.exists() else None
    rows = []
    for n in _rounds(results):
        row: dict = {"round": n}
        if prompts is not None and n > 0:
            row["prompts"] = int((prompts["round"] == n).sum())
        samples, rewards = results / f"samples_r{n}.parquet", results / f"rewards_r{n}.parquet"
        if samples.exists():
            row["samples"] = len(pd.read_parquet(samples, columns=["sample_id"]))
        if rewards.exists():
            reward = pd.read_parquet(rewards, columns=["reward"])["reward"]
            row["failed_scores"] = int(reward.isna().sum())
            row["sample_reward"] = float(reward.mean())
        feedback_meta = read_sidecar(results / f"feedback_r{n}.json")
        if feedback_meta:
            stats = feedback_meta.get("stats", {})
            row["pairs"] = stats.get("pairs", stats.get("items"))
            row["prompts_dropped"] = stats.get("prompts", 0) - stats.get("prompts_kept", 0)
        metrics = results / f"train_r{n}.jsonl"
        if metrics.exists():
            steps = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            row["train_steps"] = len(steps)
            if steps:
                row["train_loss"] = float(np.mean([s["loss"] for s in steps]))
                if "accuracy" in steps[0]:
                    row["train_accuracy"] = float(np.mean([s["accuracy"] for s in steps]))
        summary = results / f"eval_r{n}.json"
        if summary.exists():
            ev = json.loads(summary.read_text())
            row.update(eval_reward=ev["mean_reward"], eval_ci_lo=ev["reward_ci95"][0], eval_ci_hi=ev["reward_ci95"][1],
                       win_rate_vs_r0=ev["win_rate_vs_r0"], kl_to_reference=ev["kl_to_reference"],
                       eval_tokens=ev["mean_output_tokens"])
        seconds = _seconds(bench, n)
        if seconds:
            row["seconds"] = round(sum(seconds.values()), 1)
            row["seconds_by_rule"] = seconds
        rows.append(row)
    return rows


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def format_table(rows: list[dict], columns: list[str] = AUDIT_COLUMNS) -> str:
    columns = [c for c in columns if any(c in r for r in rows)]
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def to_tsv(rows: list[dict]) -> str:
    lines = ["\t".join(AUDIT_COLUMNS)]
    for r in rows:
        lines.append("\t".join("" if r.get(c) is None else str(r.get(c)) for c in AUDIT_COLUMNS))
    return "\n".join(lines) + "\n"
