"""Batches: length sorting and grouping, equal micro-batch counts per process, padding and
truncation reported, gradient checkpointing, several rounds of feedback (training.history)."""

import json
import logging

import numpy as np
import pytest
import torch
from feedback_data import write_feedback
from helpers import micro_config

from iteralign import config as cfg
from iteralign.artifacts import write_parquet
from iteralign.config import history_rounds
from iteralign.errors import UserError
from iteralign.logps import completion_logps
from iteralign.modeling import load_causal_lm
from iteralign.reference import reference_logps
from iteralign.tokens import Encoded, collate, pad, process_chunks
from iteralign.train.data import plan_batches
from iteralign.train.schedule import estimated_total_steps
from iteralign.train.trainer import enable_gradient_checkpointing, train_round


def padded_positions(batches, lengths, micro):
    """Forward positions (rows x longest row) over all micro-batches of the plan."""
    return sum(len(b[i : i + micro]) * max(lengths[j] for j in b[i : i + micro])
               for b in batches for i in range(0, len(b), micro))


def test_batches_without_grouping_are_the_seeded_permutation_each_sorted_longest_first():
    lengths = [5, 40, 12, 33, 8, 21, 17, 2, 29, 11]
    batches = plan_batches(lengths, 4, seed=[0, 1, 0], group_by_length=False)
    order = np.random.default_rng([0, 1, 0]).permutation(len(lengths))
    assert [set(b) for b in batches] == [set(order[i : i + 4].tolist()) for i in range(0, 10, 4)]
    assert all([lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True) for b in batches)


def test_grouping_by_length_cuts_padding_and_keeps_every_example_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=400).tolist()
    plain = plan_batches(lengths, 16, seed=1, group_by_length=False)
    grouped = plan_batches(lengths, 16, seed=1, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(400))
    assert all(len(b) == 16 for b in grouped)
    tokens = sum(lengths)
    waste_plain = 1 - tokens / padded_positions(plain, lengths, 16)
    waste_grouped = 1 - tokens / padded_positions(grouped, lengths, 16)
    assert waste_grouped < 0.1 < waste_plain


def test_every_process_runs_the_same_number_of_micro_batches():
    batch = list(range(9))
    for world in (1, 2, 4):
        plans = [process_chunks(batch, rank, world, micro_batch_size=2) for rank in range(world)]
        assert len({len(plan) for plan in plans}) == 1
        real = sorted(i for plan in plans for chunk, weight in plan if weight for i in chunk)
        assert real == batch  # each item once with weight 1; the rest is weight-0 filler
    lone = process_chunks([7], rank=1, world=2, micro_batch_size=4)
    assert lone == [([7], 0.0)]  # a process with no item joins with weight 0


def test_truncation_is_counted_and_reported(tmp_path, tiny_checkpoint, caplog):
    feedback = write_feedback(tmp_path, "pairwise")
    config = cfg.validate(micro_config(training={"loss": "simpo", "max_length": 8, "max_prompt_length": 4}))
    with caplog.at_level(logging.WARNING):
        state = train_round(config, 1, [feedback], [], tiny_checkpoint, tmp_path / "FINAL", tmp_path / "m.jsonl")
    # prompts render as "<bos>1x+2x=" (7 tokens) and keep their last 4; completions of up to 6
    # tokens (+ EOS) cut at 8 - 4
    assert state["truncation"]["truncated_prompts"] == state["truncation"]["sequences"] > 0
    assert 0 < state["truncation"]["truncated_completions"] < state["truncation"]["sequences"]
    assert "had their prompt cut" in caplog.text and "had their completion cut" in caplog.text
    saved = json.loads((tmp_path / "FINAL" / "trainer_state.json").read_text())
    assert saved["truncation"] == state["truncation"]


def test_padding_is_measured_per_step_and_for_the_round(tmp_path, tiny_checkpoint):
    feedback = write_feedback(tmp_path, "pairwise")
    config = cfg.validate(micro_config(training={"loss": "simpo"}))
    state = train_round(config, 1, [feedback], [], tiny_checkpoint, tmp_path / "FINAL", tmp_path / "m.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert sum(row["tokens"] for row in rows) == state["padding"]["tokens"]
    assert 0 < state["padding"]["waste"] < 1
    assert all(0 <= row["padding"] < 1 for row in rows)


def test_padding_goes_on_the_side_asked_and_the_masks_mark_the_tokens():
    rows = [[5, 6, 7], [8]]
    right_ids, right_mask = pad(rows, 0)
    left_ids, left_mask = pad(rows, 0, left=True)
    assert right_ids.tolist() == [[5, 6, 7], [8, 0, 0]] and right_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert left_ids.tolist() == [[5, 6, 7], [0, 0, 8]] and left_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    batch = collate([Encoded([1, 5, 6, 2], 2), Encoded([1, 9, 2], 1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 9, 2, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_checkpoint, tiny_tokenizer):
    batch = collate([Encoded([1, 5, 6, 7, 8, 2], 3), Encoded([1, 9, 4, 2], 2)], tiny_tokenizer.pad_token_id)
    results = []
    for checkpointing in (False, True):
        model = load_causal_lm(tiny_checkpoint)
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert model.is_activation_checkpointing
        model.train()
        logps, _ = completion_logps(model, **batch)
        logps.sum().backward()
        results.append((logps.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0][1], results[1][1], strict=True))


def test_history_selects_the_rounds_to_train_on():
    training = cfg.validate({})["training"]
    assert history_rounds(training, 3) == [3]
    assert history_rounds({**training, "history": "all"}, 3) == [1, 2, 3]
    assert history_rounds({**training, "history": "last_k", "history_k": 2}, 3) == [2, 3]
    assert history_rounds({**training, "history": "last_k", "history_k": 2}, 1) == [1]


def test_schedule_estimate_counts_the_growing_history():
    base = micro_config(prompts={"per_round": 10}, rounds=3, training={"batch_size": 4, "epochs": 1})
    current = estimated_total_steps(cfg.validate(base))
    grown = estimated_total_steps(cfg.validate({**base, "training": {**base["training"], "history": "all"}}))
    # 10 pairs a round (mode max): 3 rounds of ceil(10/4) = 9; with history ceil(10/4)+ceil(20/4)+ceil(30/4) = 16
    assert (current, grown) == (9, 16)


def test_history_trains_on_earlier_rounds_with_their_own_reference_tables(tmp_path, tiny_checkpoint):
    config = cfg.validate(micro_config(feedback={"type": "binary"},
                                       training={"loss": "kto", "history": "all", "lr": 1e-3}))
    files, tables = [], []
    for n in (1, 2):  # different prompts in each round, as the plan deals them
        files.append(write_feedback(tmp_path, "binary", round_n=n, n_prompts=4, offset=10 * n))
        tables.append(tmp_path / f"reflogps_r{n}.parquet")
        write_parquet(reference_logps(config, files[-1], tiny_checkpoint), tables[-1])
    state = train_round(config, 2, files, tables[::-1], tiny_checkpoint, tmp_path / "FINAL", tmp_path / "m.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert state["feedback_files"] == [str(f) for f in files]
    assert sum(row["examples"] for row in rows) == 2 * 16
    # KTO's KL partners are drawn within each file, as each round's reference job drew them:
    # the reference point is exactly 0 before the first update
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(UserError, match="no reference log-prob"):
        train_round(config, 2, files, tables[:1], tiny_checkpoint, tmp_path / "F2", tmp_path / "m2.jsonl")
