"""From feedback items to token tensors: encoding, truncation, KL partners, batching.

The reference job and the train job both go through :func:`training_sequences`,
so the sequences whose reference log-probs are precomputed are exactly the ones
the trainer looks up (by prompt id and completion hash).
"""

from __future__ import annotations

import hashlib
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
    prompt_id: str
    prompt: list[dict]
    completion: str
    desirable: bool
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


def training_examples(items: list[dict], loss: str, seed: int) -> list[Pair] | list[Single]:
    if loss in ("dpo",):
        return pairs_from_feedback(items)
    singles = singles_from_feedback(items)
    if loss == "kto":
        assign_kl_partners(singles, seed)
    return singles


def training_sequences(items: list[dict], loss: str, seed: int) -> list[tuple[str, list[dict], str]]:
    """Every distinct (prompt_id, prompt, completion) the trainer will need log-probs for."""
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


class PromptRenderer:
    """Memoised chat-template rendering: many completions share one prompt."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, str] = {}

    def __call__(self, prompt_id: str, prompt: list[dict]) -> str:
        if prompt_id not in self._cache:
            self._cache[prompt_id] = render_prompt(self.tokenizer, prompt)
        return self._cache[prompt_id]
