"""Errors a user can act on, and how the CLI prints them.

Every check iteralign can foresee (a config key, an input file, a row of a table,
a damaged checkpoint, a user's reward function) raises :class:`UserError` or one of
its subclasses. ``iteralign <step>`` turns exactly those into one line on stderr
(plus a ``hint:`` line when the error carries one) and exit code 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import re


class UserError(ValueError):
    """Input a user can fix. The message names the file, row or key, what was found and what was expected.

    ``hint``: an optional second line saying what to do about it.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def one_line(text: str) -> str:
    """``text`` with every line break and run of blanks folded into one space."""
    return re.sub(r"\s*\n\s*", "; ", text.strip()).replace("\r", " ")


def user_message(step: str, exc: BaseException) -> str:
    """What the CLI prints for a user error: one line, and a hint line when there is one (secrets redacted)."""
    from iteralign.redaction import redact

    text = f"iteralign {step}: error: {one_line(redact(str(exc)))}"
    hint = getattr(exc, "hint", None)
    if hint:
        text += f"\nhint: {one_line(redact(hint))}"
    return text
