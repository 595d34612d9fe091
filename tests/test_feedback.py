"""Feedback builders on crafted rewards, and the checks on files we read."""

import json
import math

import pytest

from iteralign.feedback import (
    FeedbackError,
    build_binary,
    build_pairwise,
    build_scalar,
    load_feedback,
)

PROMPT = [{"role": "user", "content": "1+1"}]


def samples(rewards, outputs=None, prompt_id="p0"):
    outputs = outputs or [f"out{i}" for i in range(len(rewards))]
    return [{"prompt_id": prompt_id, "sample_id": i, "prompt": PROMPT, "output": o, "reward": r}
            for i, (r, o) in enumerate(zip(rewards, outputs, strict=True))]


def chosen_rejected(item):
    a, b = item["output_A"][0]["content"], item["output_B"][0]["content"]
    return (a, b) if item["label"] == 1 else (b, a)


def test_max_pairs_best_with_worst():
    items, stats = build_pairwise(samples([0.1, 0.9, 0.5, -0.3]), "max", 0.0, seed=0)
    assert len(items) == 1
    assert chosen_rejected(items[0]) == ("out1", "out3")
    assert items[0]["reward_difference"] == pytest.approx(1.2)
    assert stats["pairs"] == 1 and stats["prompts_kept"] == 1


def test_min_takes_smallest_gap_above_threshold():
    # gaps: 0.25, 0.6, 1.0, 0.35, 0.75, 0.4 -> the smallest above 0.3 is 0.6 - 0.25
    items, _ = build_pairwise(samples([0.0, 0.25, 0.6, 1.0]), "min", 0.3, seed=0)
    assert len(items) == 1
    assert chosen_rejected(items[0]) == ("out2", "out1")


def test_random_pairs_disjoint_couples_and_skips_ties():
    items, stats = build_pairwise(samples([1.0, 1.0, 1.0, 1.0]), "random", 0.0, seed=3)
    assert items == []
    assert stats["prompts_dropped_tie"] == 1
    items, _ = build_pairwise(samples([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]), "random", 0.0, seed=3)
    used = [o for item in items for o in chosen_rejected(item)]
    assert len(items) == 3 and len(set(used)) == 6  # each sample in at most one pair


def test_ties_are_never_paired_in_any_mode():
    for mode in ("random", "max", "min"):
        items, stats = build_pairwise(samples([0.7, 0.7]), mode, 0.0, seed=0)
        assert items == [], mode
        assert stats["prompts_dropped_tie"] == 1


def test_identical_texts_are_never_paired_even_with_different_rewards():
    # a stochastic judge can score the same text twice differently
    items, stats = build_pairwise(samples([0.9, 0.1], outputs=["same", "same"]), "max", 0.0, seed=0)
    assert items == [] and stats["prompts_dropped_identical_text"] == 1
    items, _ = build_pairwise(samples([0.9, 0.1, 0.5], outputs=["same", "same", "other"]), "max", 0.0, seed=0)
    assert len(items) == 1
    assert set(chosen_rejected(items[0])) == {"same", "other"}


def test_nan_rewards_are_never_used():
    items, stats = build_pairwise(samples([math.nan, 0.2, 0.8]), "max", 0.0, seed=0)
    assert chosen_rejected(items[0]) == ("out2", "out1")
    assert stats["samples_nan_reward"] == 1
    items, stats = build_pairwise(samples([math.nan, 0.2]), "max", 0.0, seed=0)
    assert items == [] and stats["prompts_dropped_fewer_than_two_valid"] == 1
    binary, bstats = build_binary(samples([math.nan, 0.2, 0.8]), "mean")
    assert [b["output"][0]["content"] for b in binary] == ["out1", "out2"]
    assert bstats["samples_nan_reward"] == 1


def test_threshold_drops_small_gaps():
    items, stats = build_pairwise(samples([0.5, 0.6]), "max", 0.2, seed=0)
    assert items == [] and stats["prompts_dropped_below_threshold"] == 1
    items, _ = build_pairwise(samples([0.5, 0.8]), "max", 0.2, seed=0)
    assert len(items) == 1


def test_ab_order_is_seeded_and_label_follows_rewards():
    many = [s for p in range(40) for s in samples([0.0, 1.0], prompt_id=f"p{p}")]
    first, _ = build_pairwise(many, "max", 0.0, seed=7)
    again, _ = build_pairwise(many, "max", 0.0, seed=7)
    assert first == again
    labels = [i["label"] for i in first]
    assert 0 < sum(labels) < len(labels)  # the winner is not always in position A
    for item in first:
        assert item["label"] == int(item["reward_A"] > item["reward_B"])


@pytest.mark.parametrize(("threshold", "expected"), [("mean", [0, 0, 0, 1]), ("median", [0, 0, 1, 1]),
                                                     (0.1, [0, 1, 1, 1]), (2, [0, 0, 0, 0])])
def test_binary_thresholds(threshold, expected):
    # rewards 0, 0.1, 0.2, 1.7: mean 0.5, median 0.15; label 1 when reward >= threshold
    items, stats = build_binary(samples([0.0, 0.1, 0.2, 1.7]), threshold)
    assert [i["label"] for i in items] == expected
    assert stats["desirable"] == sum(expected)


def test_scalar_keeps_rewards_grouped_by_prompt():
    mixed = samples([0.1, 0.2], prompt_id="a") + samples([0.3], prompt_id="b") + samples([0.4], prompt_id="a")[:1]
    items, _ = build_scalar(mixed)
    assert [i["prompt_id"] for i in items] == ["a", "a", "a", "b"]
    assert all(i["type"] == "scalar_feedback" for i in items)


def test_items_carry_halos_fields():
    pair, _ = build_pairwise(samples([0.0, 1.0]), "max", 0.0, seed=0, round_n=2)
    assert {"type", "prompt_id", "prompt", "output_A", "output_B", "label", "reward_A", "reward_B",
            "reward_difference"} <= set(pair[0])
    assert pair[0]["type"] == "pairwise_feedback" and pair[0]["round"] == 2
    assert pair[0]["output_A"][0]["role"] == "assistant"
    binary, _ = build_binary(samples([0.0, 1.0]), "mean")
    assert {"type", "prompt_id", "prompt", "output", "label", "reward"} <= set(binary[0])


def test_unknown_feedback_type_is_named(tmp_path):
    path = tmp_path / "feedback_r1.json"
    good, _ = build_pairwise(samples([0.0, 1.0]), "max", 0.0, seed=0)
    path.write_text(json.dumps(good + [{**good[0], "type": "ranking_feedback"}]))
    with pytest.raises(FeedbackError, match=r"feedback_r1.json item 1: unknown type 'ranking_feedback'"):
        load_feedback(path)


def test_missing_field_is_named(tmp_path):
    path = tmp_path / "f.json"
    item, _ = build_binary(samples([0.0, 1.0]), "mean")
    del item[1]["label"]
    path.write_text(json.dumps(item))
    with pytest.raises(FeedbackError, match=r"item 1: binary_feedback item lacks \['label'\]"):
        load_feedback(path)
