"""Every loss through the trainer: one step lowers it, reference-free losses need no reference,
GRPO on scalar feedback, SFT on chosen completions, the loss/feedback table."""

import json
import re

import pytest
import torch
from feedback_data import write_feedback
from helpers import REPO, micro_config

from iteralign import config as cfg
from iteralign.artifacts import write_parquet
from iteralign.config import ConfigError, uses_reference
from iteralign.feedback import load_feedback
from iteralign.logps import batched_completion_logps
from iteralign.modeling import load_causal_lm, load_tokenizer
from iteralign.reference import ReferenceLogps, reference_logps
from iteralign.train.objectives import OBJECTIVES, training_examples
from iteralign.train.trainer import _micro_batch_loss, build_examples, train_round

FEEDBACK_OF = {"dpo": "pairwise", "cdpo": "pairwise", "ipo": "pairwise", "slic": "pairwise", "simpo": "pairwise",
               "orpo": "pairwise", "kto": "binary", "sft": "pairwise", "grpo": "scalar"}


@pytest.fixture(scope="module")
def feedback(tmp_path_factory):
    folder = tmp_path_factory.mktemp("feedback")
    return {kind: write_feedback(folder, kind) for kind in ("pairwise", "binary", "scalar")}


def loss_config(loss: str, **training) -> dict:
    return cfg.validate(micro_config(feedback={"type": FEEDBACK_OF[loss]}, training={"loss": loss, **training}))


def reference_table(config, feedback_path, checkpoint, folder):
    path = folder / f"reflogps_{config['training']['loss']}.parquet"
    write_parquet(reference_logps(config, feedback_path, checkpoint), path)
    return path


@pytest.mark.parametrize("loss", sorted(FEEDBACK_OF))
def test_every_loss_padding_free_equals_padded(loss, feedback, tiny_checkpoint, tmp_path):
    """training.padding_free changes where the forward's positions go, not a loss or its gradient."""
    config = loss_config(loss)
    path = feedback[FEEDBACK_OF[loss]]
    tokenizer, model = load_tokenizer(tiny_checkpoint), load_causal_lm(tiny_checkpoint)
    reference = ReferenceLogps([reference_table(config, path, tiny_checkpoint, tmp_path)]) \
        if uses_reference(config["training"]) else None
    examples, _ = build_examples([path], config, tokenizer, reference)
    for example in examples:
        example.setdefault("old", -5.0)  # GRPO's sampler log-prob: any fixed value serves both
    results = []
    for padding_free in (False, True):
        tcfg = {**config["training"], "padding_free": padding_free}
        total, sums = _micro_batch_loss(model, examples, tcfg, tokenizer.pad_token_id, "cpu", torch.tensor(0.0))
        total.backward()
        results.append((total.detach(), sums, [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    (padded, padded_sums, padded_grads), (packed, packed_sums, packed_grads) = results
    assert torch.allclose(packed, padded, rtol=1e-5, atol=1e-5)
    assert packed_sums["tokens"] == padded_sums["tokens"] and packed_sums["positions"] <= padded_sums["positions"]
    # each gradient to float rounding relative to its largest entry (IPO's squared loss makes them large)
    assert padded_grads and all((a - b).abs().max() <= 1e-5 * b.abs().max()
                                for a, b in zip(packed_grads, padded_grads, strict=True))


@pytest.mark.parametrize("loss", sorted(FEEDBACK_OF))
def test_one_optimizer_step_lowers_the_loss_on_a_fixed_batch(loss, feedback, tiny_checkpoint, tmp_path):
    config = loss_config(loss)
    tcfg = config["training"]
    path = feedback[FEEDBACK_OF[loss]]
    tokenizer = load_tokenizer(tiny_checkpoint)
    model = load_causal_lm(tiny_checkpoint)
    reference = None
    if uses_reference(tcfg):
        table = reference_table(config, path, tiny_checkpoint, tmp_path)
        reference = ReferenceLogps([table])
    examples, _ = build_examples([path], config, tokenizer, reference)
    if loss == "grpo":
        old, _ = batched_completion_logps(model, [e["completion"] for e in examples], tokenizer.pad_token_id, 8, "cpu")
        for example, logp in zip(examples, old.tolist(), strict=True):
            example["old"] = logp
    kl = torch.tensor(0.0)  # KTO's reference point while the policy is the reference

    def mean_loss():
        model.train()
        total, _ = _micro_batch_loss(model, examples, tcfg, tokenizer.pad_token_id, "cpu", kl)
        return total / len(examples)

    before = mean_loss()
    before.backward()
    # a small step along the gradient (of norm 0.01 whatever the loss's scale) must lower the loss
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert grad_norm > 0
    torch.optim.SGD(model.parameters(), lr=0.01 / grad_norm.item()).step()
    with torch.no_grad():
        after = mean_loss()
    assert after.item() < before.item()


def test_reference_free_loss_trains_without_any_reference_table(feedback, tiny_checkpoint, tmp_path):
    config = loss_config("simpo", lr=1e-3)
    state = train_round(config, 1, [feedback["pairwise"]], [], tiny_checkpoint, tmp_path / "ckpt_r1" / "FINAL",
                        tmp_path / "train_r1.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "train_r1.jsonl").read_text().splitlines()]
    assert state["global_step"] == len(rows) > 0
    assert all("margin" in row for row in rows)


def test_reference_job_refuses_a_reference_free_loss(feedback, tiny_checkpoint):
    with pytest.raises(ConfigError, match="'orpo' with these settings is reference-free"):
        reference_logps(loss_config("orpo"), feedback["pairwise"], tiny_checkpoint)


def test_grpo_without_kl_needs_no_reference_but_with_kl_does():
    assert not uses_reference(loss_config("grpo", grpo={"kl_weight": 0.0})["training"])
    assert uses_reference(loss_config("grpo")["training"])


def test_a_loss_needing_the_reference_fails_without_its_table(feedback, tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="'dpo' needs reference log-probs"):
        train_round(loss_config("dpo"), 1, [feedback["pairwise"]], [], tiny_checkpoint, tmp_path / "FINAL",
                    tmp_path / "train_r1.jsonl")


def test_grpo_round_starts_with_ratio_one_against_the_sampling_policy(feedback, tiny_checkpoint, tmp_path):
    config = loss_config("grpo", lr=1e-3, batch_size=8, micro_batch_size=4)
    table = reference_table(config, feedback["scalar"], tiny_checkpoint, tmp_path)
    train_round(config, 1, [feedback["scalar"]], [table], tiny_checkpoint, tmp_path / "ckpt_r1" / "FINAL",
                tmp_path / "train_r1.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "train_r1.jsonl").read_text().splitlines()]
    # the old policy is the round's starting policy: before any update the ratio is exactly 1,
    # nothing is clipped, and the policy is the reference (round 1), so KL is 0
    assert rows[0]["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert rows[0]["clip_fraction"] == 0.0
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["ratio"] != pytest.approx(1.0, abs=1e-6)  # later steps move away from the sampler


def test_grpo_advantages_sum_to_zero_within_each_prompt(feedback, tiny_checkpoint):
    config = loss_config("grpo", grpo={"kl_weight": 0.0})
    examples, _ = build_examples([feedback["scalar"]], config, load_tokenizer(tiny_checkpoint), None)
    items = load_feedback(feedback["scalar"])
    per_prompt: dict[str, float] = {}
    for item, example in zip(items, examples, strict=True):
        per_prompt[item["prompt_id"]] = per_prompt.get(item["prompt_id"], 0.0) + example["advantage"]
    assert len(per_prompt) == 6
    assert all(total == pytest.approx(0.0, abs=1e-6) for total in per_prompt.values())
    assert any(example["advantage"] > 0.5 for example in examples)


def test_sft_on_pairwise_feedback_trains_on_the_chosen_completions_only(feedback):
    items = load_feedback(feedback["pairwise"])
    examples = training_examples(items, "sft", seed=0)
    chosen = [i["output_A_text"] if i["label"] == 1 else i["output_B_text"] for i in items]
    assert chosen and [e.completion for e in examples] == chosen
    assert all(e.desirable for e in examples)


def test_sft_on_binary_feedback_keeps_the_desirable_completions(feedback):
    items = load_feedback(feedback["binary"])
    examples = training_examples(items, "sft", seed=0)
    assert [e.completion for e in examples] == [i["output_text"] for i in items if i["label"] == 1]


@pytest.mark.parametrize("loss", sorted(OBJECTIVES))
def test_each_loss_refuses_the_feedback_types_it_cannot_train_on(loss):
    sampling = {"num_samples": 4}
    for kind in ("pairwise", "binary", "scalar"):
        raw = micro_config(sampling=sampling, feedback={"type": kind}, training={"loss": loss})
        if kind in OBJECTIVES[loss].feedback_types:
            cfg.validate(raw)
        else:
            with pytest.raises(ConfigError, match=rf"training.loss='{loss}' needs feedback.type in .* "
                                                  rf"found feedback.type='{kind}'"):
                cfg.validate(raw)


def test_grpo_must_train_on_its_own_round_only():
    with pytest.raises(ConfigError, match="training.history must be 'current', found 'all'"):
        loss_config("grpo", history="all")


def docs_loss_table() -> dict[str, tuple[set[str], str]]:
    """loss -> (feedback types, reference column) from the loss table of docs/training.md."""
    text = (REPO / "docs" / "training.md").read_text()
    section = text[text.index("## Losses"):text.index("### GRPO on scalar feedback")]
    table = {}
    for line in section.splitlines():
        match = re.match(r"\| `(\w+)` \|([^|]*)\|([^|]*)\|", line)
        if match:
            kinds = {kind for kind in ("pairwise", "binary", "scalar") if kind in match.group(2)}
            table[match.group(1)] = (kinds, match.group(3).strip())
    return table


def test_every_registry_entry_matches_its_row_of_the_docs_loss_table():
    table = docs_loss_table()
    assert set(table) == set(OBJECTIVES) == set(FEEDBACK_OF)  # and every loss is trained above
    for loss, objective in OBJECTIVES.items():
        kinds, reference = table[loss]
        assert kinds == objective.feedback_types, loss
        assert objective.needs_reference(loss_config(loss)["training"]) == reference.startswith("yes"), loss
        unless = re.search(r"unless `(\w+)\.(\w+)` is 0", reference)
        if unless:  # the setting that makes the loss reference-free
            section, key = unless.groups()
            assert not objective.needs_reference(loss_config(loss, **{section: {key: 0.0}})["training"]), loss
