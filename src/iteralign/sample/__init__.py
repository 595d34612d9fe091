"""Sampling k completions per prompt from a checkpoint, with either backend.

Both backends return the same thing (a list of :class:`Completion` per prompt),
and :func:`sample_frame` turns that into the rows of ``samples_r{n}.parquet``.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import NamedTuple

from iteralign.errors import UserError

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
        raise UserError(f"greedy decoding (temperature 0) gives {num_samples} identical samples; use num_samples 1")


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
            raise UserError("sampling.backend is 'vllm' but vllm is not importable by this Python "
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


def unencodable_characters(tokenizer, text: str) -> list[str]:
    """The characters of ``text`` the tokenizer cannot encode (it fails on them or maps them to its unknown token)."""
    unk = tokenizer.unk_token_id
    bad = []
    for char in sorted(set(text)):
        try:
            ids = tokenizer(char, add_special_tokens=False).input_ids
        except Exception:  # noqa: BLE001 (tokenizers raise a bare Exception for a missing vocabulary entry)
            bad.append(char)
            continue
        if unk is not None and unk in ids:
            bad.append(char)
    return bad


def encode_prompt(tokenizer, text: str, prompt: list[dict], where: str) -> list[int]:
    """Token ids of a rendered prompt; UserError naming ``where`` and the characters when some cannot be encoded."""
    try:
        ids = tokenizer(text, add_special_tokens=False).input_ids
    except Exception:  # noqa: BLE001 (see unencodable_characters)
        ids = None
    unk = tokenizer.unk_token_id
    if ids is None or (unk is not None and unk in ids):
        chars = unencodable_characters(tokenizer, " ".join(m["content"] for m in prompt)) or ["?"]
        raise UserError(f"{where}: characters {chars} cannot be encoded by the policy's tokenizer; "
                        "expected text its vocabulary covers",
                        hint="replace or remove them in the prompt source and plan again")
    return ids


def fit_prompts(tokenizer, texts: list[str], prompts: list[list[dict]], where: list[str], room: int | None,
                mode: str) -> list[str]:
    """Check every prompt encodes and fits ``room`` tokens (None: any length); ``mode``
    (sampling.long_prompts) says whether a longer one is an error or truncated to its last tokens."""
    fitted = []
    for text, prompt, name in zip(texts, prompts, where, strict=True):
        ids = encode_prompt(tokenizer, text, prompt, name)
        if room is None or len(ids) <= room:
            fitted.append(text)
        elif mode == "truncate":
            log.warning("%s: prompt of %d tokens truncated to its last %d (sampling.long_prompts: truncate)",
                        name, len(ids), room)
            fitted.append(tokenizer.decode(ids[-room:]))
        else:
            raise UserError(f"{name}: prompt of {len(ids)} tokens leaves no room: the policy's context is "
                            f"{room} tokens after max_new_tokens; expected at most {room}",
                            hint="shorten the prompt, or set sampling.long_prompts: truncate")
    return fitted


def prompt_room(checkpoint: str, max_new_tokens: int) -> int | None:
    """Tokens a prompt may have: the checkpoint's max_position_embeddings minus max_new_tokens (None: unknown)."""
    import json
    from pathlib import Path

    config_file = Path(checkpoint) / "config.json"
    context = json.loads(config_file.read_text()).get("max_position_embeddings") if config_file.exists() else None
    return max(1, context - max_new_tokens) if isinstance(context, int) else None


def check_planned_prompts(checkpoint: str, plan, config: dict, source: str) -> None:
    """Every planned prompt encodes with ``checkpoint``'s tokenizer and fits its context (as sample will check).

    For ``plan`` when the policy is a linked SFT checkpoint: its tokenizer is known before any job runs.
    """
    from iteralign.modeling import load_tokenizer, render_prompt
    from iteralign.prompts import messages_from_cell

    tokenizer = load_tokenizer(checkpoint, config["policy"]["trust_remote_code"], padding_side="left")
    prompts = [messages_from_cell(p) for p in plan["prompt"]]
    texts = [render_prompt(tokenizer, p) for p in prompts]
    where = [f"{source}: prompt_id {pid}" for pid in plan["prompt_id"]]
    max_new_tokens = max(config["sampling"]["max_new_tokens"], config["evaluation"]["max_new_tokens"])
    fit_prompts(tokenizer, texts, prompts, where, prompt_room(checkpoint, max_new_tokens),
                config["sampling"]["long_prompts"])


def generate(checkpoint: str, prompts: list[list[dict]], decoding: dict, config: dict, seed: int,
             progress: str | None = None, prompt_ids: list[str] | None = None) -> Generation:
    """Render prompts with the checkpoint's chat template and sample from it.

    ``decoding``: num_samples, temperature, top_p, max_new_tokens, stop. Every prompt is
    checked first (:func:`fit_prompts`), named by ``prompt_ids`` (else by position).
    """
    backend = select_backend(config["sampling"]["backend"])
    from iteralign.modeling import default_device, load_causal_lm, load_tokenizer, render_prompt

    trust = config["policy"]["trust_remote_code"]
    tokenizer = load_tokenizer(checkpoint, trust, padding_side="left")
    texts = [render_prompt(tokenizer, p) for p in prompts]
    where = [f"prompt_id {pid}" for pid in prompt_ids] if prompt_ids else [f"prompt {i}" for i in range(len(prompts))]
    texts = fit_prompts(tokenizer, texts, prompts, where, prompt_room(checkpoint, decoding["max_new_tokens"]),
                        config["sampling"]["long_prompts"])
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
