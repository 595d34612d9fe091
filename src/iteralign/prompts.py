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


# ShareGPT's speakers (`conversations: [{from, value}]`) and the role each one is.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "model": "assistant"}


def _message(message: Any, index: int, where: str) -> dict[str, str]:
    """One message as {role, content}: an OpenAI-style {role, content} or a ShareGPT {from, value}."""
    if isinstance(message, dict) and "role" not in message and {"from", "value"} <= set(message):
        speaker = message["from"]
        if speaker not in SHAREGPT_ROLES:
            raise PromptError(f"{where}: message {index} is from {speaker!r}; expected one of {sorted(SHAREGPT_ROLES)}")
        message = {"role": SHAREGPT_ROLES[speaker], "content": message["value"]}
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise PromptError(f"{where}: message {index} is {message!r:.80}; expected {{role, content}} or {{from, value}}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise PromptError(f"{where}: message {index} has role {role!r}; expected one of {ROLES}")
    if not isinstance(content, str) or not content.strip():
        raise PromptError(f"{where}: message {index} has empty or non-text content {content!r:.80}")
    return {"role": str(role), "content": content}


def message_list(value: Any, where: str) -> list[dict[str, str]]:
    """A prompt cell (string, or list of messages) as a list of {role, content}, in any role order."""
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
    return [_message(message, i, where) for i, message in enumerate(value)]


def canonical_messages(value: Any, where: str) -> list[dict[str, str]]:
    """Turn a prompt cell (string or list of messages) into a list of {role, content} ending with a user turn.

    ``where`` names the file and row for error messages.
    """
    messages = message_list(value, where)
    if messages[-1]["role"] == "assistant":
        raise PromptError(f"{where}: the last message is from the assistant; a prompt must end with a user turn")
    return messages


def source_prompt(value: Any, where: str, drop_final_assistant: bool) -> list[dict[str, str]]:
    """A prompt source's cell as a prompt; a conversation ending with the assistant's answer
    (SFT and preference data) loses that turn only when prompts.drop_final_assistant is set."""
    messages = message_list(value, where)
    if messages[-1]["role"] == "assistant":
        if not drop_final_assistant:
            raise PromptError(
                f"{where}: the last message is the assistant's answer; set prompts.drop_final_assistant: true "
                "to prompt with the turns before it"
            )
        messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            found = messages[-1]["role"] if messages else "nothing"
            raise PromptError(
                f"{where}: without its final assistant turn the conversation ends with {found}; "
                "expected a user turn"
            )
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


def _records_file(path: Path) -> list:
    """The records of a .parquet, .jsonl or .json file (a list of whatever each row is)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    if suffix == ".jsonl":
        from iteralign.artifacts import read_jsonl

        try:
            return read_jsonl(path)
        except ValueError as exc:  # a line that is not JSON, named
            raise PromptError(str(exc)) from None
    rows = json.loads(path.read_text())
    if not isinstance(rows, list):
        raise PromptError(f"{path}: expected a JSON array of records, found {type(rows).__name__}")
    return rows


def _arrow_table(path: Path):
    """An .arrow file as a pyarrow Table: the IPC stream format `datasets` writes, or the IPC file format."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()


def _saved_dataset(path: Path, split: str | None):
    """A folder written by `datasets`' save_to_disk: a Dataset, or one split (prompts.split) of a DatasetDict."""
    if not any((path / name).is_file() for name in ("dataset_dict.json", "state.json")):
        raise PromptError(
            f"prompt source {path} is a folder without dataset_dict.json or state.json; expected a folder "
            "written by datasets' save_to_disk"
        )
    try:
        import datasets
    except ImportError:
        raise PromptError(
            f"prompt source {path} is a datasets folder, and reading it needs the `datasets` package: "
            "pip install -e '.[data]' (make install does)"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            found = f"found {split!r}" if split else "it is not set"
            raise PromptError(
                f"prompt source {path} is a DatasetDict: prompts.split must name one of its splits "
                f"{sorted(loaded)}; {found}"
            )
        return loaded[split], f"{path} split {split}"
    if split is not None and str(loaded.split) != split:
        raise PromptError(
            f"prompt source {path} is a single Dataset of split {str(loaded.split)!r}; found prompts.split={split!r} "
            "(remove it, or name that split)"
        )
    return loaded, str(path)


def _columnar_cells(path: Path, field: str, split: str | None) -> tuple[list, str]:
    """The field's cells of a datasets folder or .arrow file, and the name its rows are reported under."""
    if path.is_dir():
        dataset, name = _saved_dataset(path, split)
        table = dataset.with_format("arrow")[:]
    else:
        table, name = _arrow_table(path), str(path)
    if field not in table.column_names:
        raise PromptError(f"{name}: field {field!r} is missing (prompts.field); found fields {sorted(table.column_names)}")
    return table.column(field).to_pylist(), name


def read_source_rows(source: str, field: str, split: str | None = None) -> list[tuple[str, Any]]:
    """Read raw prompt cells from a file or datasets folder; returns (where, value) tuples.

    ``where`` names the file (and split), the row and the field for error messages.
    """
    path = Path(source)
    if not path.exists():
        raise PromptError(f"prompt source {path} does not exist (prompts.source)")
    suffix = path.suffix.lower()
    if not path.is_dir() and suffix not in (".parquet", ".jsonl", ".json", ".arrow"):
        raise PromptError(
            f"prompt source {path}: unknown file type {suffix!r}; expected .parquet, .jsonl, .json, .arrow "
            "or a folder written by datasets' save_to_disk"
        )
    try:
        if path.is_dir() or suffix == ".arrow":
            cells, name = _columnar_cells(path, field, split)
            return [(f"{name} row {i}, field {field!r}", cell) for i, cell in enumerate(cells)]
        rows = _records_file(path)
    except PromptError:
        raise
    except Exception as exc:  # a corrupt file: name it
        reason = " ".join(str(exc).split())  # one line, whatever the reader said
        raise PromptError(f"prompt source {path} could not be read: {type(exc).__name__}: {reason}") from exc
    out = []
    for i, row in enumerate(rows):
        where = f"{path} row {i}" if suffix != ".jsonl" else f"{path} record {i}"
        if not isinstance(row, dict):
            raise PromptError(f"{where}: expected a record, found {type(row).__name__}")
        if field not in row:
            raise PromptError(f"{where}: field {field!r} is missing (prompts.field); found fields {sorted(row)}")
        out.append((f"{where}, field {field!r}", row[field]))
    return out


def load_prompts(config: dict) -> list[list[dict[str, str]]]:
    """All prompts of the configured source, canonical, duplicates removed (first kept)."""
    cfg = config["prompts"]
    source = cfg["source"]
    if source.startswith("demo:"):
        from iteralign import demo

        raw = [(f"{source} #{i}", p) for i, p in enumerate(demo.generate_prompts(source, cfg["num_generated"], config["seed"]))]
    else:
        raw = read_source_rows(source, cfg["field"], cfg["split"])
    seen, prompts = set(), []
    for where, value in raw:
        messages = source_prompt(value, where, cfg["drop_final_assistant"])
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


def fewer_rounds_note(config: dict, rounds: int) -> str | None:
    """One line saying that the prompts allow fewer rounds than ``rounds:`` asks (None when they do not)."""
    if rounds >= config["rounds"]:
        return None
    cfg = config["prompts"]
    return (
        f"rounds: {config['rounds']} asked, but {cfg['source']} has training prompts for {rounds} "
        f"(prompts.per_round {cfg['per_round']}, evaluation.num_prompts {config['evaluation']['num_prompts']} "
        f"held out): the workflow has {rounds} round{'s' if rounds != 1 else ''}"
    )


def planned_rounds(config: dict) -> int:
    """Number of rounds this config plans (used by the Snakefile to build the DAG)."""
    return num_rounds(len(load_prompts(config)), config)
