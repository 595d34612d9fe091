"""Evaluation metrics on crafted inputs."""

import math

import numpy as np
import pytest

from iteralign.evaluate import bootstrap_ci, summarize, win_scores


def test_win_scores_count_ties_half_and_skip_missing():
    scores = win_scores([1.0, 0.0, 0.5, math.nan], [0.0, 0.0, 0.9, 0.2])
    assert scores[:3].tolist() == [1.0, 0.5, 0.0] and math.isnan(scores[3])


def test_summary_has_known_win_rate_and_counts_failures():
    summary = summarize(2, rewards=[1.0, 1.0, 0.0, 1.0, math.nan], output_tokens=[3, 4, 5, 4, 4],
                        policy_logps=[-1.0, -2.0, -3.0, -1.0, -1.0], reference_logps=[-1.5, -2.0, -3.5, -1.0, -2.0],
                        baseline_rewards=[0.0, 1.0, 0.0, 0.0, 1.0], n_resamples=500, seed=0)
    assert summary["win_rate_vs_r0"] == pytest.approx((1 + 0.5 + 0.5 + 1) / 4)
    assert summary["mean_reward"] == pytest.approx(0.75)
    assert summary["failed_scores"] == 1 and summary["num_prompts"] == 5
    assert summary["kl_to_reference"] == pytest.approx((0.5 + 0 + 0.5 + 0 + 1) / 5)
    assert summary["mean_output_tokens"] == pytest.approx(4.0)
    lo, hi = summary["win_rate_ci95"]
    assert lo <= summary["win_rate_vs_r0"] <= hi


def test_round_zero_has_win_rate_half_and_zero_kl():
    logps = [-1.0, -2.5, -0.3]
    summary = summarize(0, [0.1, 0.2, 0.3], [2, 2, 2], logps, logps, None, 200, 0)
    assert summary["win_rate_vs_r0"] == 0.5 and summary["win_rate_ci95"] == [0.5, 0.5]
    assert summary["kl_to_reference"] == 0.0


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials, covered = 200, 0
    for t in range(trials):
        sample = rng.binomial(1, 0.3, size=200).astype(float)
        lo, hi = bootstrap_ci(sample, 1000, seed=t)
        covered += lo <= 0.3 <= hi
    assert 0.90 <= covered / trials <= 0.99


def test_bootstrap_ci_narrows_with_more_prompts():
    rng = np.random.default_rng(1)
    small = bootstrap_ci(rng.normal(size=50), 1000, 0)
    large = bootstrap_ci(rng.normal(size=2000), 1000, 0)
    assert (large[1] - large[0]) < (small[1] - small[0]) / 3
