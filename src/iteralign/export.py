"""``iteralign export``: an experiment's feedback as datasets for other trainers.

``--format trl`` writes TRL's conversational dataset types as parquet, one file per
round (``feedback_r{n}.parquet``) and one for every round (``all_rounds.parquet``;
``feedback_r*.parquet`` together hold the same rows):

- pairwise feedback -> *preference*: ``prompt``, ``chosen``, ``rejected`` (DPOTrainer,
  ORPOTrainer, ...), plus ``score_chosen``, ``score_rejected``;
- binary feedback -> *unpaired preference*: ``prompt``, ``completion``, ``label``
  (bool, KTOTrainer), plus ``reward``.

``prompt`` is the list of {role, content} messages; ``chosen``, ``rejected`` and
``completion`` are lists with one assistant message. Every row also has ``prompt_id``
and ``round``. A round without feedback gives a file with the columns and no rows
(``datasets`` reads it along with other files, not alone). Scalar feedback has no TRL
dataset type and is refused. The feedback files themselves are HALOs' format already.
"""

from __future__ import annotations

from pathlib import Path

from iteralign.errors import UserError

FORMATS = ("trl",)
ALL_ROUNDS = "all_rounds.parquet"


class ExportError(UserError):
    """Feedback that cannot become the asked format."""


def _messages_type():
    import pyarrow as pa

    return pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def trl_schema(kind: str):
    """The parquet schema of TRL's dataset type for a feedback type."""
    import pyarrow as pa

    messages = _messages_type()
    columns = [("prompt", messages)]
    if kind == "pairwise_feedback":
        columns += [("chosen", messages), ("rejected", messages), ("score_chosen", pa.float64()),
                    ("score_rejected", pa.float64())]
    else:
        columns += [("completion", messages), ("label", pa.bool_()), ("reward", pa.float64())]
    return pa.schema(columns + [("prompt_id", pa.string()), ("round", pa.int64())])


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def trl_row(item: dict, round_n: int) -> dict:
    """One feedback item (as ``load_feedback`` returns it) as a row of TRL's dataset type."""
    row = {"prompt": item["prompt"], "prompt_id": item["prompt_id"], "round": int(item.get("round", round_n))}
    if item["type"] == "pairwise_feedback":
        a_wins = item["label"] == 1
        chosen, rejected = ("A", "B") if a_wins else ("B", "A")
        row.update(chosen=_assistant(item[f"output_{chosen}_text"]), rejected=_assistant(item[f"output_{rejected}_text"]),
                   score_chosen=item.get(f"reward_{chosen}"), score_rejected=item.get(f"reward_{rejected}"))
    else:
        row.update(completion=_assistant(item["output_text"]), label=item["label"] == 1, reward=item.get("reward"))
    return row


def feedback_kind(items: list[dict], path: Path) -> str:
    """The one feedback type of a (non-empty) file; refuses mixed and scalar files."""
    kinds = sorted({item["type"] for item in items})
    if len(kinds) > 1:
        raise ExportError(f"{path}: holds several feedback types {kinds}; a TRL dataset has one type")
    if kinds == ["scalar_feedback"]:
        raise ExportError(f"{path}: scalar_feedback has no TRL dataset type (TRL takes preference pairs or "
                          "binary labels); export pairwise or binary feedback")
    return kinds[0]


def _write(rows: list[dict], kind: str, path: Path, provenance: dict) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from iteralign.artifacts import PROVENANCE_KEY, atomic_path

    schema = trl_schema(kind).with_metadata({PROVENANCE_KEY: json.dumps(provenance, sort_keys=True).encode()})
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        writer.write_table(pa.Table.from_pylist(rows, schema=schema))


def export_trl(results: str | Path, output: str | Path | None = None) -> list[Path]:
    """Write every round's feedback of ``results`` as TRL parquet; returns the files written."""
    from iteralign.artifacts import Provenance, read_provenance
    from iteralign.feedback import load_feedback
    from iteralign.layout import round_files

    results = Path(results)
    if not results.is_dir():
        raise FileNotFoundError(f"{results} is not a folder; expected results/<experiment>")
    files = round_files(results, "feedback", "json")
    if not files:
        raise ExportError(f"{results}: no feedback_r{{n}}.json to export")
    output = Path(output) if output else results / "export" / "trl"
    loaded = [(n, path, load_feedback(path)) for n, path in files]
    kinds = {feedback_kind(items, path) for _, path, items in loaded}  # load_feedback refuses an empty file
    if len(kinds) > 1:
        raise ExportError(f"{results}: rounds hold different feedback types {sorted(kinds)}; "
                          "all_rounds.parquet would mix TRL dataset types")
    kind = kinds.pop()
    recorded = read_provenance(files[0][1]) or {}
    written, every_row = [], []
    for n, path, items in loaded:
        rows = [trl_row(item, n) for item in items]
        every_row += rows
        target = output / f"feedback_r{n}.parquet"
        provenance = Provenance("export", recorded.get("config_hash"), recorded.get("seed"), {"feedback": path})
        _write(rows, kind, target, provenance.record(round=n, format="trl", rows=len(rows)))
        written.append(target)
    provenance = Provenance("export", recorded.get("config_hash"), recorded.get("seed"),
                            {f"feedback_r{n}": path for n, path in files})
    _write(every_row, kind, output / ALL_ROUNDS, provenance.record(format="trl", rows=len(every_row)))
    return written + [output / ALL_ROUNDS]


def export(results: str | Path, fmt: str, output: str | Path | None = None) -> list[Path]:
    if fmt != "trl":
        raise ExportError(f"export: unknown format {fmt!r}; expected one of {list(FORMATS)}")
    return export_trl(results, output)
