"""Batched sampling with transformers: left padding, length-sorted batches, KV cache.

Prompts are sorted by token length (longest first, so an out-of-memory error
shows in the first batch, not the last) and generated ``batch_size`` prompts at
a time, each expanded to ``num_samples`` sequences. Every batch is seeded from
the round seed and its index, so a re-run with the same config gives the same text.
"""

from __future__ import annotations

import logging

import torch

from iteralign.config import derived_seed
from iteralign.sample import Completion, check_decoding, cut_at_stop
from iteralign.tokens import pad

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_texts: list[str],
    num_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    stop: list[str] | tuple[str, ...] = (),
    progress: str | None = None,
) -> list[list[Completion]]:
    """``num_samples`` completions for each prompt text, in the order of ``prompt_texts``."""
    from tqdm import tqdm
    from transformers import GenerationConfig

    check_decoding(temperature, num_samples)
    model.eval()
    device = next(model.parameters()).device
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = [tokenizer(text, add_special_tokens=False).input_ids for text in prompt_texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    generation_config = GenerationConfig(**_decoding_options(temperature, top_p), max_new_tokens=max_new_tokens,
                                         num_return_sequences=num_samples, eos_token_id=eos_id, pad_token_id=pad_id,
                                         use_cache=True)
    results: list[list[Completion]] = [[] for _ in prompt_texts]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch_index, batch in enumerate(tqdm(batches, desc=progress, disable=progress is None, mininterval=5)):
        input_ids, attention_mask = pad([encoded[i] for i in batch], pad_id, left=True)
        torch.manual_seed(derived_seed(seed, batch_index))
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=generation_config,
        )
        new_tokens = out[:, input_ids.shape[1] :].cpu().tolist()
        for row, tokens in enumerate(new_tokens):
            prompt_index = batch[row // num_samples]
            results[prompt_index].append(_completion(tokens, tokenizer, eos_id, pad_id, stop))
    return results


def _decoding_options(temperature: float, top_p: float) -> dict:
    """Sampling with no top-k cut (vLLM's default), or greedy decoding at temperature 0."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def _completion(tokens: list[int], tokenizer, eos_id: int, pad_id: int, stop) -> Completion:
    if eos_id in tokens:
        kept = tokens[: tokens.index(eos_id)]
        finish_reason, num_tokens = "stop", len(kept) + 1  # EOS counted, as vLLM counts it
    else:
        # pad_id may equal eos_id; padding only ever follows an EOS, handled above
        kept, finish_reason, num_tokens = tokens, "length", len(tokens)
    text = tokenizer.decode(kept, skip_special_tokens=True)
    cut = cut_at_stop(text, stop)
    if cut is not None:
        text = cut
        finish_reason = "stop"
        num_tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
    return Completion(text, num_tokens, finish_reason)
