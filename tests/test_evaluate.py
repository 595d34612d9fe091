"""Evaluation metrics on crafted inputs."""

import math

import numpy as np
import pandas as pd
import pytest

from iteralign.evaluate import (
    HeldOut,
    bootstrap_ci,
    check_comparable,
    kl_to_reference,
    length_controlled_reward,
    length_quantiles,
    max_length_fraction,
    reward_summary,
    summarize,
    tie_margin_reward,
    win_rate,
    win_scores,
)


def held_out(rewards, tokens=None) -> HeldOut:
    tokens = [4] * len(rewards) if tokens is None else tokens
    return HeldOut(np.asarray(rewards, dtype=float), np.asarray(tokens, dtype=float))


def test_win_scores_count_ties_half_and_skip_missing():
    scores = win_scores([1.0, 0.0, 0.5, math.nan], [0.0, 0.0, 0.9, 0.2])
    assert scores[:3].tolist() == [1.0, 0.5, 0.0] and math.isnan(scores[3])


def test_win_rate_is_known_on_crafted_rewards():
    # 6 wins, 2 ties, 2 losses over 10 prompts: (6 + 1) / 10
    rewards = [1, 1, 1, 1, 1, 1, 0, 1, 0, 0]
    baseline = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    rate, (lo, hi) = win_rate(rewards, baseline, 1000, seed=0)
    assert rate == pytest.approx(0.7)
    assert lo < 0.7 < hi


def test_win_rate_is_nan_when_no_prompt_scored_on_both_sides():
    rate, ci = win_rate([math.nan, 1.0], [0.0, math.nan], 200, seed=0)
    assert math.isnan(rate) and all(math.isnan(x) for x in ci)


def test_summary_has_known_win_rate_and_counts_failures():
    current = held_out([1.0, 1.0, 0.0, 1.0, math.nan], [3, 4, 5, 4, 4])
    summary = summarize(2, current, policy_logps=[-1.0, -2.0, -3.0, -1.0, -1.0],
                        reference_logps=[-1.5, -2.0, -3.5, -1.0, -2.0], finish_reasons=["stop"] * 5,
                        baseline=held_out([0.0, 1.0, 0.0, 0.0, 1.0]), previous=held_out([1.0, 1.0, 1.0, 1.0, 1.0]),
                        n_resamples=500, seed=0)
    assert summary["win_rate_vs_r0"] == pytest.approx((1 + 0.5 + 0.5 + 1) / 4)
    assert summary["mean_reward"] == pytest.approx(0.75)
    assert summary["failed_scores"] == 1 and summary["num_prompts"] == 5
    assert summary["kl_to_reference"] == pytest.approx((0.5 + 0 + 0.5 + 0 + 1) / 5)
    assert summary["mean_output_tokens"] == pytest.approx(4.0)
    lo, hi = summary["win_rate_ci95"]
    assert lo <= summary["win_rate_vs_r0"] <= hi


def test_win_rate_vs_previous_compares_with_the_round_before():
    summary = reward_summary(held_out([1, 1, 0, 0]), baseline=held_out([0, 0, 0, 0]),
                             previous=held_out([1, 1, 1, 0]), n_resamples=200, seed=0)
    assert summary["win_rate_vs_r0"] == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)
    assert summary["win_rate_vs_previous"] == pytest.approx((0.5 + 0.5 + 0 + 0.5) / 4)


def test_round_zero_has_win_rates_half_and_zero_kl():
    logps = [-1.0, -2.5, -0.3]
    summary = summarize(0, held_out([0.1, 0.2, 0.3]), logps, logps, ["stop"] * 3, None, None, 200, 0)
    assert summary["win_rate_vs_r0"] == 0.5 and summary["win_rate_ci95"] == [0.5, 0.5]
    assert summary["win_rate_vs_previous"] == 0.5 and summary["win_rate_vs_previous_ci95"] == [0.5, 0.5]
    assert summary["kl_to_reference"] == 0.0 and summary["kl_to_reference_ci95"] == [0.0, 0.0]


def test_kl_is_the_mean_log_ratio():
    kl, (lo, hi) = kl_to_reference([-1.0, -2.0, -4.0], [-2.0, -2.0, -3.0], 500, seed=0)
    assert kl == pytest.approx((1.0 + 0.0 - 1.0) / 3)
    assert lo <= kl <= hi


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials, covered = 200, 0
    for t in range(trials):
        sample = rng.binomial(1, 0.3, size=200).astype(float)
        lo, hi = bootstrap_ci(sample, 1000, seed=t)
        covered += lo <= 0.3 <= hi
    assert 0.90 <= covered / trials <= 0.99


def test_win_rate_ci_covers_the_true_win_rate_about_95_percent_of_the_time():
    # Per prompt: win 0.4, tie 0.3, loss 0.3 -> true win rate 0.4 + 0.15 = 0.55.
    rng = np.random.default_rng(2)
    trials, covered = 200, 0
    for t in range(trials):
        outcome = rng.choice([1.0, 0.5, 0.0], p=[0.4, 0.3, 0.3], size=150)
        _, (lo, hi) = win_rate(outcome, np.full(150, 0.5), 500, seed=t)
        covered += lo <= 0.55 <= hi
    assert 0.90 <= covered / trials <= 0.99


def test_bootstrap_ci_narrows_with_more_prompts():
    rng = np.random.default_rng(1)
    small = bootstrap_ci(rng.normal(size=50), 1000, 0)
    large = bootstrap_ci(rng.normal(size=2000), 1000, 0)
    assert (large[1] - large[0]) < (small[1] - small[0]) / 3


def test_length_controlled_reward_removes_a_gain_bought_with_length():
    # Reward is exactly 0.1 per token; this round writes 10 tokens more than round 0 on average.
    lengths = np.tile([15.0, 20.0, 25.0, 20.0], 10)
    rewards = 0.1 * lengths
    value, (lo, hi), slope = length_controlled_reward(rewards, lengths, at_length=10.0, n_resamples=300, seed=0)
    assert rewards.mean() == pytest.approx(2.0)
    assert slope == pytest.approx(0.1)
    assert value == pytest.approx(1.0)  # what this round would score at round 0's length
    assert lo <= value <= hi


def test_length_controlled_reward_is_the_mean_at_round_zero():
    current = held_out([0.2, 0.9, 0.4, 0.7], [3, 9, 5, 7])
    summary = reward_summary(current, baseline=None, previous=None, n_resamples=200, seed=0)
    assert summary["length_controlled_reward"] == pytest.approx(summary["mean_reward"])


def test_length_controlled_reward_without_length_variation():
    at_same, same_ci, slope = length_controlled_reward([1.0, 0.0, 1.0], [4, 4, 4], at_length=4.0, n_resamples=100,
                                                       seed=0)
    elsewhere, ci, _ = length_controlled_reward([1.0, 0.0, 1.0], [4, 4, 4], at_length=6.0, n_resamples=100, seed=0)
    assert at_same == pytest.approx(2 / 3) and math.isnan(slope)
    assert same_ci == bootstrap_ci([1.0, 0.0, 1.0], 100, seed=0)  # nothing to adjust: the reward's own interval
    assert math.isnan(elsewhere) and all(math.isnan(x) for x in ci)


def test_length_controlled_reward_leaves_failed_scores_out():
    value, _, slope = length_controlled_reward([1.0, math.nan, 3.0], [1, 50, 3], at_length=2.0, n_resamples=100,
                                               seed=0)
    assert slope == pytest.approx(1.0) and value == pytest.approx(2.0)


def test_max_length_fraction_counts_generations_cut_at_the_limit():
    assert max_length_fraction(["stop", "length", "stop", "length", "length"]) == pytest.approx(0.6)
    assert max_length_fraction(["stop", "stop"]) == 0.0


def test_summary_reports_length_distribution_and_max_length_hits():
    tokens = list(range(1, 101))
    summary = summarize(1, held_out([1.0] * 100, tokens), [0.0] * 100, [0.0] * 100, ["stop"] * 90 + ["length"] * 10,
                        held_out([1.0] * 100, tokens), held_out([1.0] * 100, tokens), 200, 0)
    assert summary["mean_output_tokens"] == pytest.approx(50.5)
    assert summary["output_tokens_quantiles"]["p50"] == pytest.approx(50.5)
    assert summary["output_tokens_quantiles"]["p5"] < summary["output_tokens_quantiles"]["p95"]
    assert summary["max_length_fraction"] == pytest.approx(0.1)


def test_length_quantiles_of_no_generations_are_undefined():
    assert list(length_quantiles([])) == ["p5", "p25", "p50", "p75", "p95"]
    assert all(math.isnan(v) for v in length_quantiles([]).values())


def test_evaluation_scorer_is_summarised_beside_the_training_scorer():
    # The training scorer says every round improves; the held-out scorer says nothing changed.
    training = reward_summary(held_out([1, 1, 1, 1]), held_out([0, 0, 0, 0]), held_out([0, 0, 0, 0]), 200, 0)
    judge = reward_summary(held_out([0.5] * 4), held_out([0.5] * 4), held_out([0.5] * 4), 200, 0)
    assert training["win_rate_vs_r0"] == 1.0
    assert judge["win_rate_vs_r0"] == 0.5 and judge["mean_reward"] == 0.5


def eval_rows(prompt_ids, **columns) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": prompt_ids, "reward": 1.0, "num_output_tokens": 4, **columns})


def test_another_round_on_other_prompts_is_refused_naming_the_file():
    with pytest.raises(ValueError, match=r"eval_r0.parquet: evaluated 2 held-out prompts, 1 of this round's 2 missing"):
        check_comparable(eval_rows(["a", "c"]), "eval_r0.parquet", ["a", "b"], {"temperature": 0.0}, None, [])


def test_another_round_with_other_decoding_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"eval_r1.parquet: evaluated with max_new_tokens=8, this round with "
                                         r"max_new_tokens=6"):
        check_comparable(eval_rows(["a"]), "eval_r1.parquet", ["a"], {"max_new_tokens": 6},
                         {"max_new_tokens": 8}, [])


def test_a_round_without_the_evaluation_scorer_is_refused_when_one_is_configured():
    with pytest.raises(ValueError, match="no column 'eval_scorer_reward'"):
        check_comparable(eval_rows(["a"]), "eval_r0.parquet", ["a"], {}, None, ["eval_scorer_reward"])


def test_a_change_within_the_tie_margin_is_a_tie():
    # +0.002 and -0.01 lie within a margin of 0.05; +0.3 beats it, -0.2 loses by more than it
    rewards = [0.502, 0.49, 0.8, 0.3]
    baseline = [0.5, 0.5, 0.5, 0.5]
    assert list(win_scores(rewards, baseline, margin=0.05)) == [0.5, 0.5, 1.0, 0.0]
    assert list(win_scores(rewards, baseline)) == [1.0, 0.0, 1.0, 0.0]  # margin 0: strict comparison


def test_the_tie_margin_follows_the_spread_of_round_zero():
    round0 = held_out([0.0, 1.0, 0.0, 1.0])  # standard deviation 0.5
    barely_better = held_out([0.04, 1.04, 0.04, 1.04])
    summary = reward_summary(barely_better, round0, round0, n_resamples=200, seed=0, tie_margin=0.1)
    assert summary["tie_margin"] == 0.1 and summary["tie_margin_reward"] == pytest.approx(0.05)
    assert summary["win_rate_vs_r0"] == 0.5  # +0.04 everywhere is within 0.05: all ties
    strict = reward_summary(barely_better, round0, round0, n_resamples=200, seed=0, tie_margin=0.0)
    assert strict["win_rate_vs_r0"] == 1.0
    assert tie_margin_reward([1.0, math.nan], 0.1) == 0.0  # one scored prompt: no spread to scale by
