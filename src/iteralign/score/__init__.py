"""Scoring completions: one interface, several scorers, one rewards table.

A scorer takes prompts (message lists) and outputs and returns a
:class:`ScoreResult`: a reward per completion (NaN when scoring failed, with the
reason in ``errors``) and optionally one column per objective. A failed score is
never turned into a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

REWARD_COLUMNS = ["prompt_id", "sample_id", "reward", "reward_raw", "length_penalty", "scorer", "error"]


@dataclass
class ScoreResult:
    rewards: list[float]
    errors: list[str | None]
    objectives: dict[str, list[float]] = field(default_factory=dict)
    usage: dict[str, float] = field(default_factory=dict)


class Scorer(Protocol):
    name: str

    def score(self, prompts: list[list[dict]], outputs: list[str]) -> ScoreResult: ...


def build_scorer(config: dict, section: dict | None = None) -> Scorer:
    """The scorer a config's ``scoring`` section (or another section of that shape) names."""
    cfg = section if section is not None else config["scoring"]
    kind = cfg["scorer"]
    if kind == "python":
        from iteralign.score.python import PythonScorer

        return PythonScorer(cfg["python"]["function"])
    raise ValueError(f"scoring.scorer: unknown scorer {kind!r}")


def rewards_frame(samples, result: ScoreResult, scorer_name: str):
    """Rows of rewards_r{n}.parquet, aligned with the samples frame."""
    import pandas as pd

    frame = pd.DataFrame({
        "prompt_id": samples["prompt_id"].to_numpy(),
        "sample_id": samples["sample_id"].to_numpy(),
        "reward_raw": pd.array(result.rewards, dtype="float64"),
    })
    frame["length_penalty"] = 0.0
    frame["reward"] = frame["reward_raw"] - frame["length_penalty"]
    frame["scorer"] = scorer_name
    frame["error"] = pd.array(result.errors, dtype="string")
    for name, values in result.objectives.items():
        frame[f"reward_{name}"] = pd.array(values, dtype="float64")
    return frame[REWARD_COLUMNS + [c for c in frame.columns if c not in REWARD_COLUMNS]]


def score_samples(samples, config: dict, section: dict | None = None):
    """Score a samples frame (columns prompt, output, prompt_id, sample_id) -> rewards frame."""
    from iteralign.prompts import messages_from_cell

    scorer = build_scorer(config, section)
    prompts = [messages_from_cell(p) for p in samples["prompt"]]
    result = scorer.score(prompts, list(samples["output"]))
    if len(result.rewards) != len(samples):
        raise RuntimeError(f"scorer {scorer.name} returned {len(result.rewards)} rewards for {len(samples)} samples")
    return rewards_frame(samples, result, scorer.name), result


def is_failed(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
