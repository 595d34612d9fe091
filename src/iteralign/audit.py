"""``iteralign audit results/<exp>``: one row per round, read from the artefacts alone,
and a check that every artefact's recorded inputs are still the files on disk.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

from iteralign import layout

AUDIT_COLUMNS = [
    "round", "prompts", "samples", "sampled_by", "failed_scores", "sample_reward", "pairs", "prompts_dropped",
    "train_steps", "train_loss", "train_accuracy", "eval_reward", "eval_ci_lo", "eval_ci_hi",
    "win_rate_vs_r0", "win_rate_vs_previous", "lc_reward", "eval_scorer_reward", "kl_to_reference",
    "eval_tokens", "max_length_fraction", "seconds",
]


def _rounds(results: Path) -> list[int]:
    """Every round that has a file (samples_r1.parquet) or checkpoint folder (ckpt_r1) in ``results``."""
    parsed = (layout.parse_round_file(entry.name) for entry in results.iterdir())
    return sorted({found[1] for found in parsed if found})


def _seconds(benchmarks: Path | None, n: int) -> dict[str, float]:
    """Wall seconds per rule of round n, from Snakemake's benchmark files."""
    out: dict[str, float] = {}
    if benchmarks is None or not benchmarks.is_dir():
        return out
    for file in benchmarks.iterdir():
        parsed = layout.parse_round_file(file.name)
        if parsed is None or parsed[1:] != (n, "tsv"):
            continue
        lines = file.read_text().splitlines()
        if len(lines) >= 2:
            header, values = lines[0].split("\t"), lines[1].split("\t")
            try:
                out[parsed[0]] = float(values[header.index("s")])
            except (ValueError, IndexError):
                continue
    return out


def audit_rows(results: str | Path, benchmarks: str | Path | None = None) -> list[dict]:
    """One row per round of ``results`` (AUDIT_COLUMNS that its artefacts have), read from them alone."""
    import pandas as pd

    results = Path(results)
    if not results.is_dir():
        raise FileNotFoundError(f"{results} is not a results folder")
    bench = Path(benchmarks) if benchmarks else None
    if bench is None:  # the layout's <workdir>/benchmarks/<exp>, beside <workdir>/results/<exp>
        guess = results.resolve().parent.parent / "benchmarks" / results.name
        bench = guess if guess.is_dir() else None
    plan = results / layout.PROMPTS
    prompts = pd.read_parquet(plan, columns=["split", "round"]) if plan.exists() else None
    rows = []
    for n in _rounds(results):
        row: dict = {"round": n}
        if prompts is not None and n > 0:
            row["prompts"] = int((prompts["round"] == n).sum())
        row.update(_sampling_cells(results, n))
        row.update(_training_cells(results, n))
        row.update(_evaluation_cells(results / layout.eval_summary(n)))
        seconds = _seconds(bench, n)
        if seconds:
            row["seconds"] = round(sum(seconds.values()), 1)
            row["seconds_by_rule"] = seconds
        rows.append(row)
    return rows


def _sampling_cells(results: Path, n: int) -> dict:
    """samples, sampled_by, failed_scores, sample_reward, pairs and prompts_dropped of round n."""
    import pandas as pd

    from iteralign.artifacts import read_provenance, read_sidecar

    row: dict = {}
    samples, rewards = results / layout.samples(n), results / layout.rewards(n)
    if samples.exists():
        row["samples"] = len(pd.read_parquet(samples, columns=["sample_id"]))
        sampled_by = _sampling_round(read_provenance(samples) or {})
        if sampled_by is not None:
            row["sampled_by"] = f"ckpt_r{sampled_by}"
    if rewards.exists():
        reward = pd.read_parquet(rewards, columns=["reward"])["reward"]
        row["failed_scores"] = int(reward.isna().sum())
        row["sample_reward"] = float(reward.mean())
    feedback_meta = read_sidecar(results / layout.feedback(n))
    if feedback_meta:
        stats = feedback_meta.get("stats", {})
        row["pairs"] = stats.get("pairs", stats.get("items"))
        row["prompts_dropped"] = stats.get("prompts", 0) - stats.get("prompts_kept", 0)
    return row


def _sampling_round(provenance: dict) -> int | None:
    """The round of the checkpoint that sampled: recorded by the sample step, else read from its input's path."""
    if provenance.get("sampling_round") is not None:
        return int(provenance["sampling_round"])
    checkpoint = provenance.get("inputs", {}).get("checkpoint", {}).get("path")
    return layout.round_of_checkpoint(Path(checkpoint)) if checkpoint else None


def _training_cells(results: Path, n: int) -> dict:
    """train_steps, train_loss and train_accuracy of round n, from train_r{n}.jsonl."""
    import numpy as np

    from iteralign.artifacts import read_jsonl

    metrics = results / layout.training_metrics(n)
    if not metrics.exists():
        return {}
    steps = read_jsonl(metrics)
    row: dict = {"train_steps": len(steps)}
    if steps:
        row["train_loss"] = float(np.mean([s["loss"] for s in steps]))
        if "accuracy" in steps[0]:
            row["train_accuracy"] = float(np.mean([s["accuracy"] for s in steps]))
    return row


def _evaluation_cells(summary: Path) -> dict:
    """The eval_* columns from eval_r{n}.json; optional fields it lacks leave their cells out."""
    if not summary.exists():
        return {}
    ev = json.loads(summary.read_text())
    row = dict(eval_reward=ev["mean_reward"], eval_ci_lo=ev["reward_ci95"][0], eval_ci_hi=ev["reward_ci95"][1],
               win_rate_vs_r0=ev["win_rate_vs_r0"], kl_to_reference=ev["kl_to_reference"],
               eval_tokens=ev["mean_output_tokens"])
    optional = {"win_rate_vs_previous": ev.get("win_rate_vs_previous"),
                "lc_reward": ev.get("length_controlled_reward"),
                "max_length_fraction": ev.get("max_length_fraction"),
                "eval_scorer_reward": (ev.get("eval_scorer") or {}).get("mean_reward")}
    row.update({k: v for k, v in optional.items() if v is not None})
    return row


def format_cell(value, missing: str = "-", whole_from: float = 1e4) -> str:
    """A table cell: ``missing`` for None or NaN, a float to 4 significant digits (whole from ``whole_from``)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < whole_from else f"{value:.0f}"
    return str(value)


def format_table(rows: list[dict], columns: list[str] = AUDIT_COLUMNS) -> str:
    columns = [c for c in columns if any(c in r for r in rows)]
    cells = [[format_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def to_tsv(rows: list[dict]) -> str:
    lines = ["\t".join(AUDIT_COLUMNS)]
    for r in rows:
        lines.append("\t".join("" if r.get(c) is None else str(r.get(c)) for c in AUDIT_COLUMNS))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- provenance verification
class ProvenanceProblem(NamedTuple):
    """An artefact whose recorded input (or own content) no longer matches the file on disk."""

    kind: str  # "changed": an input differs from what was consumed (or an external input from its
    # stamp); "missing": it is gone; "modified": the artefact differs from the hash its own sidecar
    # recorded; "mixed": artefacts made with different seeds
    artefact: str
    input: str | None
    message: str


def provenance_artefacts(results: Path) -> list[Path]:
    """Every artefact of an experiment that can carry provenance: its files and checkpoint folders."""
    files = [p for p in sorted(results.iterdir()) if p.is_file() and not p.name.endswith(".meta.json")
             and p.suffix in (".parquet", ".json", ".jsonl")]
    folders = sorted(p for p in results.glob(layout.checkpoint("*")) if p.is_dir())
    return files + folders


def experiment_workdir(results: Path, recorded_paths: list[str]) -> Path:
    """The folder the steps ran in, so that recorded relative paths resolve from anywhere.

    A recorded ``results/demo/x.parquet`` of the experiment ``/runs/a/results/demo``
    ran in ``/runs/a``; with no recorded path inside the experiment, the current folder.
    """
    results = results.resolve()
    for recorded in recorded_paths:
        parts = Path(recorded).parts
        if Path(recorded).is_absolute() or results.name not in parts:
            continue
        depth = parts.index(results.name) + 1  # components of the experiment folder in the recorded path
        if results.parts[-depth:] == parts[:depth]:
            return Path(*results.parts[:-depth]) if len(results.parts) > depth else Path("/")
    return Path.cwd()


def _pruned_sha256(checkpoint: Path) -> str | None:
    """The sha256 a checkpoint had when retention deleted it (ckpt_r{n}/pruned.json), else None."""
    record = checkpoint.parent / layout.PRUNED_RECORD
    if checkpoint.name != layout.CHECKPOINT_FOLDER or not record.is_file():
        return None
    pruned = json.loads(record.read_text())
    return pruned.get("sha256") if pruned.get("deleted") else None


def verify_provenance(results: str | Path, deep: bool = False,
                      hashes: dict[Path, str] | None = None) -> tuple[int, list[ProvenanceProblem]]:
    """Check every artefact's recorded inputs against the files now on disk.

    An input whose hash differs from the one its consumer recorded (or that is
    gone, unless checkpoint retention deleted it after it was consumed: its
    ``pruned.json`` holds the same hash) is a problem naming both files. A JSON/JSONL file whose content no
    longer matches its own sidecar's ``sha256`` is one too; checkpoint folders are
    re-hashed only when ``deep`` (they can be large). Returns (artefacts with
    provenance checked, problems); ``hashes``, when given, is filled with the hash
    of every file it read (by resolved path), for a caller that lists them too.
    """
    from iteralign.artifacts import artifact_sha256, dir_sha256, file_sha256, read_provenance
    from iteralign.external import changed_inputs

    results = Path(results)
    records = [(path, read_provenance(path)) for path in provenance_artefacts(results)]
    records = [(path, meta) for path, meta in records if meta]
    recorded = [entry["path"] for _, meta in records for entry in meta.get("inputs", {}).values()]
    workdir = experiment_workdir(results, recorded)
    current: dict[Path, str] = {} if hashes is None else hashes
    problems = []
    for path, meta in records:
        own = meta.get("sha256")
        if own and (path.is_file() or deep):
            now = file_sha256(path) if path.is_file() else dir_sha256(path)
            if path.is_file():  # a folder's artifact_sha256 is its sidecar's, not this fresh hash
                current[path.resolve()] = now
            if now != own:
                problems.append(ProvenanceProblem(
                    "modified", str(path), None,
                    f"{path} has sha256 {now[:12]}, but its sidecar recorded {own[:12]} when it was written: "
                    "it was modified afterwards"))
        for name, entry in sorted(meta.get("inputs", {}).items()):
            source = Path(entry["path"])
            resolved = source if source.is_absolute() else workdir / source
            if not resolved.exists():
                if _pruned_sha256(resolved) == entry["sha256"]:
                    continue  # deleted by checkpoints.keep_last after it was consumed, as it was then
                problems.append(ProvenanceProblem(
                    "missing", str(path), entry["path"],
                    f"{path} was made from {entry['path']} ({name}), which no longer exists"))
                continue
            if resolved not in current:
                current[resolved] = artifact_sha256(resolved)
            if current[resolved] != entry["sha256"]:
                problems.append(ProvenanceProblem(
                    "changed", str(path), entry["path"],
                    f"{path} was made from {entry['path']} ({name}) with sha256 {entry['sha256'][:12]}, which now "
                    f"has sha256 {current[resolved][:12]}: {source.name} changed after {path.name} consumed it"))
    problems += mixed_seeds(records)
    problems += [ProvenanceProblem("changed", stamp, None, message) for stamp, message in changed_inputs(results)]
    return len(records), problems


def mixed_seeds(records: list[tuple[Path, dict]]) -> list[ProvenanceProblem]:
    """One problem when the experiment's artefacts were made with different seeds: two runs
    (another working folder, another config) wrote into one experiment folder."""
    by_seed: dict = {}
    for path, meta in records:
        if "seed" in meta:
            by_seed.setdefault(meta["seed"], []).append(path.name)
    if len(by_seed) < 2:
        return []
    listed = "; ".join(f"seed {seed}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''} ({len(names)})"
                       for seed, names in sorted(by_seed.items(), key=lambda item: str(item[0])))
    return [ProvenanceProblem("mixed", str(records[0][0].parent), None,
                              f"{records[0][0].parent} mixes artefacts made with {len(by_seed)} seeds ({listed}): "
                              "runs with different configs wrote into one experiment; re-run it under one config")]


def format_problems(checked: int, problems: list[ProvenanceProblem]) -> str:
    if not problems:
        return f"provenance: {checked} artefacts checked, every recorded input matches the file on disk"
    lines = [f"provenance: {len(problems)} problem(s) in {checked} artefacts checked"]
    lines += [f"  {p.kind}: {p.message}" for p in problems]
    return "\n".join(lines)
