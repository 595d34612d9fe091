"""Completion log-probs, padded and packed padding-free (training.padding_free), against a
straightforward log_softmax + gather of each sequence on its own, on a tiny model."""

import json

import pytest
import torch
from feedback_data import write_feedback
from helpers import micro_config

from iteralign import config as cfg
from iteralign.logps import completion_logps, packed_completion_logps
from iteralign.modeling import load_causal_lm
from iteralign.tiny import build_llama
from iteralign.tokens import Encoded, collate, collate_packed, pack_rows
from iteralign.train.trainer import train_round

# lengths 3 to 11, completions starting anywhere from the first token to the last
SEQUENCES = [Encoded([1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 2], 4), Encoded([1, 9, 2], 1),
             Encoded([1, 7, 7, 7, 2], 3), Encoded([1, 4, 5, 6, 7, 8, 2], 0), Encoded([1, 3, 4, 5, 6, 2], 5),
             Encoded([1, 12, 11, 10, 9, 8, 7, 6, 2], 2)]


def plain_logps(model, e: Encoded) -> torch.Tensor:
    """log p of e's completion tokens, summed: the sequence alone, a full log_softmax and a gather."""
    ids = torch.tensor([e.input_ids])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    token_logps = logprobs.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
    return token_logps[max(e.completion_start, 1) - 1 :].sum()


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    torch.manual_seed(0)
    return build_llama(tiny_tokenizer, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, seed=1)


def test_rows_hold_every_sequence_once_within_the_longest():
    lengths = [11, 3, 5, 7, 6, 9, 2, 2]
    rows = pack_rows(lengths, max(lengths))
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 11 for row in rows)
    assert len(rows) < len(lengths)
    assert pack_rows([4, 9], 5) == [[1], [0]]  # longer than a row: a row of its own


def test_packed_layout_restarts_positions_and_never_targets_a_first_token():
    batch = collate_packed([Encoded([1, 5, 6, 2], 2), Encoded([1, 9], 0), Encoded([1, 8], 1)], pad_id=0)
    ids, positions, segments = batch["input_ids"].tolist(), batch["position_ids"].tolist(), batch["segments"].tolist()
    assert ids == [[1, 5, 6, 2], [1, 9, 1, 8]]  # rows no longer than the longest sequence
    assert positions == [[0, 1, 2, 3], [0, 1, 0, 1]] and segments == [[0, 0, 0, 0], [1, 1, 2, 2]]
    # completion_start 0: the sequence's first token has nothing before it and is not a target
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 1]]
    padded = collate_packed([Encoded([1, 5, 6, 2], 2), Encoded([1, 9, 2], 1)], pad_id=0)
    assert padded["input_ids"].tolist()[1] == [1, 9, 2, 0]  # the padding tail: a block of its own
    assert padded["position_ids"].tolist()[1] == [0, 1, 2, 0] and padded["segments"].tolist()[1] == [1, 1, 1, -1]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "padding-free"])
def test_log_probs_and_gradients_equal_each_sequence_alone(model, packed):
    expected = torch.stack([plain_logps(model, e) for e in SEQUENCES])
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    if packed:
        tensors = collate_packed(SEQUENCES, pad_id=0)
        assert tensors["input_ids"].shape[0] < len(SEQUENCES)  # sequences share rows
        logps, counts = packed_completion_logps(model, **tensors, count=len(SEQUENCES))
    else:
        logps, counts = completion_logps(model, **collate(SEQUENCES, pad_id=0))
    logps.sum().backward()
    assert counts.tolist() == [len(e.input_ids) - max(e.completion_start, 1) for e in SEQUENCES]
    assert torch.allclose(logps, expected.detach(), rtol=1e-5, atol=1e-5)
    grads = [p.grad for p in model.parameters()]
    assert grads and all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, expected_grads, strict=True))
    model.zero_grad()


def test_a_round_padding_free_trains_as_the_padded_one_on_no_more_positions(tmp_path, tiny_checkpoint):
    feedback = write_feedback(tmp_path, "pairwise")
    rows, states = {}, {}
    for packed in (False, True):
        config = cfg.validate(micro_config(training={"loss": "simpo", "padding_free": packed}))
        out = tmp_path / str(packed)
        states[packed] = train_round(config, 1, [feedback], [], tiny_checkpoint, out / "FINAL", out / "m.jsonl")
        rows[packed] = [json.loads(line) for line in (out / "m.jsonl").read_text().splitlines()]
    assert len(rows[True]) == len(rows[False]) > 0
    for padded, packed in zip(rows[False], rows[True], strict=True):
        assert packed["tokens"] == padded["tokens"]
        assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-4, abs=1e-5)
        assert packed["padding"] <= padded["padding"]
    assert states[True]["padding"]["waste"] <= states[False]["padding"]["waste"]
    padded_model, packed_model = (load_causal_lm(tmp_path / str(p) / "FINAL") for p in (False, True))
    for a, b in zip(padded_model.parameters(), packed_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_the_output_layer_runs_at_the_predicting_positions_only_and_is_restored(model, monkeypatch):
    tensors = collate_packed(SEQUENCES, pad_id=0)
    shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: shapes.append(out.shape))
    try:
        logps, counts = packed_completion_logps(model, **tensors, count=len(SEQUENCES))
        assert shapes == [(int(counts.sum()), model.config.vocab_size)]  # [K, V], not [R, T, V]
        after = model(input_ids=tensors["input_ids"]).logits
        assert after.shape == (*tensors["input_ids"].shape, model.config.vocab_size)  # the hook is gone
    finally:
        handle.remove()
    monkeypatch.setattr(type(model), "get_output_embeddings", lambda self: None)  # not found: full logits
    full, _ = packed_completion_logps(model, **tensors, count=len(SEQUENCES))
    assert torch.allclose(full, logps, rtol=1e-5, atol=1e-5)


def test_padding_free_through_a_lora_adapter_equals_padded(model):
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    try:
        padded, _ = completion_logps(wrapped, **collate(SEQUENCES, pad_id=0))
        packed, _ = packed_completion_logps(wrapped, **collate_packed(SEQUENCES, pad_id=0), count=len(SEQUENCES))
        assert torch.allclose(packed, padded, rtol=1e-5, atol=1e-5)
    finally:
        wrapped.unload()
