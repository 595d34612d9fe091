"""Inputs from outside ``results/<exp>``, judged by content: one content stamp per input.

The user's SFT checkpoint, reward-model folders, prompt file and SFT data live
outside the experiment. Snakemake judges inputs by modification time, so touching
such a folder would re-plan every job that reads it although nothing changed. The
rules read a stamp instead: ``results/<exp>/inputs/<config key>.json`` holds the
input's path and content hash, and it is rewritten (its modification time moving)
only when that hash changes. :func:`write_stamps` runs when the workflow is
parsed; a hidden cache beside each stamp keeps every file's hash, so only files
whose size or modification time changed are read again. ``iteralign audit``
compares each stamp with the input's content now (:func:`changed_inputs`), so the
audit and Snakemake agree on what changed.
"""

from __future__ import annotations

import json
from pathlib import Path

from iteralign.artifacts import atomic_path, cached_content_sha256
from iteralign.errors import UserError

STAMPS = "inputs"  # results/<exp>/inputs/


class ExternalInputError(UserError):
    """A configured input path that does not exist."""


def external_inputs(config: dict) -> dict[str, str]:
    """Config key -> path of every input outside the experiment that the config names."""
    found = {}
    if config["policy"].get("sft_checkpoint"):
        found["policy.sft_checkpoint"] = config["policy"]["sft_checkpoint"]
    for key, section in (("scoring", config["scoring"]), ("evaluation.scorer", config["evaluation"].get("scorer"))):
        if section and section.get("scorer") == "reward_model" and section.get("reward_model", {}).get("path"):
            found[f"{key}.reward_model.path"] = section["reward_model"]["path"]
    if not config["prompts"]["source"].startswith("demo:"):
        found["prompts.source"] = config["prompts"]["source"]
    if not config["sft"]["data"].startswith("demo:"):
        found["sft.data"] = config["sft"]["data"]
    return found


def stamp_path(results: str | Path, key: str) -> Path:
    return Path(results) / STAMPS / f"{key}.json"


def _cache_path(stamp: Path) -> Path:
    return stamp.with_name(f".{stamp.name}.files")


def content_record(key: str, source: str | Path, stamp: Path) -> dict:
    """What a stamp holds: the config key, the input's resolved path and its content hash."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ExternalInputError(f"{key}: {source} does not exist; expected the file or folder to read")
    return {"key": key, "path": str(path.resolve()), "sha256": cached_content_sha256(path, _cache_path(stamp))}


def write_stamp(key: str, source: str | Path, stamp: str | Path) -> Path:
    """Write ``stamp`` for ``source`` unless it already records the same content; returns its path."""
    stamp = Path(stamp)
    record = content_record(key, source, stamp)
    if read_stamp(stamp) != record:
        with atomic_path(stamp) as tmp:
            tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return stamp


def read_stamp(stamp: str | Path) -> dict | None:
    stamp = Path(stamp)
    try:
        return json.loads(stamp.read_text()) if stamp.is_file() else None
    except json.JSONDecodeError:
        return None


def write_stamps(config: dict, results: str | Path) -> dict[str, str]:
    """Stamp every external input of ``config``; config key -> stamp path (the rules' inputs)."""
    return {key: str(write_stamp(key, source, stamp_path(results, key)))
            for key, source in external_inputs(config).items()}


def changed_inputs(results: str | Path) -> list[tuple[str, str]]:
    """(stamp, message) for every stamped input whose content differs from its stamp now."""
    folder = Path(results) / STAMPS
    changed = []
    for stamp in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        recorded = read_stamp(stamp)
        if not recorded:
            continue
        try:
            now = content_record(recorded["key"], recorded["path"], stamp)
        except ExternalInputError:
            changed.append((str(stamp), f"{recorded['key']}: {recorded['path']} no longer exists"))
            continue
        if now["sha256"] != recorded["sha256"]:
            changed.append((str(stamp), f"{recorded['key']}: the content of {recorded['path']} changed since the "
                                        f"last run (sha256 {recorded['sha256'][:12]} -> {now['sha256'][:12]}); "
                                        "the next run re-runs what reads it"))
    return changed
