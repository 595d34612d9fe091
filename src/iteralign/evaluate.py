"""Held-out evaluation of one round's policy: the same prompts and decoding every round.

Metrics are pure functions over arrays (tested on crafted inputs, documented in
docs/evaluation.md). Arrays of different rounds are aligned by prompt: row i is
the same held-out prompt in every round, so rounds compare like for like.
:func:`evaluate` generates, scores (with the training scorer and, when
``evaluation.scorer`` is set, a separate one), and estimates KL to the SFT
reference on the round's own generations.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import numpy as np

from iteralign.errors import UserError

log = logging.getLogger(__name__)

LENGTH_QUANTILES = (5, 25, 50, 75, 95)
# Offsets of each metric's bootstrap seed. The length-controlled reward shares the reward's resamples, so
# the two intervals coincide when no length adjustment is needed.
_SEED_OFFSETS = {"reward": 0, "win_r0": 1, "win_previous": 2, "length_controlled": 0, "kl": 4, "length": 5}


class HeldOut(NamedTuple):
    """One round's held-out rewards and output lengths; row i is the same prompt in every round."""

    rewards: np.ndarray
    output_tokens: np.ndarray


# ---------------------------------------------------------------- bootstrap
def _resample_indices(n_items: int, n_resamples: int, seed: int) -> np.ndarray:
    """``[n_resamples, n_items]`` indices drawn with replacement (prompts are the unit resampled)."""
    return np.random.default_rng(seed).integers(0, n_items, size=(n_resamples, n_items))


def _percentile_interval(statistics: np.ndarray) -> list[float]:
    """Central 95% of bootstrap statistics; NaN when any resample's statistic is undefined."""
    if np.isnan(statistics).any():
        return [math.nan, math.nan]
    lo, hi = np.percentile(statistics, [2.5, 97.5])
    return [float(lo), float(hi)]


def bootstrap_ci(values, n_resamples: int, seed: int, statistic=np.mean) -> list[float]:
    """Percentile bootstrap 95% interval of ``statistic`` over ``values`` (NaN dropped)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return [math.nan, math.nan]
    idx = _resample_indices(len(values), n_resamples, seed)
    return _percentile_interval(statistic(values[idx], axis=1))


# ---------------------------------------------------------------- win rates
def win_scores(rewards, baseline_rewards, margin: float = 0.0) -> np.ndarray:
    """Per prompt: 1 win, 0.5 tie, 0 loss; NaN where either reward is missing.

    A difference of at most ``margin`` (reward units) is a tie.
    """
    a = np.asarray(rewards, dtype=float)
    b = np.asarray(baseline_rewards, dtype=float)
    difference = a - b
    scores = np.where(difference > margin, 1.0, np.where(difference < -margin, 0.0, 0.5))
    scores[np.isnan(a) | np.isnan(b)] = np.nan
    return scores


def win_rate(rewards, baseline_rewards, n_resamples: int, seed: int,
             margin: float = 0.0) -> tuple[float, list[float]]:
    """Mean win score against a baseline on the same prompts (ties half, ``margin`` as in
    :func:`win_scores`), with its bootstrap 95% CI.

    Prompts where either side failed to score are left out; NaN when none is left.
    """
    wins = win_scores(rewards, baseline_rewards, margin)
    if np.isnan(wins).all():
        return math.nan, [math.nan, math.nan]
    return float(np.nanmean(wins)), bootstrap_ci(wins, n_resamples, seed)


def tie_margin_reward(round0_rewards, tie_margin: float) -> float:
    """evaluation.tie_margin in reward units: that fraction of the standard deviation of
    round 0's held-out rewards (0 when they do not vary or none scored)."""
    rewards = np.asarray(round0_rewards, dtype=float)
    rewards = rewards[~np.isnan(rewards)]
    return float(tie_margin * rewards.std()) if len(rewards) > 1 else 0.0


# ---------------------------------------------------------------- length
def length_quantiles(output_tokens) -> dict[str, float]:
    """The distribution of output length: ``{"p5": ..., "p25": ..., "p50": ..., "p75": ..., "p95": ...}``."""
    tokens = np.asarray(output_tokens, dtype=float)
    if len(tokens) == 0:
        return {f"p{q}": math.nan for q in LENGTH_QUANTILES}
    return {f"p{q}": float(v) for q, v in zip(LENGTH_QUANTILES, np.percentile(tokens, LENGTH_QUANTILES),
                                               strict=True)}


def max_length_fraction(finish_reasons) -> float:
    """Fraction of generations cut at ``max_new_tokens`` (``finish_reason == "length"``)."""
    reasons = np.asarray(finish_reasons, dtype=object)
    if len(reasons) == 0:
        return math.nan
    return float(np.mean(reasons == "length"))


def _length_controlled(rewards: np.ndarray, lengths: np.ndarray, at_length: float) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares fit ``reward = a + b * length`` along the last axis -> (a + b * at_length, b).

    Where every length is the same the slope is undefined (NaN); the fitted value
    at that very length is still the mean reward, anywhere else it is NaN.
    """
    mean_reward, mean_length = rewards.mean(-1), lengths.mean(-1)
    centred = lengths - mean_length[..., None]
    variance = (centred**2).mean(-1)
    covariance = (centred * (rewards - mean_reward[..., None])).mean(-1)
    varies = variance > 1e-12
    slope = np.divide(covariance, variance, out=np.full_like(variance, np.nan), where=varies)
    offset = at_length - mean_length
    at_mean = np.isclose(offset, 0.0, rtol=0.0, atol=1e-9)
    value = np.where(at_mean, mean_reward, mean_reward + slope * offset)
    return value, slope


def length_controlled_reward(rewards, output_tokens, at_length: float, n_resamples: int,
                             seed: int) -> tuple[float, list[float], float]:
    """Reward predicted at ``at_length`` by a linear fit of reward on length over this round's prompts.

    Reported at round 0's mean length, it removes the part of a reward gain that
    comes from longer (or shorter) outputs. Returns (value, bootstrap 95% CI over
    prompts, slope in reward per token). Prompts with a failed score are left out.
    """
    rewards = np.asarray(rewards, dtype=float)
    lengths = np.asarray(output_tokens, dtype=float)
    valid = ~np.isnan(rewards)
    rewards, lengths = rewards[valid], lengths[valid]
    if len(rewards) == 0 or math.isnan(at_length):
        return math.nan, [math.nan, math.nan], math.nan
    value, slope = _length_controlled(rewards, lengths, at_length)
    idx = _resample_indices(len(rewards), n_resamples, seed)
    resampled, _ = _length_controlled(rewards[idx], lengths[idx], at_length)
    return float(value), _percentile_interval(resampled), float(slope)


# ---------------------------------------------------------------- KL
def kl_to_reference(policy_logps, reference_logps, n_resamples: int, seed: int) -> tuple[float, list[float]]:
    """Mean over prompts of log pi_n(y) - log pi_ref(y) on the policy's own outputs y, with a 95% CI.

    With outputs sampled at temperature 1 this is the Monte Carlo estimate of
    KL(pi_n || pi_ref); with greedy or tempered decoding it is the log-ratio on
    what the policy actually says (docs/evaluation.md). Exactly 0 at round 0.
    """
    ratio = np.asarray(policy_logps, dtype=float) - np.asarray(reference_logps, dtype=float)
    if len(ratio) == 0:
        return math.nan, [math.nan, math.nan]
    return float(np.mean(ratio)), bootstrap_ci(ratio, n_resamples, seed)


# ---------------------------------------------------------------- summaries
def reward_summary(current: HeldOut, baseline: HeldOut | None, previous: HeldOut | None, n_resamples: int,
                   seed: int, tie_margin: float = 0.0) -> dict:
    """Reward metrics of one round under one scorer.

    ``baseline``: round 0 on the same prompts, ``previous``: round n-1; both None
    at round 0 (win rates are then 0.5 by definition). ``tie_margin``:
    evaluation.tie_margin, a fraction of round 0's reward standard deviation.
    """
    rewards = np.asarray(current.rewards, dtype=float)
    failed = int(np.isnan(rewards).sum())
    reference = baseline if baseline is not None else current
    margin = tie_margin_reward(reference.rewards, tie_margin)
    out = {
        "mean_reward": float(np.nanmean(rewards)) if failed < len(rewards) else math.nan,
        "reward_ci95": bootstrap_ci(rewards, n_resamples, seed + _SEED_OFFSETS["reward"]),
        "tie_margin": tie_margin,
        "tie_margin_reward": margin,
    }
    for key, other, offset in (("win_rate_vs_r0", baseline, "win_r0"),
                               ("win_rate_vs_previous", previous, "win_previous")):
        if other is None:
            rate, ci = 0.5, [0.5, 0.5]
        else:
            rate, ci = win_rate(rewards, other.rewards, n_resamples, seed + _SEED_OFFSETS[offset], margin)
        # the interval of win_rate_vs_r0 is named win_rate_ci95 (docs/artifacts.md), not win_rate_vs_r0_ci95
        out[key], out["win_rate_ci95" if key == "win_rate_vs_r0" else f"{key}_ci95"] = rate, ci
    at_length = float(np.mean(reference.output_tokens)) if len(reference.output_tokens) else math.nan
    value, ci, slope = length_controlled_reward(rewards, current.output_tokens, at_length, n_resamples,
                                                seed + _SEED_OFFSETS["length_controlled"])
    out.update(length_controlled_reward=value, length_controlled_reward_ci95=ci, reward_length_slope=slope,
               failed_scores=failed)
    return out


def summarize(round_n: int, current: HeldOut, policy_logps, reference_logps, finish_reasons,
              baseline: HeldOut | None, previous: HeldOut | None, n_resamples: int, seed: int,
              tie_margin: float = 0.0) -> dict:
    """The eval_r{n}.json metrics (docs/artifacts.md) for the training scorer's rewards."""
    tokens = np.asarray(current.output_tokens, dtype=float)
    kl, kl_ci = kl_to_reference(policy_logps, reference_logps, n_resamples, seed + _SEED_OFFSETS["kl"])
    return {
        "round": round_n,
        "num_prompts": int(len(tokens)),
        **reward_summary(current, baseline, previous, n_resamples, seed, tie_margin),
        "mean_output_tokens": float(np.mean(tokens)) if len(tokens) else math.nan,
        "mean_output_tokens_ci95": bootstrap_ci(tokens, n_resamples, seed + _SEED_OFFSETS["length"]),
        "output_tokens_quantiles": length_quantiles(tokens),
        "max_length_fraction": max_length_fraction(finish_reasons),
        "kl_to_reference": kl,
        "kl_to_reference_ci95": kl_ci,
    }


# ---------------------------------------------------------------- checks across rounds
def decoding_settings(config: dict) -> dict:
    """What every round's evaluation must share: decoding settings and the generation seed."""
    ecfg = config["evaluation"]
    return {"temperature": ecfg["temperature"], "top_p": ecfg["top_p"], "max_new_tokens": ecfg["max_new_tokens"],
            "stop": list(config["sampling"]["stop"]), "seed": config["seed"]}


def check_comparable(other, other_path: str, prompt_ids, decoding: dict, recorded_decoding: dict | None,
                     needs_columns: list[str]) -> None:
    """Fail, naming ``other_path``, unless another round's evaluation used the same prompts and decoding.

    ``recorded_decoding`` is the ``decoding`` in that file's provenance (None for
    files written before it was recorded: only the prompts are checked then).
    """
    expected, found = set(prompt_ids), set(other["prompt_id"])
    if expected != found:
        raise UserError(
            f"{other_path}: evaluated {len(found)} held-out prompts, {len(expected - found)} of this round's "
            f"{len(expected)} missing and {len(found - expected)} extra; rounds must be evaluated on the same "
            "prompts (re-run it with --forcerun)")
    if recorded_decoding is not None:
        for key, value in decoding.items():
            if key in recorded_decoding and recorded_decoding[key] != value:
                raise UserError(f"{other_path}: evaluated with {key}={recorded_decoding[key]!r}, this round with "
                                f"{key}={value!r}; rounds must share decoding settings (re-run it with --forcerun)")
    for column in needs_columns:
        if column not in other.columns:
            raise UserError(f"{other_path}: no column {column!r} (it was evaluated without evaluation.scorer); "
                            "re-run it with --forcerun so that every round has the same scorers")


def _held_out(frame, column: str) -> HeldOut | None:
    """A round's rewards (from ``column``) and lengths; None for a round that is not there."""
    if frame is None:
        return None
    return HeldOut(frame[column].to_numpy(dtype=float), frame["num_output_tokens"].to_numpy(dtype=float))


def _aligned(other, prompt_ids):
    return None if other is None else other.set_index("prompt_id").loc[list(prompt_ids)].reset_index()


# ---------------------------------------------------------------- the step
def _score_held_out(frame, config: dict) -> str | None:
    """Add the training scorer's ``reward``/``error`` columns to ``frame`` and, with
    ``evaluation.scorer``, that scorer's; returns the evaluation scorer's name (None without one)."""
    from iteralign.score import score_samples

    rewards, _ = score_samples(frame, config)
    frame["reward"] = rewards["reward"].to_numpy()
    frame["error"] = rewards["error"].to_numpy()
    if config["evaluation"]["scorer"] is None:
        return None
    held_out_rewards, _ = score_samples(frame, config, config["evaluation"]["scorer"])
    frame["eval_scorer_reward"] = held_out_rewards["reward"].to_numpy()
    frame["eval_scorer_error"] = held_out_rewards["error"].to_numpy()
    return str(held_out_rewards["scorer"].iloc[0]) if len(held_out_rewards) else None


def _summary(config: dict, round_n: int, frame, baseline_frame, previous_frame, seed: int,
             eval_scorer: str | None) -> dict:
    """eval_r{n}.json of a scored frame with its log-probs, against rounds 0 and n-1."""
    ecfg = config["evaluation"]
    prompt_ids = frame["prompt_id"]
    baseline, previous = _aligned(baseline_frame, prompt_ids), _aligned(previous_frame, prompt_ids)
    n_resamples = ecfg["bootstrap_samples"]
    summary = summarize(round_n, _held_out(frame, "reward"), frame["policy_logp"].to_numpy(),
                        frame["reference_logp"].to_numpy(), frame["finish_reason"].to_numpy(),
                        _held_out(baseline, "reward"), _held_out(previous, "reward"), n_resamples, seed,
                        ecfg["tie_margin"])
    if eval_scorer is not None:
        column = "eval_scorer_reward"
        summary["eval_scorer"] = {"name": eval_scorer, **reward_summary(
            _held_out(frame, column), _held_out(baseline, column), _held_out(previous, column), n_resamples, seed,
            ecfg["tie_margin"])}
    return summary


def evaluate(config: dict, round_n: int, prompts_frame, checkpoint: str, reference_checkpoint: str,
             baseline_frame=None, previous_frame=None):
    """Generate on the eval split, score, compute KL; returns (rows frame, summary dict).

    ``baseline_frame``/``previous_frame``: eval_r0/eval_r{n-1} rows (None at round 0),
    already checked with :func:`check_comparable`.
    """
    import torch

    from iteralign.logps import batched_completion_logps
    from iteralign.modeling import default_device, load_causal_lm, load_tokenizer
    from iteralign.prompts import messages_from_cell
    from iteralign.sample import generate, sample_frame
    from iteralign.tokens import PromptRenderer, encode

    tcfg = config["training"]
    eval_prompts = prompts_frame[prompts_frame["split"] == "eval"].sort_values("prompt_id")
    prompts = [messages_from_cell(p) for p in eval_prompts["prompt"]]
    settings = decoding_settings(config)
    decoding = {"num_samples": 1, **{k: settings[k] for k in ("temperature", "top_p", "max_new_tokens", "stop")}}
    seed = settings["seed"]  # the same seed every round: rounds differ only by the policy
    generation = generate(checkpoint, prompts, decoding, config, seed, progress=f"eval r{round_n}",
                          prompt_ids=list(eval_prompts["prompt_id"]))
    frame = sample_frame(round_n, list(eval_prompts["prompt_id"]), prompts, generation.texts,
                         generation.completions, checkpoint, seed)
    eval_scorer = _score_held_out(frame, config)
    frame = frame.drop(columns=["sample_id"])

    # KL to the reference on these generations: log-probs under the policy and under SFT.
    trust = config["policy"]["trust_remote_code"]
    device = default_device()
    tokenizer = load_tokenizer(checkpoint, trust)
    render = PromptRenderer(tokenizer)
    encoded = [encode(tokenizer, render(pid, p), out, tcfg["max_length"], tcfg["max_prompt_length"])
               for pid, p, out in zip(frame["prompt_id"], prompts, frame["output"], strict=True)]
    batch = 2 * tcfg["micro_batch_size"]
    policy = generation.model if generation.model is not None else load_causal_lm(checkpoint, trust, device=device)
    backend = generation.backend
    del generation  # drop the sampler's reference to the policy before loading the reference model
    frame["policy_logp"], _ = batched_completion_logps(policy, encoded, tokenizer.pad_token_id, batch, device)
    if round_n == 0:
        frame["reference_logp"] = frame["policy_logp"]
    else:
        del policy
        reference = load_causal_lm(reference_checkpoint, trust, device=device)
        frame["reference_logp"], _ = batched_completion_logps(reference, encoded, tokenizer.pad_token_id, batch,
                                                              device)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    summary = _summary(config, round_n, frame, baseline_frame, previous_frame, seed, eval_scorer)
    summary["decoding"] = settings
    summary["backend"] = backend
    return frame, summary
