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


def test_all_keeps_every_eligible_pair_ordered_by_reward():
    # gaps: (0,1) 0.5, (0,2) 1.0, (0,3) tie, (1,2) 0.5, (1,3) 0.5, (2,3) 1.0
    items, stats = build_pairwise(samples([0.0, 0.5, 1.0, 0.0]), "all", 0.0, seed=0)
    assert sorted(chosen_rejected(i) for i in items) == sorted([
        ("out1", "out0"), ("out2", "out0"), ("out2", "out1"), ("out1", "out3"), ("out2", "out3")])
    assert stats["pairs"] == 5 and stats["pairs_dropped_tie"] == 1 and stats["samples_in_pairs"] == 4


def test_all_respects_the_threshold_and_never_repeats_a_pair_of_texts():
    items, stats = build_pairwise(samples([0.0, 0.3, 1.0]), "all", 0.5, seed=0)
    assert sorted(chosen_rejected(i) for i in items) == [("out2", "out0"), ("out2", "out1")]
    assert stats["pairs_dropped_below_threshold"] == 1
    # two samples with the same text: ("dup", "b") is one pair, not two
    items, stats = build_pairwise(samples([0.9, 0.9, 0.1], outputs=["dup", "dup", "b"]), "all", 0.0, seed=0)
    assert [chosen_rejected(i) for i in items] == [("dup", "b")]
    assert stats["pairs_dropped_duplicate_texts"] == 1 and stats["pairs_dropped_tie"] == 1


def test_threshold_as_a_quantile_of_the_rounds_gaps():
    # prompt a gaps: 1, 3, 2; prompt b gaps: 10 -> the median of [1, 2, 3, 10] is 2.5
    round_samples = samples([0.0, 1.0, 3.0], prompt_id="a") + samples([0.0, 10.0], prompt_id="b")
    items, stats = build_pairwise(round_samples, "all", {"quantile": 0.5}, seed=0)
    assert stats["threshold"] == pytest.approx(2.5)
    assert sorted(i["reward_difference"] for i in items) == [3.0, 10.0]


def test_no_mode_ever_pairs_a_tie_identical_texts_or_a_nan():
    import random

    rng = random.Random(0)
    rows = []
    for p in range(30):
        texts = [rng.choice("abcd") for _ in range(5)]
        rewards = [rng.choice([0.0, 0.5, 1.0, math.nan]) for _ in range(5)]
        rows += samples(rewards, outputs=texts, prompt_id=f"p{p}")
    for mode in ("random", "max", "min", "all"):
        for threshold in (0.0, 0.4, {"quantile": 0.5}):
            items, _ = build_pairwise(rows, mode, threshold, seed=1)
            assert items, (mode, threshold)
            for item in items:
                assert item["reward_A"] != item["reward_B"], (mode, threshold)
                assert item["output_A"] != item["output_B"], (mode, threshold)
                assert not math.isnan(item["reward_A"]) and not math.isnan(item["reward_B"])


@pytest.mark.parametrize("mode", ["random", "max", "min", "all"])
def test_every_prompt_is_either_kept_or_dropped_with_a_reason(mode):
    rows = (samples([0.0, 1.0], prompt_id="kept") + samples([0.5, 0.5], prompt_id="tie")
            + samples([0.1, 0.9], outputs=["x", "x"], prompt_id="same") + samples([0.0, 0.05], prompt_id="close")
            + samples([math.nan, 0.3], prompt_id="nan") + samples([math.nan], prompt_id="lonely"))
    items, stats = build_pairwise(rows, mode, 0.1, seed=0)
    dropped = {k.removeprefix("prompts_dropped_"): v for k, v in stats.items() if k.startswith("prompts_dropped_")}
    assert stats["prompts"] == 6 and stats["prompts_kept"] == 1
    assert dropped == {"tie": 1, "identical_text": 1, "below_threshold": 1, "fewer_than_two_valid": 2}
    assert stats["samples"] == 11 and stats["samples_nan_reward"] == 2 and stats["samples_in_pairs"] == 2


def test_binary_threshold_as_a_quantile():
    items, stats = build_binary(samples([0.0, 1.0, 2.0, 3.0, 4.0]), {"quantile": 0.75})
    assert [i["label"] for i in items] == [0, 0, 0, 1, 1] and stats["threshold"] == 3.0


def test_binary_per_prompt_threshold_compares_samples_of_the_same_prompt():
    rows = samples([0.0, 1.0], prompt_id="low") + samples([5.0, 9.0], prompt_id="high")
    by_round, _ = build_binary(rows, "mean")
    by_prompt, stats = build_binary(rows, "mean", scope="prompt")
    assert [i["label"] for i in by_round] == [0, 0, 1, 1]
    assert [i["label"] for i in by_prompt] == [0, 1, 0, 1]
    assert stats["threshold"] is None


def test_binary_per_prompt_drops_a_prompt_whose_rewards_are_all_equal():
    rows = samples([0.3, 0.3], prompt_id="flat") + samples([0.0, 1.0], prompt_id="ok") + samples(
        [math.nan, math.nan], prompt_id="failed")
    items, stats = build_binary(rows, "median", scope="prompt")
    assert {i["prompt_id"] for i in items} == {"ok"}
    assert stats["prompts_dropped_all_equal"] == 1 and stats["prompts_dropped_no_valid_reward"] == 1
    assert stats["prompts"] == stats["prompts_kept"] + 2


def test_binary_number_threshold_is_the_same_in_both_scopes():
    rows = samples([0.3, 0.3], prompt_id="a") + samples([0.0, 1.0], prompt_id="b")
    assert build_binary(rows, 0.3) == build_binary(rows, 0.3, scope="prompt")


def test_scalar_counts_prompts_without_a_valid_reward():
    rows = samples([0.1, math.nan], prompt_id="a") + samples([math.nan], prompt_id="b")
    items, stats = build_scalar(rows)
    assert [i["reward"] for i in items] == [0.1]
    assert stats["prompts_dropped_no_valid_reward"] == 1 and stats["prompts_kept"] == 1


def test_feedback_stats_record_the_settings_and_the_threshold_used():
    from iteralign import config as cfg
    from iteralign.feedback import build_feedback

    config = cfg.validate({"feedback": {"pairwise": {"mode": "all", "threshold": {"quantile": 0.5}}}})
    _, stats = build_feedback(samples([0.0, 1.0, 3.0]), config, round_n=1)
    assert stats["type"] == "pairwise" and stats["mode"] == "all"
    assert stats["threshold_setting"] == {"quantile": 0.5} and stats["threshold"] == pytest.approx(2.0)


def test_halos_integer_prompt_ids_are_read_as_strings(tmp_path):
    path = tmp_path / "f.json"
    item, _ = build_binary(samples([0.0, 1.0]), "mean")
    path.write_text(json.dumps([{**i, "prompt_id": 7} for i in item]))
    assert [i["prompt_id"] for i in load_feedback(path)] == ["7", "7"]
