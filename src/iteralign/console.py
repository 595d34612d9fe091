"""What a run prints on the console besides Snakemake's progress: one line per evaluated round.

The round_summary rule (a local rule, so its output reaches the terminal that runs
Snakemake, also under SLURM) prints it as soon as round n's evaluation exists.
"""

from __future__ import annotations

import json
from pathlib import Path


def _interval(values: list[float] | None) -> str:
    return f" [{values[0]:.3f}, {values[1]:.3f}]" if values else ""


def _feedback_part(stats: dict) -> str:
    """Feedback kept and dropped, as feedback_r{n}.json.meta.json counts it."""
    kept = stats.get("pairs", stats.get("items"))
    unit = "pairs" if "pairs" in stats else "items"
    dropped = stats.get("prompts", 0) - stats.get("prompts_kept", 0)
    return f"{kept} {unit} kept from {stats.get('prompts_kept', '?')} prompts ({dropped} dropped)"


def round_line(evaluation: dict, feedback_stats: dict | None) -> str:
    """One line: held-out reward with its CI, win rates, KL to the reference, feedback kept."""
    n = evaluation["round"]
    parts = [f"reward {evaluation['mean_reward']:.3f}{_interval(evaluation.get('reward_ci95'))}"]
    if n > 0:
        parts.append(f"win rate vs r0 {evaluation['win_rate_vs_r0']:.2f}{_interval(evaluation.get('win_rate_ci95'))}")
        if n > 1 and evaluation.get("win_rate_vs_previous") is not None:
            parts.append(f"vs r{n - 1} {evaluation['win_rate_vs_previous']:.2f}"
                         f"{_interval(evaluation.get('win_rate_vs_previous_ci95'))}")
        parts.append(f"KL {evaluation['kl_to_reference']:.3f}")
    if feedback_stats:
        parts.append(_feedback_part(feedback_stats))
    return f"round {n}{' (SFT)' if n == 0 else ''}: " + " | ".join(parts)


def round_summary(evaluation_file: str | Path, feedback_file: str | Path | None) -> str:
    """The round's line from eval_r{n}.json and (rounds >= 1) the sidecar of feedback_r{n}.json."""
    from iteralign.artifacts import read_sidecar

    evaluation = json.loads(Path(evaluation_file).read_text())
    sidecar = read_sidecar(feedback_file) if feedback_file else None
    return round_line(evaluation, (sidecar or {}).get("stats"))
