"""From feedback items to token tensors: encoding, truncation, examples per loss, batching.

The reference job and the train job both go through :func:`training_examples`,
so the sequences whose reference log-probs are precomputed are exactly the ones
the trainer looks up (by prompt id and completion hash).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from iteralign.modeling import render_prompt


@dataclass
class Encoded:
    """One prompt+completion as token ids; targets are ids[completion_start:]."""

    input_ids: list[int]
    completion_start: int
    truncated_prompt: bool = False
    truncated_completion: bool = False


def completion_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode(tokenizer, prompt_text: str, completion: str, max_length: int, max_prompt_length: int) -> Encoded:
    """Tokenize prompt and completion separately (as they were sampled) and append EOS.

    A prompt longer than max_prompt_length keeps its last tokens; a completion that
    still does not fit is cut at max_length. Both are flagged so callers count them.
    """
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    truncated_prompt = len(prompt_ids) > max_prompt_length
    if truncated_prompt:
        prompt_ids = prompt_ids[-max_prompt_length:]
    truncated_completion = len(prompt_ids) + len(completion_ids) > max_length
    if truncated_completion:
        completion_ids = completion_ids[: max_length - len(prompt_ids)]
    return Encoded(prompt_ids + completion_ids, len(prompt_ids), truncated_prompt, truncated_completion)


def collate(batch: list[Encoded], pad_id: int, device=None) -> dict:
    """Right-padded input_ids, attention_mask and completion_mask, ``[B, L]``."""
    import torch

    length = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    completion_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        attention_mask[row, :n] = 1
        completion_mask[row, e.completion_start : n] = 1
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    return {k: v.to(device) for k, v in tensors.items()} if device is not None else tensors


# ---------------------------------------------------------------- examples
@dataclass
class Pair:
    prompt_id: str
    prompt: list[dict]
    chosen: str
    rejected: str


@dataclass
class Single:
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


def singles_from_feedback(items: list[dict]) -> list[Single]:
    """Binary items as they are; pairwise items split into a desirable and an undesirable one."""
    singles = []
    for item in items:
        if item["type"] == "binary_feedback":
            singles.append(Single(item["prompt_id"], item["prompt"], item["output_text"], bool(item["label"])))
        else:
            for pair in pairs_from_feedback([item]):
                singles.append(Single(pair.prompt_id, pair.prompt, pair.chosen, True))
                singles.append(Single(pair.prompt_id, pair.prompt, pair.rejected, False))
    return singles


def assign_kl_partners(singles: list[Single], seed: int) -> None:
    """Give each example a completion from another prompt, for KTO's KL reference point.

    A seeded shuffle, then each example takes the completion of the next example in
    that order whose prompt differs (as HALOs shifts completions within a batch, but
    fixed in advance so the reference job can precompute the mismatched log-probs).
    """
    n = len(singles)
    if n == 0:
        return
    order = np.random.default_rng(seed).permutation(n)
    for position, index in enumerate(order):
        for step in range(1, n):
            partner = singles[order[(position + step) % n]]
            if partner.prompt_id != singles[index].prompt_id:
                break
        else:
            partner = singles[order[(position + 1) % n]]  # one prompt only: no mismatch exists
        singles[index].kl_prompt_id = singles[index].prompt_id
        singles[index].kl_prompt = singles[index].prompt
        singles[index].kl_completion = partner.completion


def scored_from_feedback(items: list[dict]) -> list[Single]:
    """Scalar feedback: each completion with its reward, in file order (grouped by prompt)."""
    return [Single(item["prompt_id"], item["prompt"], item["output_text"], reward=float(item["reward"]))
            for item in items]


def training_examples(items: list[dict], loss: str, seed: int) -> list[Pair] | list[Single]:
    """The examples a loss trains on, from one feedback file.

    Paired losses take the pairs; kto takes binary items, or pairs split in two, each
    with a KL partner; sft keeps the desirable side of those; grpo takes scalar items.
    """
    from iteralign.config import PAIRED_LOSSES

    if loss in PAIRED_LOSSES:
        return pairs_from_feedback(items)
    if loss == "grpo":
        return scored_from_feedback(items)
    singles = singles_from_feedback(items)
    if loss == "sft":
        return [single for single in singles if single.desirable]
    assign_kl_partners(singles, seed)
    return singles


def training_sequences(items: list[dict], loss: str, seed: int) -> list[tuple[str, list[dict], str]]:
    """Every distinct (prompt_id, prompt, completion) the trainer needs reference log-probs of."""
    seen, sequences = set(), []

    def add(prompt_id, prompt, completion):
        key = (prompt_id, completion_key(completion))
        if key not in seen:
            seen.add(key)
            sequences.append((prompt_id, prompt, completion))

    for example in training_examples(items, loss, seed):
        if isinstance(example, Pair):
            add(example.prompt_id, example.prompt, example.chosen)
            add(example.prompt_id, example.prompt, example.rejected)
        else:
            add(example.prompt_id, example.prompt, example.completion)
            if example.kl_completion is not None:
                add(example.kl_prompt_id, example.kl_prompt, example.kl_completion)
    return sequences


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


def process_chunks(batch: list, rank: int, world: int, micro_batch_size: int) -> list[tuple[list, float]]:
    """This process's micro-batches of a global batch, each with its weight (1, or 0 for padding).

    Items are dealt round-robin (``batch[rank::world]``), so a batch sorted by length
    gives every process a similar share. Every process returns the same number of
    micro-batches, as FSDP (and DDP's buffer broadcast) need the same number of
    forward passes on every rank: a process short of items repeats its first chunk
    (or the batch's first item) with weight 0.
    """
    local = batch[rank::world]
    count = math.ceil(math.ceil(len(batch) / world) / micro_batch_size)
    chunks = [(local[i : i + micro_batch_size], 1.0) for i in range(0, len(local), micro_batch_size)]
    filler = chunks[0][0] if chunks else batch[:1]
    return chunks + [(filler, 0.0)] * (count - len(chunks))


class PromptRenderer:
    """Memoised chat-template rendering: many completions share one prompt."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, str] = {}

    def __call__(self, prompt_id: str, prompt: list[dict]) -> str:
        if prompt_id not in self._cache:
            self._cache[prompt_id] = render_prompt(self.tokenizer, prompt)
        return self._cache[prompt_id]
