"""Sampling with vLLM: the rows the transformers backend writes, generated on GPUs.

A thin adapter around ``vllm.LLM.generate``. :func:`engine_arguments` and
:func:`sampling_arguments` build what ``LLM(...)`` and ``SamplingParams(...)`` take,
and :func:`to_completions` turns vLLM's ``RequestOutput`` list into
:class:`~iteralign.sample.Completion` rows with the transformers backend's meaning:
``num_tokens`` counts the EOS token when a completion stopped on it, a stop string
is cut off (and the kept text's tokens counted), ``finish_reason`` is stop or length.

Prompts go to vLLM as token ids: the checkpoint's chat template is rendered by
transformers (:func:`iteralign.modeling.render_prompt`) and tokenized without
special tokens, exactly as ``hf.py`` does, so both backends feed the model the
same tokens (and vLLM adds no second BOS). Only :func:`generate` imports vLLM,
which lives in its own environment (envs/vllm.yaml). docs/cluster.md says how this
was checked without vLLM installed.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence

from iteralign.sample import Completion, check_decoding

log = logging.getLogger(__name__)

_SEED_RANGE = 2**31 - 1  # per-request seeds stay within a 32-bit signed int


def engine_arguments(checkpoint: str, config: dict, seed: int) -> dict:
    """Keyword arguments of ``vllm.LLM``: the checkpoint, tensor parallel size, seed, prefix caching."""
    sampling = config["sampling"]
    return {
        "model": str(checkpoint),
        "tokenizer": str(checkpoint),
        "tensor_parallel_size": max(1, sampling["tensor_parallel_size"]),
        "seed": seed,
        "enable_prefix_caching": sampling["enable_prefix_caching"],
        "gpu_memory_utilization": sampling["gpu_memory_utilization"],
        "trust_remote_code": config["policy"]["trust_remote_code"],
    }


def request_seed(seed: int, prompt_index: int) -> int:
    """Seed of one prompt's request: every prompt draws its k samples from its own stream."""
    return (seed * 1_000_003 + prompt_index) % _SEED_RANGE


def sampling_arguments(decoding: dict, seed: int, prompt_index: int) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` for one prompt (n = num_samples completions)."""
    temperature = decoding["temperature"]
    check_decoding(temperature, decoding["num_samples"])
    return {
        "n": decoding["num_samples"],
        "temperature": temperature,
        "top_p": decoding["top_p"] if temperature > 0 else 1.0,
        "max_tokens": decoding["max_new_tokens"],
        "stop": list(decoding.get("stop") or []) or None,
        "seed": request_seed(seed, prompt_index),
    }


def to_completion(output, count_tokens: Callable[[str], int]) -> Completion:
    """One ``CompletionOutput`` (text, token_ids, finish_reason, stop_reason) as a Completion."""
    if output.finish_reason == "length":
        return Completion(output.text, len(output.token_ids), "length")
    if output.finish_reason != "stop":
        raise RuntimeError(f"vLLM finished a completion with finish_reason {output.finish_reason!r}; "
                           "expected 'stop' or 'length'")
    if isinstance(output.stop_reason, str):
        # vLLM cut the text before a stop string: count the kept text, as the hf backend does
        return Completion(output.text, count_tokens(output.text), "stop")
    # EOS (stop_reason None) or a stop token id: the last of token_ids, counted as in hf.py
    return Completion(output.text, len(output.token_ids), "stop")


def to_completions(request_outputs: Sequence, num_prompts: int,
                   count_tokens: Callable[[str], int]) -> list[list[Completion]]:
    """vLLM's ``RequestOutput`` list (one per prompt, in prompt order) as completions per prompt."""
    if len(request_outputs) != num_prompts:
        raise RuntimeError(f"vLLM returned {len(request_outputs)} request outputs for {num_prompts} prompts")
    completions = []
    for request in request_outputs:
        outputs = sorted(request.outputs, key=_output_index)
        completions.append([to_completion(output, count_tokens) for output in outputs])
    return completions


def _output_index(output) -> int:
    return output.index


def _token_counter(tokenizer) -> Callable[[str], int]:
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    return count


def _release_gpu_memory() -> None:
    """Let evaluate load transformers models on the same GPUs after sampling."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate(checkpoint: str, tokenizer, prompt_texts: list[str], decoding: dict, config: dict,
             seed: int) -> list[list[Completion]]:
    """``decoding['num_samples']`` completions for each rendered prompt, in the order given."""
    from vllm import LLM, SamplingParams

    prompts = [{"prompt_token_ids": tokenizer(text, add_special_tokens=False).input_ids} for text in prompt_texts]
    params = [SamplingParams(**sampling_arguments(decoding, seed, i)) for i in range(len(prompts))]
    engine = engine_arguments(checkpoint, config, seed)
    log.info("vLLM: %d prompts x %d samples, tensor parallel %d, prefix caching %s", len(prompts),
             decoding["num_samples"], engine["tensor_parallel_size"], engine["enable_prefix_caching"])
    llm = LLM(**engine)
    outputs = llm.generate(prompts, params, use_tqdm=True)
    del llm
    _release_gpu_memory()
    return to_completions(outputs, len(prompts), _token_counter(tokenizer))
