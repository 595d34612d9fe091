"""Artefact I/O: atomic writes, provenance metadata, hashing.

Every artefact is written to a temporary name in its own folder and renamed when
complete, so a killed job never leaves a file (or a checkpoint folder) that looks
whole. Provenance goes into parquet key-value metadata, or into a
``<name>.meta.json`` sidecar for JSON files and folders; the sidecar is written
before the artefact is renamed into place.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from iteralign.errors import UserError

PROVENANCE_KEY = b"iteralign"
_HASH_CHUNK = 1 << 20


# ---------------------------------------------------------------- hashing
def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# Files a folder may hold that are not its content: Snakemake writes this one into a
# directory output after its job ends, as the folder's modification time.
NOT_CONTENT = frozenset({".snakemake_timestamp"})


def dir_sha256(path: str | Path) -> str:
    """Hash of a folder: every file's relative path and content, in sorted order
    (files named in :data:`NOT_CONTENT` left out)."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in NOT_CONTENT):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(bytes.fromhex(file_sha256(file)))
    return digest.hexdigest()


def cached_content_sha256(path: str | Path, cache_file: str | Path) -> str:
    """:func:`dir_sha256` of a folder (or :func:`file_sha256` of a file), re-hashing only the
    files whose size or modification time changed since ``cache_file`` recorded them.

    The cache (JSON: relative path -> [size, mtime_ns, sha256]) is rewritten when it changes.
    """
    root, cache_file = Path(path), Path(cache_file)
    try:
        cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    except json.JSONDecodeError:
        cached = {}
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and p.name not in NOT_CONTENT)
    fresh, digest = {}, hashlib.sha256()
    for file in files:
        name = "." if file == root else str(file.relative_to(root))
        stat = file.stat()
        entry = cached.get(name)
        if not (entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns):
            entry = [stat.st_size, stat.st_mtime_ns, file_sha256(file)]
        fresh[name] = entry
        digest.update(name.encode())
        digest.update(bytes.fromhex(entry[2]))
    if fresh != cached:
        with atomic_path(cache_file) as tmp:
            tmp.write_text(json.dumps(fresh) + "\n")
    return fresh["."][2] if root.is_file() else digest.hexdigest()


def artifact_sha256(path: str | Path) -> str:
    """Content hash of a file, or of a folder (taken from its sidecar when one exists)."""
    path = Path(path)
    if path.is_dir():
        meta = read_sidecar(path)
        if meta and meta.get("sha256"):
            return meta["sha256"]
        return dir_sha256(path)
    return file_sha256(path)


# ---------------------------------------------------------------- provenance
def git_commit(folder: str | Path) -> str | None:
    """The commit checked out in the git work tree that holds ``folder``; None outside one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> str | None:
    """The workflow's commit (ITERALIGN_GIT_COMMIT, set by the Snakefile), else this package's."""
    return os.environ.get("ITERALIGN_GIT_COMMIT") or git_commit(Path(__file__).resolve().parent)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class Provenance:
    """Collects what an artefact was made from; call :meth:`record` when writing it."""

    def __init__(self, step: str, config_hash: str, seed: int, inputs: dict[str, str | Path]):
        from iteralign import __version__
        from iteralign.cluster import job_environment

        missing = [f"{p} (input {name})" for name, p in inputs.items() if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(f"{step}: {missing[0]} does not exist")
        self.step = step
        self.started = _now()
        self._t0 = time.monotonic()
        self.base = {
            "step": step,
            "config_hash": config_hash,
            "iteralign_version": __version__,
            "git_commit": _git_commit(),
            "seed": seed,
            "host": socket.gethostname(),
            "job": job_environment(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "inputs": {
                name: {"path": str(p), "sha256": artifact_sha256(p)} for name, p in inputs.items()
            },
        }

    def record(self, **extra: Any) -> dict:
        from iteralign.redaction import redact_tree

        return redact_tree({
            **self.base,
            "started": self.started,
            "finished": _now(),
            "seconds": round(time.monotonic() - self._t0, 3),
            **extra,
        })


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    name = path.name
    for suffix in (".jsonl", ".json", ".parquet"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(name + ".meta.json")


def read_sidecar(path: str | Path) -> dict | None:
    side = sidecar_path(path)
    if not side.exists():
        return None
    return json.loads(side.read_text())


def read_provenance(path: str | Path) -> dict | None:
    """Provenance of any artefact: parquet metadata or the JSON sidecar."""
    path = Path(path)
    if path.suffix == ".parquet" and path.is_file():
        import pyarrow.parquet as pq

        meta = pq.read_schema(path).metadata or {}
        raw = meta.get(PROVENANCE_KEY)
        return json.loads(raw) if raw else None
    return read_sidecar(path)


# ---------------------------------------------------------------- atomic writes
def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale_tmp(path: str | Path) -> None:
    """Remove temporaries a killed writer of ``path`` left behind."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On an exception the temporary is removed and ``path`` is untouched. A folder
    renamed onto an existing empty folder replaces it (POSIX rename semantics).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    tmp = _tmp_name(path)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if is_dir and path.is_dir() and not path.is_symlink():
            if any(path.iterdir()):
                shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _write_sidecar(path: Path, provenance: dict) -> None:
    side = sidecar_path(path)
    with atomic_path(side) as tmp:
        tmp.write_text(json.dumps(provenance, indent=2, sort_keys=True, default=str) + "\n")


def write_json(obj: Any, path: str | Path, provenance: dict | None = None, indent: int = 2) -> None:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=True) + "\n")
        if provenance is not None:
            _write_sidecar(path, {**provenance, "sha256": file_sha256(tmp)})


def write_jsonl(rows: list[dict], path: str | Path, provenance: dict | None = None) -> None:
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        if provenance is not None:
            _write_sidecar(path, {**provenance, "sha256": file_sha256(tmp)})


def write_parquet(frame, path: str | Path, provenance: dict | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if provenance is not None:
        meta = dict(table.schema.metadata or {})
        meta[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True, default=str).encode()
        table = table.replace_schema_metadata(meta)
    with atomic_path(Path(path)) as tmp:
        pq.write_table(table, tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path, provenance: dict | None = None) -> Iterator[Path]:
    """Build a folder under a temporary name; hash it, write its sidecar, rename it."""
    path = Path(path)
    with atomic_path(path, is_dir=True) as tmp:
        yield tmp
        if provenance is not None:
            _write_sidecar(path, {**provenance, "sha256": dir_sha256(tmp)})


def read_parquet(path: str | Path, columns: list[str] | None = None):
    import pandas as pd
    import pyarrow as pa

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return pd.read_parquet(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: damaged table, not a readable Parquet file ({str(exc).strip()[:160]})",
                        hint=f"re-create {path.name} by re-running the step that wrote it "
                        "(snakemake --forcerun <the file>)") from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as handle:
        for line_no, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}: line {line_no} is not valid JSON ({exc})") from None
    return rows


def check_columns(frame, required: list[str], path: str | Path) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise UserError(
            f"{path}: missing column(s) {missing}; found {list(frame.columns)}, expected at least {required}"
        )


# ---------------------------------------------------------------- one run per experiment
LOCK_FILE = ".lock"  # results/<exp>/.lock
_held_locks: dict[Path, int] = {}


class ExperimentInUse(UserError):
    """Another run holds the experiment's lock."""


def lock_experiment(results: str | Path) -> Path:
    """Hold ``results/<exp>/.lock`` for the rest of this process, or raise :class:`ExperimentInUse`.

    An ``flock`` on a file inside the experiment: whichever working folder a run
    starts from, two runs of one experiment meet at the same lock. The kernel
    releases it when the holder exits, however it exits, so a lock is never
    stale; the file's text (pid, host, working folder) only names the holder.
    """
    import fcntl

    results = Path(results).resolve()
    if results in _held_locks:
        return results / LOCK_FILE
    results.mkdir(parents=True, exist_ok=True)
    path = results / LOCK_FILE
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(handle, 4096).decode(errors="replace").strip() or "another process"
        os.close(handle)
        raise ExperimentInUse(f"{results} is in use by another run ({holder}); one experiment takes one run at "
                              "a time: wait for that run to end or stop it") from None
    os.ftruncate(handle, 0)
    holder = f"pid {os.getpid()} on host {socket.gethostname()}, working folder {Path.cwd()}, since {_now()}"
    os.write(handle, holder.encode() + b"\n")
    _held_locks[results] = handle
    return path


def unlock_experiment(results: str | Path) -> None:
    """Release a lock this process holds (exiting releases it too)."""
    handle = _held_locks.pop(Path(results).resolve(), None)
    if handle is not None:
        os.close(handle)
