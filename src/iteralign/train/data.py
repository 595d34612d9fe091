"""From feedback items to training examples and their token tensors, and batching.

Each loss's entry in :mod:`iteralign.train.objectives` names its example builder
(``*_examples``: feedback items to :class:`Pair` or :class:`Unpaired`) and its token
builder (``*_tensors``: those to token ids with reference log-probs). The reference
job and the train job both build examples through that entry, so the sequences
whose reference log-probs are precomputed are exactly the ones the trainer looks
up (by prompt id and completion hash).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from iteralign.tokens import Encoded, PromptRenderer, completion_key, encode


# ---------------------------------------------------------------- examples
@dataclass
class Pair:
    """A preference pair: two completions of one prompt, the preferred one first."""

    prompt_id: str
    prompt: list[dict]
    chosen: str
    rejected: str


@dataclass
class Unpaired:
    """One completion: binary feedback, a split pair, or a scalar-scored sample (``reward``)."""

    prompt_id: str
    prompt: list[dict]
    completion: str
    desirable: bool | None = None
    reward: float | None = None
    kl_prompt_id: str | None = None
    kl_prompt: list[dict] | None = field(default=None, repr=False)
    kl_completion: str | None = None


def pairs_from_feedback(items: list[dict]) -> list[Pair]:
    pairs = []
    for item in items:
        a, b = item["output_A_text"], item["output_B_text"]
        chosen, rejected = (a, b) if item["label"] == 1 else (b, a)
        pairs.append(Pair(item["prompt_id"], item["prompt"], chosen, rejected))
    return pairs


def unpaired_from_feedback(items: list[dict]) -> list[Unpaired]:
    """Binary items as they are; pairwise items split into a desirable and an undesirable one."""
    unpaired = []
    for item in items:
        if item["type"] == "binary_feedback":
            unpaired.append(Unpaired(item["prompt_id"], item["prompt"], item["output_text"], bool(item["label"])))
        else:
            for pair in pairs_from_feedback([item]):
                unpaired.append(Unpaired(pair.prompt_id, pair.prompt, pair.chosen, True))
                unpaired.append(Unpaired(pair.prompt_id, pair.prompt, pair.rejected, False))
    return unpaired


def assign_kl_partners(examples: list[Unpaired], seed: int) -> None:
    """Give each example a completion from another prompt, for KTO's KL reference point.

    A seeded shuffle, then each example takes the completion of the next example in
    that order whose prompt differs (as HALOs shifts completions within a batch, but
    fixed in advance so the reference job can precompute the mismatched log-probs).
    """
    n = len(examples)
    if n == 0:
        return
    order = np.random.default_rng(seed).permutation(n)
    for position, index in enumerate(order):
        for step in range(1, n):
            partner = examples[order[(position + step) % n]]
            if partner.prompt_id != examples[index].prompt_id:
                break
        else:
            partner = examples[order[(position + 1) % n]]  # one prompt only: no mismatch exists
        examples[index].kl_prompt_id = examples[index].prompt_id
        examples[index].kl_prompt = examples[index].prompt
        examples[index].kl_completion = partner.completion


def scored_from_feedback(items: list[dict]) -> list[Unpaired]:
    """Scalar feedback: each completion with its reward, in file order (grouped by prompt)."""
    return [Unpaired(item["prompt_id"], item["prompt"], item["output_text"], reward=float(item["reward"]))
            for item in items]


# ---------------------------------------------------------------- the examples of each loss (objectives.py)
def pair_examples(items: list[dict], seed: int) -> list[Pair]:
    """Paired losses: every pairwise item as (chosen, rejected)."""
    return pairs_from_feedback(items)


def kto_examples(items: list[dict], seed: int) -> list[Unpaired]:
    """KTO: binary items, or pairs split in two, each with a KL partner drawn with ``seed``."""
    examples = unpaired_from_feedback(items)
    assign_kl_partners(examples, seed)
    return examples


def desirable_examples(items: list[dict], seed: int) -> list[Unpaired]:
    """SFT: the desirable side of binary or split pairwise items."""
    return [example for example in unpaired_from_feedback(items) if example.desirable]


def scored_examples(items: list[dict], seed: int) -> list[Unpaired]:
    """GRPO: scalar items with their rewards."""
    return scored_from_feedback(items)


def training_sequences(examples: list[Pair] | list[Unpaired]) -> list[tuple[str, list[dict], str]]:
    """Every distinct (prompt_id, prompt, completion) the trainer needs reference log-probs of."""
    seen, sequences = set(), []

    def add(prompt_id, prompt, completion):
        key = (prompt_id, completion_key(completion))
        if key not in seen:
            seen.add(key)
            sequences.append((prompt_id, prompt, completion))

    for example in examples:
        if isinstance(example, Pair):
            add(example.prompt_id, example.prompt, example.chosen)
            add(example.prompt_id, example.prompt, example.rejected)
        else:
            add(example.prompt_id, example.prompt, example.completion)
            if example.kl_completion is not None:
                add(example.kl_prompt_id, example.kl_prompt, example.kl_completion)
    return sequences


# ---------------------------------------------------------------- token examples of each loss
class CountingEncoder:
    """``(prompt_id, prompt, completion) -> Encoded`` at the round's lengths, counting truncations."""

    def __init__(self, tokenizer, training: dict):
        self.tokenizer, self.training = tokenizer, training
        self.render = PromptRenderer(tokenizer)
        self.counts = {"truncated_prompts": 0, "truncated_completions": 0, "sequences": 0}

    def __call__(self, prompt_id: str, prompt: list[dict], completion: str) -> Encoded:
        e = encode(self.tokenizer, self.render(prompt_id, prompt), completion, self.training["max_length"],
                   self.training["max_prompt_length"])
        self.counts["sequences"] += 1
        self.counts["truncated_prompts"] += e.truncated_prompt
        self.counts["truncated_completions"] += e.truncated_completion
        return e


# The token fields of the examples below, each with the field of its reference log-prob.
REFERENCE_FIELDS = {"chosen": "reference_chosen", "rejected": "reference_rejected", "completion": "reference",
                    "kl": "reference_kl"}
# What a token-example builder gets: the encoder above and the reference log-prob of
# (prompt_id, completion), None for a reference-free loss.
Encoder = Callable[[str, list[dict], str], Encoded]
ReferenceLogp = Callable[[str, str], float | None]


def pair_tensors(examples: list[Pair], encode: Encoder, reference: ReferenceLogp, training: dict) -> list[dict]:
    """Chosen and rejected token ids with their reference log-probs."""
    return [{"chosen": encode(ex.prompt_id, ex.prompt, ex.chosen),
             "rejected": encode(ex.prompt_id, ex.prompt, ex.rejected),
             "reference_chosen": reference(ex.prompt_id, ex.chosen),
             "reference_rejected": reference(ex.prompt_id, ex.rejected)} for ex in examples]


def kto_tensors(examples: list[Unpaired], encode: Encoder, reference: ReferenceLogp, training: dict) -> list[dict]:
    """A completion, its label and reference log-prob, and its KL partner with its reference log-prob."""
    return [{"completion": encode(ex.prompt_id, ex.prompt, ex.completion),
             "reference": reference(ex.prompt_id, ex.completion),
             "desirable": ex.desirable,
             "kl": encode(ex.kl_prompt_id, ex.kl_prompt, ex.kl_completion),
             "reference_kl": reference(ex.kl_prompt_id, ex.kl_completion)} for ex in examples]


def sft_tensors(examples: list[Unpaired], encode: Encoder, reference: ReferenceLogp, training: dict) -> list[dict]:
    """A completion's token ids only."""
    return [{"completion": encode(ex.prompt_id, ex.prompt, ex.completion)} for ex in examples]


def grpo_tensors(examples: list[Unpaired], encode: Encoder, reference: ReferenceLogp, training: dict) -> list[dict]:
    """A completion, its reference log-prob, its advantage within its prompt's group (of this file),
    and its (prompt_id, completion)."""
    import torch

    from iteralign.train.losses import group_advantages

    group_ids = {pid: i for i, pid in enumerate(dict.fromkeys(ex.prompt_id for ex in examples))}
    advantages = group_advantages(
        torch.tensor([ex.reward for ex in examples], dtype=torch.float64),
        torch.tensor([group_ids[ex.prompt_id] for ex in examples]),
        training["grpo"]["scale_by_std"],
    ).tolist()
    return [{"completion": encode(ex.prompt_id, ex.prompt, ex.completion),
             "reference": reference(ex.prompt_id, ex.completion),
             "advantage": advantage,
             "sequence": (ex.prompt_id, ex.completion)}  # to look up its old-policy log-prob
            for ex, advantage in zip(examples, advantages, strict=True)]


def example_length(example: dict) -> int:
    """Tokens of the longest sequence an example puts in its forward pass."""
    return max(len(example[key].input_ids) for key in ("chosen", "rejected", "completion") if key in example)


# ---------------------------------------------------------------- batching
# group_by_length sorts windows of this many batches by length (as transformers'
# LengthGroupedSampler's mega-batches): long enough to find similar lengths, short
# enough that batch order stays random over the epoch.
LENGTH_GROUP_BATCHES = 50


def plan_batches(lengths: list[int], batch_size: int, seed, group_by_length: bool) -> list[list[int]]:
    """Split example indices into global batches, each sorted longest first.

    A seeded permutation cut into batches of ``batch_size`` (the last may be short).
    With ``group_by_length``, windows of LENGTH_GROUP_BATCHES batches of that
    permutation are sorted by length before cutting and the batches are then
    shuffled, so each batch holds examples of similar length. Sorting inside a
    batch only changes how it is cut into micro-batches, not what the step computes.
    """
    rng = np.random.default_rng(seed)
    order = [int(i) for i in rng.permutation(len(lengths))]
    if group_by_length:
        window = batch_size * LENGTH_GROUP_BATCHES
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start : start + window], key=lambda i: -lengths[i])]
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return [sorted(batch, key=lambda i: -lengths[i]) for batch in batches]
