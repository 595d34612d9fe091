"""A cache of judge replies: one JSON file per request, so no request is ever sent twice.

The key is the sha256 of the canonical JSON of everything that determines a reply:
endpoint, model, messages and sampling parameters (never the API key). Files live
at ``<folder>/<key[:2]>/<key>.json`` and are written atomically as each reply
arrives, so a crashed or killed run keeps every reply it received, and two jobs
sharing a cache (score and evaluate) never see half a file. Only successful
replies are stored; a failed request is tried again by the next run. Every
string of a record is redacted (iteralign/redaction.py) before it is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

from iteralign.redaction import redact_tree

log = logging.getLogger(__name__)


def request_key(endpoint: str, model: str, messages: list[dict], params: dict) -> str:
    """Stable hash of one chat request (the parts that decide the reply)."""
    canonical = json.dumps(
        {"endpoint": endpoint.rstrip("/"), "model": model, "messages": messages, "params": params},
        sort_keys=True, ensure_ascii=False, separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResponseCache:
    """Reply records by request key under ``folder`` (None: a cache that keeps nothing)."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder is not None else None

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        if self.folder is None:
            return None
        path = self._path(key)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            log.warning("judge cache entry %s is not valid JSON (%s): asking the judge again", path, exc)
            return None

    def put(self, key: str, record: dict) -> None:
        if self.folder is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name unique to this writer: two jobs storing the same key never touch each other's file.
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(redact_tree(record), ensure_ascii=False, sort_keys=True) + "\n")
        os.replace(tmp, path)
