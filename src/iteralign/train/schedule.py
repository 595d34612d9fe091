"""The learning-rate schedule over the optimizer steps of a whole run (SFT and preference rounds)."""

from __future__ import annotations

import math

from iteralign.config import history_rounds
from iteralign.train.objectives import OBJECTIVES


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the base lr after ``step`` optimizer steps of the whole run."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def estimated_total_steps(config: dict) -> int:
    """Upper bound of optimizer steps over the whole run, for decaying schedules."""
    tcfg = config["training"]
    if tcfg["schedule_total_steps"]:
        return tcfg["schedule_total_steps"]
    k = config["sampling"]["num_samples"]
    fb = config["feedback"]
    if fb["type"] == "pairwise":
        per_prompt = k // 2 if fb["pairwise"]["mode"] == "random" else 1
        per_prompt *= OBJECTIVES[tcfg["loss"]].examples_per_pair  # kto splits each pair in two
    else:
        per_prompt = k  # binary and scalar: one item per sample (sft keeps the desirable ones)
    items = config["prompts"]["per_round"] * per_prompt
    steps = sum(math.ceil(items * len(history_rounds(tcfg, n)) / tcfg["batch_size"])
                for n in range(1, config["rounds"] + 1))
    return tcfg["epochs"] * steps
