"""From text to token tensors, shared by sample, score, reference, train, sft and evaluate.

Prompt rendering (memoised per prompt), encoding of a prompt and its completion
with truncation, padding, the completion key the reference tables are looked up
by, and the dealing of a batch to processes. Log-probs of the encoded sequences
are in :mod:`iteralign.logps`. torch is imported inside the functions that build
tensors.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from iteralign.modeling import render_prompt


@dataclass
class Encoded:
    """One prompt+completion as token ids; targets are ids[completion_start:]."""

    input_ids: list[int]
    completion_start: int
    truncated_prompt: bool = False
    truncated_completion: bool = False


def completion_key(text: str) -> str:
    """The key a completion's reference log-prob is stored and looked up by (with its prompt_id)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PromptRenderer:
    """Memoised chat-template rendering: many completions share one prompt."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, str] = {}

    def __call__(self, prompt_id: str, prompt: list[dict]) -> str:
        if prompt_id not in self._cache:
            self._cache[prompt_id] = render_prompt(self.tokenizer, prompt)
        return self._cache[prompt_id]


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


def pad(rows: list[list[int]], pad_id: int, left: bool = False):
    """input_ids and attention_mask, ``[B, L]`` long tensors on CPU, padded on the right
    (scoring and training) or on the left (generation, so every row ends at its last prompt token)."""
    import torch

    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        input_ids[index, span] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, span] = 1
    return input_ids, attention_mask


def collate(batch: list[Encoded], pad_id: int, device=None) -> dict:
    """Right-padded input_ids, attention_mask and completion_mask, ``[B, L]``."""
    import torch

    input_ids, attention_mask = pad([e.input_ids for e in batch], pad_id)
    completion_mask = torch.zeros_like(attention_mask)
    for row, e in enumerate(batch):
        completion_mask[row, e.completion_start : len(e.input_ids)] = 1
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    return {k: v.to(device) for k, v in tensors.items()} if device is not None else tensors


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of sequences of these lengths packed into rows of at most ``capacity`` tokens
    (first-fit decreasing; a sequence longer than ``capacity`` gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def collate_packed(batch: list[Encoded], pad_id: int, device=None) -> dict:
    """The sequences packed padding-free into rows no longer than the longest of them, ``[R, T]``:
    input_ids, position_ids (from 0 in each sequence, so that transformers masks attention
    block-diagonally: a sequence attends only to its own earlier tokens), completion_mask (the
    targets; never a sequence's first token, which has nothing before it in its row) and
    ``segments``, the index in ``batch`` of the sequence each position holds (-1: padding).
    A row's padding tail is a block of its own, positions again from 0."""
    import torch

    lengths = [len(e.input_ids) for e in batch]
    rows = pack_rows(lengths, max(lengths))
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            e, end = batch[index], start + lengths[index]
            input_ids[r, start:end] = torch.tensor(e.input_ids, dtype=torch.long)
            position_ids[r, start:end] = torch.arange(lengths[index])
            completion_mask[r, start + max(e.completion_start, 1) : end] = 1
            segments[r, start:end] = index
            start = end
        position_ids[r, start:] = torch.arange(width - start)
    tensors = {"input_ids": input_ids, "position_ids": position_ids, "completion_mask": completion_mask,
               "segments": segments}
    return {k: v.to(device) for k, v in tensors.items()} if device is not None else tensors


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
