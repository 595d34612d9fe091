"""The last good version of every artefact, kept by hard links, and put back after a failed run.

Snakemake deletes a job's outputs before it runs the job, so a re-run that fails
would leave no version of them at all. When a run starts (the Snakefile's
``onstart``), :func:`keep_last_good` hard-links every complete artefact of
``results/<exp>`` into ``results/<exp>/.last-good/``. Artefacts are always
written under a new name and renamed into place (:mod:`iteralign.artifacts`), so
a link keeps the old content when a job replaces or deletes a file, and costs no
copy of a multi-GB checkpoint. When a run fails (``onerror``), :func:`restore`
puts back what that run removed and did not rebuild, and says which;
``iteralign restore results/<exp>`` does the same by hand (after a killed run,
for instance) for every artefact the store holds that is missing.

Nothing present is ever replaced: an output the run did rebuild is newer and
stays. A restored file keeps its old modification time (it is the same inode),
and so does a checkpoint folder's ``.snakemake_timestamp``, so Snakemake still
sees it as older than whatever made it out of date and plans it again.
Checkpoints deleted by retention (``ckpt_r{n}/pruned.json``) are dropped from the
store and never restored.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from iteralign.artifacts import NOT_CONTENT, atomic_path, lock_experiment, remove_stale_tmp
from iteralign.retention import was_pruned

STORE = ".last-good"
RUN_MANIFEST = "run.json"  # the artefacts present when the last run started


class StoreUnavailable(OSError):
    """The file system refuses hard links (the store would need copies, which it never makes)."""


def artefact_units(results: Path) -> list[str]:
    """Relative paths of the complete artefacts of ``results``: its files, and the files
    and folders (e.g. ``ckpt_r1/FINAL``) of its sub-folders; hidden entries (temporaries,
    the store, the lock) left out."""
    units = []
    for entry in sorted(results.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            units += [f"{entry.name}/{child.name}" for child in sorted(entry.iterdir())
                      if not child.name.startswith(".")]
        else:
            units.append(entry.name)
    return units


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _link_tree(source: Path, target: Path) -> None:
    """``target`` becomes ``source`` made of hard links (symbolic links copied as links)."""
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        target.mkdir()
        for child in source.iterdir():
            if not child.name.startswith(".") or child.name in NOT_CONTENT:
                _link_tree(child, target / child.name)
        shutil.copystat(source, target)
    else:
        try:
            os.link(source, target)
        except OSError as exc:
            raise StoreUnavailable(f"{source}: cannot hard-link into the last-good store ({exc})") from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif _present(path):
        path.unlink()


def _place(source: Path, target: Path) -> None:
    """Put a hard-linked copy of ``source`` at ``target``, built aside and renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        _link_tree(source, tmp)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.is_file() and not a.is_symlink() and os.path.samefile(a, b)
    except OSError:
        return False


def keep_last_good(results: str | Path) -> list[str]:
    """Link every complete artefact of ``results`` into its store; returns the artefacts kept.

    Store entries whose artefact is missing now stay (a killed run may have taken
    it), except checkpoints that retention deleted.
    """
    results = Path(results)
    store = results / STORE
    units = artefact_units(results) if results.is_dir() else []
    for unit in units:
        if not _same_file(store / unit, results / unit):
            _place(results / unit, store / unit)
    for unit in artefact_units(store) if store.is_dir() else []:
        if unit != RUN_MANIFEST and was_pruned(results / unit):
            _remove(store / unit)
    if store.is_dir():
        with atomic_path(store / RUN_MANIFEST) as tmp:
            tmp.write_text(json.dumps({"artefacts": units, "pid": os.getpid()}, indent=1) + "\n")
    return units


def restore(results: str | Path, only_last_run: bool = False) -> list[str]:
    """Put back every stored artefact that is missing from ``results`` (with ``only_last_run``:
    only those present when the last run started); returns what was put back."""
    results = Path(results)
    store = results / STORE
    if not store.is_dir():
        return []
    stored = [u for u in artefact_units(store) if u != RUN_MANIFEST]
    if only_last_run:
        manifest = store / RUN_MANIFEST
        started_with = set(json.loads(manifest.read_text())["artefacts"]) if manifest.is_file() else set()
        stored = [u for u in stored if u in started_with]
    restored = []
    for unit in stored:
        target = results / unit
        if _present(target) or was_pruned(target):
            continue
        _place(store / unit, target)
        restored.append(unit)
    return restored


def restored_message(results: str | Path, restored: list[str]) -> str:
    """What a failed run's handler says: which artefacts are back, and the command for the rest."""
    results = Path(results)
    if not restored:
        return (f"iteralign: every artefact of {results} that existed before this run is still in place "
                f"(the last good versions stay in {results / STORE})")
    names = ", ".join(str(results / unit) for unit in restored)
    return (f"iteralign: the failed run had removed {len(restored)} artefact(s) without rebuilding them; their last "
            f"good version is back in place, with its old modification time: {names}. "
            f"Put back the last good version of anything missing at any time: iteralign restore {results}")


def start_run(results: str | Path) -> None:
    """The ``onstart`` handler: take the experiment's lock (ExperimentInUse when another run holds
    it), then keep the last good version of its artefacts; a file system without hard links
    only costs this run its protection, said on stderr."""
    lock_experiment(results)
    try:
        keep_last_good(results)
    except OSError as exc:
        print(f"iteralign: no last-good store for this run: {exc}", file=sys.stderr)


def report_failed_run(results: str | Path) -> list[str]:
    """The ``onerror`` handler: restore what the failed run took, and say so on stderr."""
    restored = restore(results, only_last_run=True)
    print(restored_message(results, restored), file=sys.stderr)
    return restored
