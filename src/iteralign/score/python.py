"""A reward computed by a Python function named ``module:function`` in the config.

The function is called as ``function(prompt_messages, output) -> float``. The
working directory is on ``sys.path``, so a ``rewards.py`` beside the config works.
A function that raises, or returns something other than a real number, stops the
round naming the function, the value and the sample (prompt_id, sample_id); a
function that returns NaN, +inf or -inf marks that one sample as failed, with the
value as the reason. The config check (``iteralign.config.check_environment``) imports
the function and checks that it takes ``(prompt, output)`` before any job runs.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import os
import sys

from iteralign.errors import UserError
from iteralign.score import SampleError, ScoreResult


def load_function(spec: str, key: str = "scoring.python.function"):
    """The reward function ``module:function`` names, checked to take ``(prompt, output)``.

    Raises UserError naming ``key`` when the module does not import (whatever it raised),
    has no such attribute, or the attribute is not callable with two arguments.
    """
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 (any failure of the user's module is reported, not raised)
        raise UserError(f"{key} {spec!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})",
                        hint=f"the module must be importable from {os.getcwd()} or the Python path") from None
    function = getattr(module, attr, None)
    if function is None:
        raise UserError(f"{key} {spec!r}: module {module_name!r} has no attribute {attr!r}; "
                        "expected a function (prompt, output) -> float")
    if not callable(function):
        raise UserError(f"{key} {spec!r}: found {type(function).__name__} {function!r:.40}; "
                        "expected a function (prompt, output) -> float")
    try:
        inspect.signature(function).bind([], "")
    except TypeError:
        raise UserError(f"{key} {spec!r}: found signature {inspect.signature(function)}; "
                        "expected a function callable as f(prompt, output)") from None
    except ValueError:
        pass  # no signature to inspect (a builtin): calling it will tell
    return function


class PythonScorer:
    def __init__(self, spec: str):
        self.name = f"python:{spec}"
        self.spec = spec
        self.function = load_function(spec)

    def score(self, prompts: list[list[dict]], outputs: list[str]) -> ScoreResult:
        rewards, errors = [], []
        for row, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
            try:
                value = self.function(prompt, output)
            except Exception as exc:  # noqa: BLE001 (the user's code: report which row made it fail)
                raise SampleError(row, f"scoring.python.function {self.spec!r} raised {type(exc).__name__}: "
                                  f"{str(exc)[:200]} on output {output!r:.60}") from exc
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise SampleError(row, f"scoring.python.function {self.spec!r} returned {value!r:.60} "
                                  f"({type(value).__name__}) for output {output!r:.60}; expected a real number")
            value = float(value)
            if math.isfinite(value):
                rewards.append(value)
                errors.append(None)
            else:  # NaN, +inf and -inf: this sample failed (docs/scoring.md)
                rewards.append(math.nan)
                errors.append(f"{self.spec} returned {'NaN' if math.isnan(value) else value}")
        return ScoreResult(rewards, errors)
