"""The results layout: the name of every file and folder a run writes, in one place.

An experiment's artefacts live in ``<results_dir>/<experiment>/`` (config.experiment_dir),
its step logs in ``logs/<experiment>/`` and Snakemake's benchmark files in
``benchmarks/<experiment>/``. Every name below is relative to its folder. Each
function takes a round number, or the wildcard ``"{n}"`` where a rule names a pattern
(``layout.samples("{n}")`` is ``samples_r{n}.parquet``). The rules (rules/common.smk)
and the package (audit, report, show, retention, last_good) name files only through
this module; :data:`ROUND_FILE` is the one pattern that reads a round back from a name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

Round = int | str  # a round number, or "{n}" in a rule's pattern

PROMPTS = "prompts.parquet"  # the plan: held-out and per-round training prompts
SFT_METRICS = "sft.jsonl"  # the built-in SFT's training curve
AUDIT = "audit.tsv"
REPORT = "report.html"
CHECKPOINT_FOLDER = "FINAL"  # ckpt_r{n}/FINAL: a complete Hugging Face checkpoint
PRUNED_RECORD = "pruned.json"  # ckpt_r{n}/pruned.json: what checkpoint retention deleted

# <kind>_r<n>[.<ext>]: a round's file (samples_r1.parquet), checkpoint folder (ckpt_r1),
# log (train_r1.log) or benchmark (prune_checkpoint_r1.tsv). A sidecar
# (feedback_r1.json.meta.json) is not a round file.
ROUND_FILE = re.compile(r"^(?P<kind>[a-z][a-z_]*)_r(?P<n>\d+)(?:\.(?P<ext>parquet|jsonl|json|tsv|txt|log))?$")


def round_name(kind: str, round_n: Round, ext: str) -> str:
    return f"{kind}_r{round_n}.{ext}"


def _round_file(kind: str, ext: str, what: str) -> Callable[[Round], str]:
    def name(round_n: Round) -> str:
        return round_name(kind, round_n, ext)

    name.__doc__ = f"{kind}_r{{n}}.{ext}: {what}"
    return name


samples = _round_file("samples", "parquet", "k completions per training prompt of round n")
rewards = _round_file("rewards", "parquet", "the scorer's reward of each sample")
feedback = _round_file("feedback", "json", "pairwise, binary or scalar feedback items")
reference_logps = _round_file("reflogps", "parquet", "the SFT model's log-probs of the feedback's completions")
old_policy_logps = _round_file("oldlogps", "parquet", "the sampling checkpoint's log-probs of the feedback's "
                               "completions (GRPO under sampling.lag)")
training_metrics = _round_file("train", "jsonl", "one line per optimizer step; written after ckpt_r{n}/FINAL")
eval_table = _round_file("eval", "parquet", "held-out generations with their rewards")
eval_summary = _round_file("eval", "json", "held-out metrics of round n's policy")
round_summary = _round_file("round", "txt", "the console's line of round n (in the experiment's log folder)")


def checkpoint_round(round_n: Round) -> str:
    """ckpt_r{n}: the folder of round n's checkpoint and its retention record."""
    return f"ckpt_r{round_n}"


def checkpoint(round_n: Round) -> str:
    """ckpt_r{n}/FINAL: round n's policy (round 0: the SFT model, every round's reference)."""
    return f"{checkpoint_round(round_n)}/{CHECKPOINT_FOLDER}"


def pruned_record(round_n: Round) -> str:
    return f"{checkpoint_round(round_n)}/{PRUNED_RECORD}"


def resolved_config(config_hash: str) -> str:
    """The validated config with its defaults, as every step reads it."""
    return f"config/config_{config_hash}.yaml"


def step_log(step: str, round_n: Round | None = None) -> str:
    return f"{step}.log" if round_n is None else round_name(step, round_n, "log")


def benchmark(step: str, round_n: Round | None = None) -> str:
    return f"{step}.tsv" if round_n is None else round_name(step, round_n, "tsv")


def parse_round_file(name: str) -> tuple[str, int, str | None] | None:
    """(kind, round, extension) of a round file's name, e.g. ("eval", 2, "json"); None for any other name."""
    match = ROUND_FILE.match(name)
    return (match["kind"], int(match["n"]), match["ext"]) if match else None


def round_files(folder: Path, kind: str, ext: str) -> list[tuple[int, Path]]:
    """(round, path) of every ``<kind>_r<n>.<ext>`` in ``folder``, by round."""
    found = []
    for path in folder.iterdir():
        parsed = parse_round_file(path.name)
        if parsed and parsed[0] == kind and parsed[2] == ext:
            found.append((parsed[1], path))
    return sorted(found)


def round_of(path: Path) -> int | None:
    """The round a results path belongs to: its own name's (samples_r1.parquet, ckpt_r1) or,
    for a checkpoint (ckpt_r1/FINAL), its folder's; None for a file of no round."""
    path = Path(path)
    parsed = parse_round_file(path.parent.name if path.name == CHECKPOINT_FOLDER else path.name)
    return parsed[1] if parsed else None


def round_of_checkpoint(path: Path) -> int | None:
    """n of a round's checkpoint path (ckpt_r{n}/FINAL); None for any other folder."""
    path = Path(path)
    parsed = parse_round_file(path.parent.name) if path.name == CHECKPOINT_FOLDER else None
    return parsed[1] if parsed and parsed[0] == "ckpt" and parsed[2] is None else None
