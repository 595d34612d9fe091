"""Sampling k completions per prompt from a checkpoint, with either backend.

Both backends return the same thing (a list of :class:`Completion` per prompt),
and :func:`sample_frame` turns that into the rows of ``samples_r{n}.parquet``.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import NamedTuple

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = [
    "round", "prompt_id", "sample_id", "prompt", "prompt_text", "output",
    "num_output_tokens", "finish_reason", "generator", "seed",
]


class Generation(NamedTuple):
    texts: list[str]  # prompts after the chat template
    completions: list[list[Completion]]
    backend: str
    model: object | None  # the transformers model when backend is hf, for reuse (evaluate)


class Completion(NamedTuple):
    text: str
    num_tokens: int
    finish_reason: str  # "stop" or "length"


def check_decoding(temperature: float, num_samples: int) -> None:
    """Refuse greedy decoding with several samples (they would all be the same text)."""
    if temperature == 0 and num_samples > 1:
        raise ValueError(f"greedy decoding (temperature 0) gives {num_samples} identical samples; use num_samples 1")


def cut_at_stop(text: str, stop) -> str | None:
    """Text before the earliest stop string, or None when there is none."""
    positions = [text.find(s) for s in stop if s and s in text]
    return text[: min(positions)] if positions else None


def select_backend(requested: str) -> str:
    """'vllm' or 'hf'; auto prefers vLLM when it is importable and a GPU is visible."""
    if requested == "hf":
        return "hf"
    has_vllm = importlib.util.find_spec("vllm") is not None
    if requested == "vllm":
        if not has_vllm:
            raise ValueError("sampling.backend is 'vllm' but vllm is not importable by this Python "
                             f"({sys.executable}); build .venv-vllm with `make vllm` (docs/cluster.md), "
                             "or use backend 'hf' or 'auto'")
        return "vllm"
    import torch

    chosen = "vllm" if has_vllm and torch.cuda.is_available() else "hf"
    log.info("sampling.backend auto: chose %s (vllm importable: %s, GPU visible: %s)", chosen, has_vllm,
             torch.cuda.is_available())
    return chosen


def hf_dtype(dtype: str):
    """sampling.dtype as the torch dtype the transformers backend loads (auto: float32)."""
    import torch

    return torch.float32 if dtype == "auto" else getattr(torch, dtype)


def generate(checkpoint: str, prompts: list[list[dict]], decoding: dict, config: dict, seed: int,
             progress: str | None = None) -> Generation:
    """Render prompts with the checkpoint's chat template and sample from it.

    ``decoding``: num_samples, temperature, top_p, max_new_tokens, stop.
    """
    backend = select_backend(config["sampling"]["backend"])
    from iteralign.modeling import default_device, load_causal_lm, load_tokenizer, render_prompt

    trust = config["policy"]["trust_remote_code"]
    tokenizer = load_tokenizer(checkpoint, trust, padding_side="left")
    texts = [render_prompt(tokenizer, p) for p in prompts]
    if backend == "vllm":
        from iteralign.sample import vllm as vllm_backend

        completions = vllm_backend.generate(checkpoint, tokenizer, texts, decoding, config, seed)
        return Generation(texts, completions, backend, None)
    from iteralign.sample import hf

    model = load_causal_lm(checkpoint, trust, dtype=hf_dtype(config["sampling"]["dtype"]), device=default_device())
    completions = hf.generate(
        model, tokenizer, texts, decoding["num_samples"], decoding["temperature"], decoding["top_p"],
        decoding["max_new_tokens"], config["sampling"]["batch_size"], seed, decoding.get("stop", ()),
        progress=progress,
    )
    return Generation(texts, completions, backend, model)


def sample_frame(round_n: int, prompt_ids, prompts, texts, completions, generator: str, seed: int):
    import pandas as pd

    rows = []
    for pid, prompt, text, outs in zip(prompt_ids, prompts, texts, completions, strict=True):
        for sample_id, c in enumerate(outs):
            rows.append({
                "round": round_n, "prompt_id": pid, "sample_id": sample_id, "prompt": prompt,
                "prompt_text": text, "output": c.text, "num_output_tokens": c.num_tokens,
                "finish_reason": c.finish_reason, "generator": generator, "seed": seed,
            })
    return pd.DataFrame.from_records(rows, columns=SAMPLE_COLUMNS)
