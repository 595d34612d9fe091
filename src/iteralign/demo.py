"""The embedded demo task: two-digit addition with an imperfect teacher.

The SFT data comes from a teacher that forgets a carry with probability
``carry_forget_prob``, so the SFT model applies a needed carry only part of the
time: a skill it has seen but not mastered, which online DPO can sharpen.
Answers are written with three digits ("37+45" -> "082"): with a fixed width every
output position is one digit place, which a 2-layer model learns in a few hundred
steps (variable-width answers took several times longer and varied by seed).
The reward is exact match, checked from the prompt text alone.
"""

from __future__ import annotations

import random
import re

from iteralign.errors import UserError

_PROBLEM = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*$")
ANSWER_WIDTH = 3


def _problems(n: int, seed: int, stream: str) -> list[tuple[int, int]]:
    rng = random.Random(f"{stream}:{seed}")
    return [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]


def generate_prompts(source: str, n: int, seed: int) -> list[list[dict[str, str]]]:
    """Prompts of a built-in generator (only ``demo:addition`` exists)."""
    if source != "demo:addition":
        raise UserError(f"unknown built-in prompt source {source!r}; expected 'demo:addition'")
    return [[{"role": "user", "content": f"{a}+{b}"}] for a, b in _problems(n, seed, "prompts")]


def teacher_answer(a: int, b: int, rng: random.Random, carry_forget_prob: float) -> str:
    """Column addition that drops each carry with probability ``carry_forget_prob``."""
    digits, carry = [], 0
    while a or b or carry:
        total = a % 10 + b % 10 + carry
        digits.append(total % 10)
        carry = total // 10
        if carry and rng.random() < carry_forget_prob:
            carry = 0
        a, b = a // 10, b // 10
    return "".join(str(d) for d in reversed(digits)).zfill(ANSWER_WIDTH)


def sft_examples(n: int, seed: int, carry_forget_prob: float) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt messages, completion) pairs written by the imperfect teacher."""
    rng = random.Random(f"teacher:{seed}")
    return [
        ([{"role": "user", "content": f"{a}+{b}"}], teacher_answer(a, b, rng, carry_forget_prob))
        for a, b in _problems(n, seed, "sft")
    ]


def addition_reward(prompt: list[dict[str, str]], output: str) -> float:
    """1.0 when the output is exactly the sum (three digits) asked for in the last user turn, else 0.0."""
    match = _PROBLEM.match(prompt[-1]["content"])
    if match is None:
        raise UserError(f"not an addition prompt: {prompt[-1]['content']!r}")
    expected = int(match.group(1)) + int(match.group(2))
    return 1.0 if output.strip() == str(expected).zfill(ANSWER_WIDTH) else 0.0


# Characters of the demo's tokenizer; "=" ends the user turn in its chat template.
ALPHABET = "0123456789+="
