"""Prompt sources, canonical messages, prompt ids and the round plan.

A prompt is a list of chat messages ``[{"role": ..., "content": ...}]``. Its
``prompt_id`` is a hash of the canonical JSON of those messages, so the same
prompt has the same id in every file, round and experiment.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from iteralign.errors import UserError

ROLES = ("system", "user", "assistant")


class PromptError(UserError):
    """A prompt source that cannot be read as prompts."""


def canonical_messages(value: Any, where: str) -> list[dict[str, str]]:
    """Turn a prompt cell (string or list of messages) into a list of {role, content}.

    ``where`` names the file and row for error messages.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise PromptError(f"{where}: prompt is missing (null); expected a string or a list of messages")
    if isinstance(value, str):
        if not value.strip():
            raise PromptError(f"{where}: prompt is an empty string; expected non-empty text")
        return [{"role": "user", "content": value}]
    if hasattr(value, "tolist"):  # numpy array from parquet
        value = value.tolist()
    if not isinstance(value, list | tuple) or not value:
        raise PromptError(
            f"{where}: prompt is {type(value).__name__} {value!r:.80}; expected a non-empty string "
            "or a non-empty list of {role, content} messages"
        )
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise PromptError(f"{where}: message {i} is {message!r:.80}; expected {{role, content}}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise PromptError(f"{where}: message {i} has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str) or not content.strip():
            raise PromptError(f"{where}: message {i} has empty or non-text content {content!r:.80}")
        messages.append({"role": str(role), "content": content})
    if messages[-1]["role"] == "assistant":
        raise PromptError(f"{where}: the last message is from the assistant; a prompt must end with a user turn")
    return messages


def messages_from_cell(value: Any) -> list[dict[str, str]]:
    """Messages as stored in our own parquet files (numpy arrays of dicts) -> plain lists."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [{"role": m["role"], "content": m["content"]} for m in value]


def prompt_id(messages: list[dict[str, str]]) -> str:
    canonical = json.dumps(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def read_source_rows(source: str, field: str) -> list[dict[str, str]]:
    """Read raw prompt cells from a file; returns a list of (where, value) tuples."""
    path = Path(source)
    if not path.exists():
        raise PromptError(f"prompt source {path} does not exist (prompts.source)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pandas as pd

            frame = pd.read_parquet(path)
            rows = frame.to_dict("records")
        elif suffix == ".jsonl":
            rows = []
            for line_no, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise PromptError(f"{path}: line {line_no} is not valid JSON ({exc})") from None
        elif suffix == ".json":
            rows = json.loads(path.read_text())
            if not isinstance(rows, list):
                raise PromptError(f"{path}: expected a JSON array of records, found {type(rows).__name__}")
        else:
            raise PromptError(f"prompt source {path}: unknown file type {suffix!r}; expected .parquet, .jsonl or .json")
    except PromptError:
        raise
    except Exception as exc:  # a corrupt file: name it
        raise PromptError(f"prompt source {path} could not be read: {exc}") from exc
    out = []
    for i, row in enumerate(rows):
        where = f"{path} row {i}" if suffix != ".jsonl" else f"{path} record {i}"
        if not isinstance(row, dict):
            raise PromptError(f"{where}: expected a record, found {type(row).__name__}")
        if field not in row:
            raise PromptError(f"{where}: field {field!r} is missing (prompts.field); found fields {sorted(row)}")
        out.append((where, row[field]))
    return out


def load_prompts(config: dict) -> list[list[dict[str, str]]]:
    """All prompts of the configured source, canonical, duplicates removed (first kept)."""
    cfg = config["prompts"]
    source = cfg["source"]
    if source.startswith("demo:"):
        from iteralign import demo

        raw = [(f"{source} #{i}", p) for i, p in enumerate(demo.generate_prompts(source, cfg["num_generated"], config["seed"]))]
    else:
        raw = read_source_rows(source, cfg["field"])
    seen, prompts = set(), []
    for where, value in raw:
        messages = canonical_messages(value, where)
        pid = prompt_id(messages)
        if pid not in seen:
            seen.add(pid)
            prompts.append(messages)
    return prompts


def num_rounds(num_prompts: int, config: dict) -> int:
    """R = min(rounds asked, ceil(train prompts / per_round)); at least 0."""
    train = num_prompts - config["evaluation"]["num_prompts"]
    if train <= 0:
        raise PromptError(
            f"prompt source {config['prompts']['source']}: {num_prompts} distinct prompts, but "
            f"evaluation.num_prompts={config['evaluation']['num_prompts']} leaves none for training"
        )
    return min(config["rounds"], math.ceil(train / config["prompts"]["per_round"]))


def plan_rounds(prompts: list[list[dict[str, str]]], config: dict):
    """Shuffle once with the seed, hold out the eval split, deal the rest into rounds.

    Returns a DataFrame with prompt_id, prompt, split (train/eval), round (1..R for
    train prompts, null for eval). Prompts beyond R rounds are not used (and not listed).
    """
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(config["seed"])
    order = rng.permutation(len(prompts))
    n_eval = config["evaluation"]["num_prompts"]
    per_round = config["prompts"]["per_round"]
    rounds = num_rounds(len(prompts), config)
    records = []
    for rank, index in enumerate(order):
        messages = prompts[index]
        if rank < n_eval:
            split, rnd = "eval", None
        else:
            rnd = (rank - n_eval) // per_round + 1
            if rnd > rounds:
                break
            split = "train"
        records.append({"prompt_id": prompt_id(messages), "prompt": messages, "split": split, "round": rnd})
    frame = pd.DataFrame.from_records(records)
    frame["round"] = frame["round"].astype("Int64")
    return frame


def planned_rounds(config: dict) -> int:
    """Number of rounds this config plans (used by the Snakefile to build the DAG)."""
    return num_rounds(len(load_prompts(config)), config)
