"""A reward computed by a Python function named ``module:function`` in the config.

The function is called as ``function(prompt_messages, output) -> float``. The
working directory is on ``sys.path``, so a ``rewards.py`` beside the config works.
A function that returns something other than a real number is a configuration
error (the round fails naming the function, the value and the row); a function
that returns NaN marks that one sample as failed.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import sys

from iteralign.score import ScoreResult


def load_function(spec: str):
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"scoring.python.function {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    function = getattr(module, attr, None)
    if not callable(function):
        raise AttributeError(f"scoring.python.function {spec!r}: module {module_name!r} has no function {attr!r}")
    return function


class PythonScorer:
    def __init__(self, spec: str):
        self.name = f"python:{spec}"
        self.spec = spec
        self.function = load_function(spec)

    def score(self, prompts: list[list[dict]], outputs: list[str]) -> ScoreResult:
        rewards, errors = [], []
        for row, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
            value = self.function(prompt, output)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(
                    f"scoring.python.function {self.spec!r} returned {value!r} ({type(value).__name__}) "
                    f"for sample row {row} (output {output!r:.60}); expected a real number"
                )
            value = float(value)
            if math.isnan(value):
                rewards.append(math.nan)
                errors.append(f"{self.spec} returned NaN")
            else:
                rewards.append(value)
                errors.append(None)
        return ScoreResult(rewards, errors)
