"""Deleting policy checkpoints that no job reads any more (``checkpoints.keep_last``).

The ``prune_checkpoint`` rule calls :func:`prune_checkpoint` for round n once round n
was evaluated and round n + keep_last finished training (its ``train_r{n+K}.jsonl``
exists) and the checkpoints of rounds n+1 .. n+keep_last are whole (or were deleted the
same way): from then on no job of the experiment reads ``ckpt_r{n}/FINAL``. What is
deleted is checked here again, whoever calls it: only a policy checkpoint of a round
n >= 1 that lies inside ``results/<exp>``, is a real folder written by
``iteralign train``, and is not the user's SFT checkpoint. ``ckpt_r0`` is never
deleted, and a symbolic link (link_sft's link to a user's SFT checkpoint) is never
followed. The folder's ``FINAL.meta.json`` stays, and ``ckpt_r{n}/pruned.json``
records what was deleted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from iteralign import layout
from iteralign.artifacts import read_sidecar, sidecar_path
from iteralign.config import experiment_dir
from iteralign.errors import UserError

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"  # written by iteralign train into every policy checkpoint


class RetentionError(UserError):
    """A request to delete something that retention must never delete."""


def expected_checkpoint(config: dict, round_n: int) -> Path:
    """``results/<exp>/ckpt_r{n}/FINAL`` as an absolute path (its parent resolved, not the folder)."""
    return experiment_dir(config).resolve() / layout.checkpoint(round_n)


def _lexical(path: Path) -> Path:
    """Absolute path with the parent's links resolved but the last component left as it is."""
    path = Path(path).absolute()
    return Path(os.path.realpath(path.parent)) / path.name


def _check_request(config: dict, round_n: int, checkpoint: Path) -> Path:
    keep = config["checkpoints"]["keep_last"]
    if keep is None:
        raise RetentionError("checkpoints.keep_last is null (keep every checkpoint): nothing may be deleted")
    if round_n < 1:
        raise RetentionError(f"round {round_n}: ckpt_r0 is the SFT reference and is never deleted")
    expected = expected_checkpoint(config, round_n)
    if _lexical(checkpoint) != expected:
        raise RetentionError(f"{checkpoint} is not round {round_n}'s policy checkpoint of this experiment; "
                             f"only {expected} may be deleted")
    trained = experiment_dir(config).resolve() / layout.training_metrics(round_n + keep)
    if not trained.exists():
        raise RetentionError(f"{checkpoint}: round {round_n + keep} has not finished training ({trained} is "
                             f"missing); with keep_last {keep} the checkpoint is still needed")
    for later in range(round_n + 1, round_n + keep + 1):
        successor = expected_checkpoint(config, later)
        if not (checkpoint_is_complete(successor, later) or was_pruned(successor) or being_pruned(successor)):
            raise RetentionError(f"{checkpoint}: round {later}'s checkpoint {successor} is not complete (missing, "
                                 f"or without {TRAINER_STATE} of round {later} and its FINAL.meta.json); "
                                 "a checkpoint is deleted only once the checkpoints after it are whole")
    return expected


def checkpoint_is_complete(folder: Path, round_n: int) -> bool:
    """Whether ``folder`` is a whole policy checkpoint of round n as `iteralign train` renames it
    into place: a real folder with weights, trainer_state.json of that round and its sidecar."""
    folder = Path(folder)
    state_file = folder / TRAINER_STATE
    if folder.is_symlink() or not state_file.is_file() or not sidecar_path(folder).is_file():
        return False
    if not any(folder.glob("*.safetensors")):
        return False
    try:
        return json.loads(state_file.read_text()).get("round") == round_n
    except json.JSONDecodeError:
        return False


def was_pruned(folder: Path) -> bool:
    """Whether retention deleted ``folder`` (ckpt_r{n}/FINAL): its pruned.json says so and it is gone."""
    record = Path(folder).parent / layout.PRUNED_RECORD
    if Path(folder).exists() or not record.is_file():
        return False
    try:
        return json.loads(record.read_text()).get("deleted") is True
    except json.JSONDecodeError:
        return False


def being_pruned(folder: Path) -> bool:
    """Whether a prune of ``folder`` is under way (or was killed) in another process: the folder is
    gone and its renamed copy, deleted next, is there; its pruned.json follows when it finishes."""
    folder = Path(folder)
    return not folder.exists() and any(_pruning_copies(folder))


def retrain_note(config: dict, round_n: int) -> str:
    """The train job's message when the checkpoint it writes was deleted by retention (else empty):
    a dry run then says plainly that an earlier round is re-trained."""
    if not was_pruned(experiment_dir(config) / layout.checkpoint(round_n)):
        return ""
    keep, record = config["checkpoints"]["keep_last"], experiment_dir(config) / layout.pruned_record(round_n)
    return (f"train round {round_n} AGAIN: {layout.checkpoint(round_n)} was deleted by checkpoints.keep_last "
            f"({keep}; see {record}) and a later round needs it, so round {round_n} is re-trained from "
            f"{layout.checkpoint_round(round_n - 1)} and every job that reads its checkpoint runs again. "
            "Keep it next time with a larger checkpoints.keep_last, or null.")


def _check_folder(config: dict, round_n: int, folder: Path) -> None:
    if folder.is_symlink():
        raise RetentionError(f"{folder} is a symbolic link (to {os.readlink(folder)}); retention never deletes "
                             "through links")
    sft = config["policy"]["sft_checkpoint"]
    if sft:
        sft_path, real = Path(sft).expanduser().resolve(), folder.resolve()
        if real == sft_path or sft_path in real.parents or real in sft_path.parents:
            raise RetentionError(f"{folder} is or holds the SFT checkpoint {sft_path}; it is never deleted")
    state_file = folder / TRAINER_STATE
    if not state_file.is_file():
        raise RetentionError(f"{folder} has no {TRAINER_STATE}: not a policy checkpoint written by "
                             "`iteralign train`, so it is not deleted")
    state = json.loads(state_file.read_text())
    if state.get("round") != round_n:
        raise RetentionError(f"{state_file}: round {state.get('round')!r}, expected {round_n}")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _remove_stale(folder: Path) -> None:
    """Remove what a killed earlier prune of ``folder`` left behind."""
    for stale in _pruning_copies(folder):
        shutil.rmtree(stale)


def _pruning_copies(folder: Path):
    """The renamed copies of ``folder`` that a prune deletes (:func:`prune_checkpoint`)."""
    return folder.parent.glob(f".{folder.name}.pruning-*")


def _forget_last_good(folder: Path) -> None:
    """Drop the last-good store's links to a deleted checkpoint, so that its space is freed now."""
    from iteralign.last_good import STORE

    experiment = folder.parent.parent
    stored = experiment / STORE / folder.relative_to(experiment)
    if stored.is_dir() and not stored.is_symlink():
        shutil.rmtree(stored)


def prune_checkpoint(config: dict, round_n: int, checkpoint: str | Path) -> dict:
    """Delete round n's policy checkpoint when that is safe; returns what was done (pruned.json).

    Raises :class:`RetentionError` (naming the path, what was found and what was
    expected) for anything retention must not delete.
    """
    folder = _check_request(config, round_n, Path(checkpoint))
    _remove_stale(folder)
    record = {"round": round_n, "checkpoint": str(folder), "keep_last": config["checkpoints"]["keep_last"]}
    if not folder.exists() and not folder.is_symlink():
        if was_pruned(folder):  # deleted by an earlier prune: keep what that one recorded
            log.info("round %d: %s was deleted by an earlier prune", round_n, folder)
            return json.loads((folder.parent / layout.PRUNED_RECORD).read_text())
        log.info("round %d: %s is already absent", round_n, folder)
        return {**record, "deleted": False, "bytes_freed": 0}
    _check_folder(config, round_n, folder)
    meta = read_sidecar(folder) or {}
    size = _folder_bytes(folder)
    # Renamed first: a prune killed half-way never leaves a FINAL that looks whole.
    doomed = folder.with_name(f".{folder.name}.pruning-{os.getpid()}")
    folder.rename(doomed)
    shutil.rmtree(doomed)
    _forget_last_good(folder)
    log.info("round %d: deleted %s (%.1f MB)", round_n, folder, size / 1e6)
    return {**record, "deleted": True, "bytes_freed": size, "sha256": meta.get("sha256")}
