"""Scoring completions: one interface, several scorers, one rewards table.

A scorer takes prompts (message lists) and outputs and returns a
:class:`ScoreResult`: a reward per completion (NaN when scoring failed, with the
reason in ``errors``) and optionally one column per objective. A failed score is
never turned into a number.

Scorers (chosen by ``scorer`` in a section shaped like the config's ``scoring``):
``python`` (score/python.py), ``reward_model`` (score/reward_model.py),
``reward_server`` (score/reward_server.py) and ``judge`` (score/judge.py). The
length penalty (score/penalty.py) and the failure budget are applied here, the
same for every scorer.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from iteralign.errors import UserError

REWARD_COLUMNS = ["prompt_id", "sample_id", "reward", "reward_raw", "length_penalty", "scorer", "error"]


class ScoringError(UserError):
    """A round that cannot be scored as configured (too many failures, a broken scorer)."""


class SampleError(UserError):
    """A scorer that stopped on one sample; ``row`` is its position in the scored list."""

    def __init__(self, row: int, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.row = row


@dataclass
class ScoreResult:
    rewards: list[float]
    errors: list[str | None]
    objectives: dict[str, list[float]] = field(default_factory=dict)
    usage: dict[str, float | int | str | None] = field(default_factory=dict)


class Scorer(Protocol):
    name: str

    def score(self, prompts: list[list[dict]], outputs: list[str]) -> ScoreResult: ...


def build_scorer(config: dict, section: dict | None = None) -> Scorer:
    """The scorer a config's ``scoring`` section (or another section of that shape) names.

    ``config`` is the whole validated config (the judge and the reward server keep their
    response caches under the experiment's folder); ``section`` defaults to ``config["scoring"]``.
    """
    cfg = section if section is not None else config["scoring"]
    kind = cfg["scorer"]
    if kind == "python":
        from iteralign.score.python import PythonScorer

        return PythonScorer(cfg["python"]["function"])
    if kind == "reward_model":
        from iteralign.score.reward_model import RewardModelScorer

        return RewardModelScorer(cfg["reward_model"], use_gpu=cfg["gpus"] > 0)
    if kind == "judge":
        from iteralign.config import experiment_dir
        from iteralign.score.judge import JudgeScorer

        cache_dir = experiment_dir(config) / "judge_cache" if cfg["judge"]["cache"] else None
        return JudgeScorer(cfg["judge"], cache_dir=cache_dir, max_failed_fraction=cfg["max_failed_fraction"])
    if kind == "reward_server":
        from iteralign.config import experiment_dir
        from iteralign.score.reward_server import RewardServerScorer

        server = cfg["reward_server"]
        cache_dir = experiment_dir(config) / "reward_server_cache" if server["cache"] else None
        return RewardServerScorer(server, cache_dir=cache_dir, max_failed_fraction=cfg["max_failed_fraction"])
    raise UserError(
        f"scoring.scorer: unknown scorer {kind!r}; expected python, reward_model, reward_server or judge"
    )


def rewards_frame(samples, result: ScoreResult, scorer_name: str, penalties=None):
    """Rows of rewards_r{n}.parquet, aligned with the samples frame.

    ``penalties``: the length penalty per row (None: 0). ``reward = reward_raw - length_penalty``,
    so a failed (NaN) raw reward stays NaN.
    """
    import pandas as pd

    from iteralign.redaction import redact

    frame = pd.DataFrame({
        "prompt_id": samples["prompt_id"].to_numpy(),
        "sample_id": samples["sample_id"].to_numpy(),
        "reward_raw": pd.array(result.rewards, dtype="float64"),
    })
    frame["length_penalty"] = 0.0 if penalties is None else pd.array(penalties, dtype="float64")
    frame["reward"] = frame["reward_raw"] - frame["length_penalty"]
    frame["scorer"] = scorer_name
    frame["error"] = pd.array([redact(e) for e in result.errors], dtype="string")
    for name, values in result.objectives.items():
        frame[f"reward_{name}"] = pd.array(values, dtype="float64")
    return frame[REWARD_COLUMNS + [c for c in frame.columns if c not in REWARD_COLUMNS]]


def score_samples(samples, config: dict, section: dict | None = None):
    """Score a samples frame (columns prompt, output, prompt_id, sample_id) -> (rewards frame, result).

    Applies the section's length penalty, then fails (ScoringError) when more than
    ``max_failed_fraction`` of the samples could not be scored.
    """
    from iteralign.prompts import messages_from_cell
    from iteralign.score.penalty import length_penalties

    cfg = section if section is not None else config["scoring"]
    scorer = build_scorer(config, section)
    prompts = [messages_from_cell(p) for p in samples["prompt"]]
    try:
        result = scorer.score(prompts, list(samples["output"]))
    except SampleError as exc:
        row = samples.iloc[exc.row]
        raise SampleError(exc.row, f"prompt_id {row['prompt_id']} sample_id {row['sample_id']}: {exc}",
                          exc.hint) from exc.__cause__
    if len(result.rewards) != len(samples):
        raise RuntimeError(f"scorer {scorer.name} returned {len(result.rewards)} rewards for {len(samples)} samples")
    fail_non_finite(result)
    frame = rewards_frame(samples, result, scorer.name, length_penalties(samples, cfg["length_penalty"]))
    check_failures(result.rewards, result.errors, cfg["max_failed_fraction"], scorer.name)
    return frame, result


def fail_non_finite(result: ScoreResult) -> None:
    """Mark +inf/-inf rewards failed (NaN, with the value as the reason), in place: they are not scores."""
    for i, value in enumerate(result.rewards):
        if value is not None and not is_failed(value) and not math.isfinite(value):
            result.rewards[i] = math.nan
            result.errors[i] = result.errors[i] or f"reward {value} is not finite"


def check_failures(rewards: list[float], errors: list[str | None], max_failed_fraction: float, scorer: str) -> None:
    """Raise ScoringError when more than ``max_failed_fraction`` of the rewards are NaN.

    The message counts the failures and names the most common reasons.
    """
    failed = [err or "NaN without a reason" for value, err in zip(rewards, errors, strict=True) if is_failed(value)]
    if rewards and len(failed) > max_failed_fraction * len(rewards):
        reasons = "; ".join(f"{count} x {why}" for why, count in Counter(failed).most_common(3))
        raise ScoringError(
            f"{scorer}: {len(failed)} of {len(rewards)} samples could not be scored, more than "
            f"scoring.max_failed_fraction={max_failed_fraction} allows; reasons: {reasons}"
        )


def is_failed(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
