"""Secrets never leave the process: every text bound for a log, an artefact, the cache or stderr passes here.

API keys are read from environment variables only; the config names those variables
(``scoring.judge.api_key_env`` and the evaluation scorer's). :func:`register_secret_env`
records a name (config validation does it for every name a config holds), and
:func:`redact` replaces the current value of every registered variable, and anything
shaped like an OpenAI key (``sk-...``, masked ones included), with ``[redacted]``.
"""

from __future__ import annotations

import logging
import os
import re

REDACTED = "[redacted]"
_KEY_LIKE = re.compile(r"sk-[A-Za-z0-9_*.-]{4,}")
_MIN_SECRET_LENGTH = 4  # shorter values would redact ordinary words
_secret_envs: set[str] = set()


def register_secret_env(name: str | None) -> None:
    """Treat the value of environment variable ``name`` as a secret from now on (None: nothing)."""
    if name:
        _secret_envs.add(name)


def secret_env_names(config: dict) -> list[str]:
    """The environment variables a validated config names as API keys."""
    sections = [config.get("scoring") or {}, (config.get("evaluation") or {}).get("scorer") or {}]
    return [s["judge"]["api_key_env"] for s in sections if (s.get("judge") or {}).get("api_key_env")]


def secret_values() -> list[str]:
    values = (os.environ.get(name) for name in _secret_envs)
    return sorted({v for v in values if v and len(v) >= _MIN_SECRET_LENGTH}, key=len, reverse=True)


def redact(text):
    """``text`` without any registered secret or key-shaped string; a non-string is returned as it is."""
    if not isinstance(text, str):
        return text
    for secret in secret_values():
        text = text.replace(secret, REDACTED)
    return _KEY_LIKE.sub(REDACTED, text)


def redact_tree(value):
    """A JSON-like value (dicts, lists, strings) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(k): redact_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_tree(v) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's formatted message (install it on the handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True
