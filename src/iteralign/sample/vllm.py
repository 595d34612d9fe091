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
which lives in its own environment: ``.venv-vllm`` (the CPU build, ``make vllm``) or
envs/vllm.yaml on a GPU cluster. docs/cluster.md says how a run picks it.
"""

from __future__ import annotations

import gc
import logging
import os
import re
from collections.abc import Callable, Sequence

from iteralign.config import derived_seed
from iteralign.errors import UserError
from iteralign.sample import Completion, check_decoding

log = logging.getLogger(__name__)

_SEED_RANGE = 2**31 - 1  # per-request seeds stay within a 32-bit signed int


def engine_arguments(checkpoint: str, config: dict, seed: int, on_gpu: bool) -> dict:
    """Keyword arguments of ``vllm.LLM`` from config.sampling, with defaults that work with and without a GPU.

    Without a GPU (the CPU build of vLLM): float32 (the hf backend's dtype, so both give the
    same greedy text), eager mode, 10% of host memory for the KV cache, and the engine in
    this process (``distributed_executor_backend="uni"``; see :func:`prepare_environment`).
    """
    sampling = config["sampling"]
    utilization = sampling["gpu_memory_utilization"]
    eager = sampling["enforce_eager"]
    arguments = {
        "model": str(checkpoint),
        "tokenizer": str(checkpoint),
        "tensor_parallel_size": max(1, sampling["tensor_parallel_size"]),
        "seed": seed,
        "enable_prefix_caching": sampling["enable_prefix_caching"],
        "gpu_memory_utilization": utilization if utilization is not None else (0.85 if on_gpu else 0.1),
        "dtype": engine_dtype(sampling["dtype"], on_gpu),
        "enforce_eager": eager if eager is not None else not on_gpu,
        "trust_remote_code": config["policy"]["trust_remote_code"],
    }
    if sampling["max_model_len"] is not None:
        arguments["max_model_len"] = sampling["max_model_len"]
    if sampling["kv_cache_memory_gb"] is not None:
        arguments["kv_cache_memory_bytes"] = int(sampling["kv_cache_memory_gb"] * 2**30)
    if not on_gpu:
        arguments["distributed_executor_backend"] = "uni"
    return arguments


def engine_dtype(dtype: str, on_gpu: bool) -> str:
    """sampling.dtype as vLLM's ``dtype``: auto is float32 on CPU, the checkpoint's dtype on GPUs."""
    if dtype == "auto":
        return "auto" if on_gpu else "float32"
    return dtype


def prepare_environment(on_gpu: bool, threads: int) -> None:
    """Environment variables vLLM reads at import, set before the import (a user's own values win).

    On CPU the engine runs in this process (no engine-core and worker processes that each
    import vLLM again; docs/benchmarks.md has one measurement) and does not pin OpenMP threads to cores,
    so two jobs on one host do not fight over the same cores; ``threads`` caps its threads.
    """
    if on_gpu:
        return
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


class EngineStartError(UserError):
    """vLLM could not start or run a checkpoint; the message names the config key to change."""


# (what vLLM's error says, what it means and which key to change). Matched in order, case-insensitively.
_START_FAILURES = [
    (r"unsupported cpu attention|head_dim|head size",
     "this model's attention shape is not supported by vLLM on this device; use sampling.backend: hf"),
    (r"memory|kv cache|out of memory|cache blocks",
     "not enough memory for the weights and KV cache: lower sampling.max_model_len, or raise "
     "sampling.gpu_memory_utilization / sampling.kv_cache_memory_gb (or lower them where the host is shared)"),
    (r"max_model_len|max_seq_len|model's max seq len|context length",
     "the context does not fit: lower sampling.max_model_len"),
    (r"architecture",
     "vLLM does not support this model architecture: use sampling.backend: hf"),
    (r"tokeni[sz]er",
     "vLLM could not load the checkpoint's tokenizer: fix the tokenizer files or use sampling.backend: hf"),
]


def start_failure_message(checkpoint: str, error: BaseException) -> str:
    """One line: why vLLM failed on ``checkpoint`` and the config key to change."""
    texts = []
    while error is not None and len(texts) < 8:
        texts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    detail = " <- ".join(" ".join(t.split()) for t in texts)
    advice = next((advice for pattern, advice in _START_FAILURES if re.search(pattern, detail, re.IGNORECASE)),
                  "see vLLM's messages above in this log, or use sampling.backend: hf")
    return f"vLLM failed on {checkpoint}: {advice} ({detail[:300]})"


def request_seed(seed: int, prompt_index: int) -> int:
    """Seed of one prompt's request: every prompt draws its k samples from its own stream."""
    return derived_seed(seed, prompt_index) % _SEED_RANGE


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
    import torch

    on_gpu = torch.cuda.is_available()
    prepare_environment(on_gpu, torch.get_num_threads())  # the job's --threads, set before
    from vllm import LLM, SamplingParams

    prompts = [{"prompt_token_ids": tokenizer(text, add_special_tokens=False).input_ids} for text in prompt_texts]
    params = [SamplingParams(**sampling_arguments(decoding, seed, i)) for i in range(len(prompts))]
    engine = engine_arguments(checkpoint, config, seed, on_gpu)
    log.info("vLLM: %d prompts x %d samples, engine %s", len(prompts), decoding["num_samples"],
             {k: v for k, v in engine.items() if k not in ("model", "tokenizer")})
    failure = None
    try:  # some failures (a head size the CPU attention lacks) only show in the first step
        llm = LLM(**engine)
        outputs = llm.generate(prompts, params, use_tqdm=True)
    except Exception as error:  # vLLM raises many kinds; each is turned into one line naming a key
        if os.environ.get("ITERALIGN_DEBUG"):
            raise
        failure = start_failure_message(checkpoint, error)
    if failure is not None:
        gc.collect()  # vLLM's progress bar closes now, not after the message
        raise EngineStartError(failure)
    del llm
    _release_gpu_memory()
    return to_completions(outputs, len(prompts), _token_counter(tokenizer))
