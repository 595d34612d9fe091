"""``iteralign show <file>``: a few items of an artefact as a person reads them.

Feedback files print each item's prompt, its outputs with their rewards and which
one was preferred; per-sample tables (samples, rewards, eval) print each prompt
once with its completions, rewards and lengths. A rewards file is shown with the
texts of the samples file beside it, and a samples file with the rewards beside it.
"""

from __future__ import annotations

from pathlib import Path

from iteralign import layout
from iteralign.errors import UserError
from iteralign.prompts import messages_from_cell

_INDENT = "    "


def _indent(text: str, prefix: str = _INDENT) -> str:
    return "\n".join(prefix + line for line in (text.splitlines() or [""]))


def _missing(value) -> bool:
    import pandas as pd

    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _number(value) -> str:
    if _missing(value):
        return "NaN"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _messages(prompt) -> str:
    """Each message as its role on one line and its content indented below."""
    lines = []
    for message in messages_from_cell(prompt):
        lines += [f"  {message['role']}:", _indent(message["content"])]
    return "\n".join(lines)


def _output_text(text: str) -> str:
    return _indent(text) if text else _indent("(empty)")


# ---------------------------------------------------------------- feedback
def format_feedback_item(item: dict, index: int) -> str:
    """One feedback item as :func:`iteralign.feedback.load_feedback` returns it: prompt, output(s),
    reward(s), and the label in words."""
    kind = item.get("type", "?")
    head = f"[{index}] {kind}  prompt_id {item.get('prompt_id', '-')}  round {item.get('round', '-')}"
    lines = [head, _messages(item["prompt"])]
    if kind == "pairwise_feedback":
        preferred = "A" if item.get("label") == 1 else "B"
        for side in ("A", "B"):
            mark = "  <- preferred" if side == preferred else ""
            lines.append(f"  {side} (sample {item.get(f'sample_id_{side}', '-')}) "
                         f"reward {_number(item.get(f'reward_{side}'))}{mark}")
            lines.append(_output_text(item[f"output_{side}_text"]))
    else:
        label = {1: "desirable", 0: "undesirable"}.get(item.get("label"), "")
        lines.append(f"  output (sample {item.get('sample_id', '-')}) reward {_number(item.get('reward'))}"
                     + (f"  {label}" if label else ""))
        lines.append(_output_text(item["output_text"]))
    return "\n".join(lines)


def show_feedback(path: Path, n: int, start: int, prompt_id: str | None) -> str:
    from iteralign.feedback import load_feedback

    items = load_feedback(path)  # checks every item and adds the output texts
    chosen = [(i, item) for i, item in enumerate(items) if prompt_id is None or item.get("prompt_id") == prompt_id]
    shown = chosen[start:start + n]
    header = f"{path}: {len(items)} items" + (f", {len(chosen)} for prompt {prompt_id}" if prompt_id else "")
    return "\n\n".join([header + f"; showing {len(shown)} from {start}"]
                       + [format_feedback_item(item, i) for i, item in shown])


# ---------------------------------------------------------------- per-sample tables
def _beside(path: Path, kind: str) -> Path | None:
    """samples_r{n}.parquet <-> rewards_r{n}.parquet in the same folder."""
    parsed = layout.parse_round_file(path.name)
    if parsed is None or parsed[0] not in ("samples", "rewards") or parsed[2] != "parquet":
        return None
    other = path.with_name(layout.round_name(kind, parsed[1], "parquet"))
    return other if other.exists() else None


def _with_texts_and_rewards(frame, path: Path):
    """A per-sample frame that has both the texts and the rewards, joining the file beside it."""
    import pandas as pd

    keys = ["prompt_id", "sample_id"]
    if "output" not in frame.columns and "reward" in frame.columns:
        samples = _beside(path, "samples")
        if samples is None:
            raise UserError(f"{path}: a rewards file has no texts and no samples file is beside it to show them")
        rewards = frame
        frame = pd.read_parquet(samples)
        return frame.merge(rewards.drop(columns=[c for c in rewards.columns if c in frame.columns and c not in keys]),
                           on=keys, how="left")
    if "reward" not in frame.columns:
        rewards_path = _beside(path, "rewards")
        if rewards_path is not None:
            rewards = pd.read_parquet(rewards_path, columns=[*keys, "reward", "error"])
            return frame.merge(rewards, on=keys, how="left")
    return frame


_SAMPLE_FIELDS = ("reward", "eval_scorer_reward", "num_output_tokens", "finish_reason", "policy_logp",
                  "reference_logp", "error", "eval_scorer_error")


def format_prompt_rows(rows, index: int) -> str:
    """One prompt with every completion of it in ``rows`` (a frame of the same prompt_id)."""
    first = rows.iloc[0]
    lines = [f"[{index}] prompt_id {first['prompt_id']}" + (f"  round {first['round']}" if "round" in rows else ""),
             _messages(first["prompt"])]
    for _, row in rows.iterrows():
        name = f"sample {row['sample_id']}" if "sample_id" in rows else "output"
        fields = [f"{f} {_number(row[f])}" for f in _SAMPLE_FIELDS
                  if f in rows and not (f.endswith("error") and _missing(row[f]))]
        lines.append(f"  {name}: " + ", ".join(fields))
        lines.append(_output_text(str(row["output"])))
    return "\n".join(lines)


def show_table(path: Path, n: int, start: int, prompt_id: str | None) -> str:
    import pandas as pd

    frame = _with_texts_and_rewards(pd.read_parquet(path), path)
    if not {"prompt_id", "prompt", "output"} <= set(frame.columns):
        # Not a per-sample table (e.g. reflogps): plain rows.
        rows = frame if prompt_id is None else frame[frame["prompt_id"] == prompt_id]
        return f"{path}: {len(frame)} rows\n" + rows.iloc[start:start + n].to_string()
    order = list(dict.fromkeys(frame["prompt_id"]))  # prompts in file order
    if prompt_id is not None:
        if prompt_id not in order:
            raise UserError(f"{path}: no prompt_id {prompt_id!r} (it holds {len(order)} prompts)")
        order = [prompt_id]
    shown = order[start:start + n]
    groups = frame.groupby("prompt_id", sort=False)
    header = f"{path}: {len(frame)} rows, {len(order)} prompts; showing {len(shown)} prompts from {start}"
    return "\n\n".join([header] + [format_prompt_rows(groups.get_group(pid), start + i)
                                   for i, pid in enumerate(shown)])


def show(path: str | Path, n: int = 5, start: int = 0, prompt_id: str | None = None) -> str:
    """Text for ``iteralign show``: ``n`` items (or prompts) of ``path`` from ``start``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if n < 1 or start < 0:
        raise UserError(f"show: --n must be >= 1 and --start >= 0, found n={n}, start={start}")
    if path.suffix == ".parquet":
        return show_table(path, n, start, prompt_id)
    if path.suffix == ".json":
        return show_feedback(path, n, start, prompt_id)
    raise UserError(f"{path}: show reads feedback .json files and .parquet tables, found {path.suffix!r}")
