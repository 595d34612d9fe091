"""Turn scored samples into HALOs-compatible feedback items, and read such files back.

Field names follow HALOs' ``train/label.py`` so that either project reads the
other's files. Unlike HALOs: a NaN reward is never used, ties are never paired,
a pair never holds the same text twice, and every dropped sample or prompt is
counted with the reason.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

FEEDBACK_TYPES = ("pairwise_feedback", "binary_feedback", "scalar_feedback")
_REQUIRED = {
    "pairwise_feedback": ("prompt_id", "prompt", "output_A", "output_B", "label"),
    "binary_feedback": ("prompt_id", "prompt", "output", "label"),
    "scalar_feedback": ("prompt_id", "prompt", "output", "reward"),
}


class FeedbackError(ValueError):
    """A feedback file that cannot be trained on."""


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _valid(samples: list[dict]) -> list[dict]:
    return [s for s in samples if s["reward"] is not None and not math.isnan(s["reward"])]


def _group(samples: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for sample in samples:
        groups.setdefault(sample["prompt_id"], []).append(sample)
    return groups


def _pair_item(a: dict, b: dict, rng: np.random.Generator, round_n: int | None) -> dict:
    if rng.random() < 0.5:  # seeded A/B order, so position carries no signal
        a, b = b, a
    item = {
        "type": "pairwise_feedback",
        "prompt_id": a["prompt_id"],
        "prompt": a["prompt"],
        "output_A": _assistant(a["output"]),
        "output_B": _assistant(b["output"]),
        "label": int(a["reward"] > b["reward"]),
        "reward_A": float(a["reward"]),
        "reward_B": float(b["reward"]),
        "reward_difference": abs(float(a["reward"]) - float(b["reward"])),
        "sample_id_A": int(a["sample_id"]),
        "sample_id_B": int(b["sample_id"]),
    }
    if round_n is not None:
        item["round"] = round_n
    return item


def _eligible(a: dict, b: dict, threshold: float) -> str | None:
    """None when (a, b) may be a pair, else why not."""
    gap = abs(a["reward"] - b["reward"])
    if gap == 0:
        return "tie"
    if a["output"] == b["output"]:
        return "identical_text"
    if gap <= threshold:
        return "below_threshold"
    return None


def build_pairwise(
    samples: list[dict], mode: str, threshold: float, seed: int, round_n: int | None = None
) -> tuple[list[dict], dict]:
    """Pairs per prompt. ``samples``: dicts with prompt_id, sample_id, prompt, output, reward.

    modes: ``random`` shuffles a prompt's samples and pairs them two by two (as HALOs);
    ``max`` takes the eligible pair with the largest gap (best vs worst); ``min`` the
    eligible pair with the smallest gap strictly above ``threshold``. A pair is
    eligible when the gap is > 0 and > threshold and the two texts differ.
    Returns the items and counts of what was kept and dropped.
    """
    if mode not in ("random", "max", "min"):
        raise ValueError(f"feedback.pairwise.mode: unknown mode {mode!r}; expected random, max or min")
    rng = np.random.default_rng(seed)
    stats: Counter = Counter()
    stats["samples"] = len(samples)
    valid = _valid(samples)
    stats["samples_nan_reward"] = len(samples) - len(valid)
    groups = _group(samples)
    stats["prompts"] = len(groups)
    valid_groups = _group(valid)
    items: list[dict] = []
    for prompt_id in groups:  # insertion order: as the samples file lists prompts
        group = valid_groups.get(prompt_id, [])
        if len(group) < 2:
            stats["prompts_dropped_fewer_than_two_valid"] += 1
            continue
        kept_before = len(items)
        reasons: Counter = Counter()
        if mode == "random":
            order = rng.permutation(len(group))
            for i in range(0, len(order) - 1, 2):
                a, b = group[order[i]], group[order[i + 1]]
                why = _eligible(a, b, threshold)
                if why is None:
                    items.append(_pair_item(a, b, rng, round_n))
                else:
                    reasons[why] += 1
        else:
            candidates = []
            for i in range(len(group)):
                for j in range(i + 1, len(group)):
                    why = _eligible(group[i], group[j], threshold)
                    if why is None:
                        candidates.append((abs(group[i]["reward"] - group[j]["reward"]), i, j))
                    else:
                        reasons[why] += 1
            if candidates:
                best = max(c[0] for c in candidates) if mode == "max" else min(c[0] for c in candidates)
                tied = [c for c in candidates if c[0] == best]
                _, i, j = tied[rng.integers(len(tied))]
                items.append(_pair_item(group[i], group[j], rng, round_n))
        if len(items) == kept_before:
            # name the strongest reason this prompt gave nothing
            for why in ("tie", "identical_text", "below_threshold"):
                if reasons[why]:
                    stats[f"prompts_dropped_{why}"] += 1
                    break
    stats["pairs"] = len(items)
    stats["prompts_kept"] = len({item["prompt_id"] for item in items})
    return items, dict(stats)


def binary_threshold(rewards: list[float], threshold) -> float:
    if threshold == "mean":
        return float(np.mean(rewards))
    if threshold == "median":
        return float(np.median(rewards))
    if isinstance(threshold, int | float) and not isinstance(threshold, bool):
        return float(threshold)
    raise ValueError(f"feedback.binary.threshold: found {threshold!r}; expected 'mean', 'median' or a number")


def build_binary(samples: list[dict], threshold, round_n: int | None = None) -> tuple[list[dict], dict]:
    """label 1 when reward >= threshold (as HALOs), over the round's valid rewards."""
    valid = _valid(samples)
    stats = {"samples": len(samples), "samples_nan_reward": len(samples) - len(valid),
             "prompts": len(_group(samples))}
    if not valid:
        return [], {**stats, "items": 0, "prompts_kept": 0}
    cut = binary_threshold([s["reward"] for s in valid], threshold)
    items = []
    for s in valid:
        item = {
            "type": "binary_feedback",
            "prompt_id": s["prompt_id"],
            "prompt": s["prompt"],
            "output": _assistant(s["output"]),
            "label": int(s["reward"] >= cut),
            "reward": float(s["reward"]),
            "sample_id": int(s["sample_id"]),
        }
        if round_n is not None:
            item["round"] = round_n
        items.append(item)
    desirable = sum(i["label"] for i in items)
    stats.update(items=len(items), threshold=cut, desirable=desirable, undesirable=len(items) - desirable,
                 prompts_kept=len({i["prompt_id"] for i in items}))
    return items, stats


def build_scalar(samples: list[dict], round_n: int | None = None) -> tuple[list[dict], dict]:
    """The valid rewards as they are, in prompt order (grouped by prompt)."""
    valid = _valid(samples)
    items = []
    for group in _group(valid).values():
        for s in group:
            item = {"type": "scalar_feedback", "prompt_id": s["prompt_id"], "prompt": s["prompt"],
                    "output": _assistant(s["output"]), "reward": float(s["reward"]),
                    "sample_id": int(s["sample_id"])}
            if round_n is not None:
                item["round"] = round_n
            items.append(item)
    return items, {"samples": len(samples), "samples_nan_reward": len(samples) - len(valid),
                   "prompts": len(_group(samples)), "items": len(items),
                   "prompts_kept": len(_group(valid))}


def build_feedback(samples: list[dict], config: dict, round_n: int) -> tuple[list[dict], dict]:
    cfg = config["feedback"]
    seed = config["seed"] * 1_000_003 + round_n
    if cfg["type"] == "pairwise":
        return build_pairwise(samples, cfg["pairwise"]["mode"], cfg["pairwise"]["threshold"], seed, round_n)
    if cfg["type"] == "binary":
        return build_binary(samples, cfg["binary"]["threshold"], round_n)
    return build_scalar(samples, round_n)


# ---------------------------------------------------------------- reading
def _output_text(value, where: str, key: str) -> str:
    """HALOs stores outputs as [{"role": "assistant", "content": ...}]; accept a bare string too."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        return value[-1]["content"]
    raise FeedbackError(f"{where}: {key} is {value!r:.80}; expected a list with one assistant message")


def load_feedback(path: str | Path) -> list[dict]:
    """Read and check a feedback file (ours or HALOs'); adds ``*_text`` fields for the trainer."""
    from iteralign.artifacts import read_json
    from iteralign.prompts import PromptError, canonical_messages, prompt_id

    path = Path(path)
    items = read_json(path)
    if not isinstance(items, list):
        raise FeedbackError(f"{path}: expected a JSON array of feedback items, found {type(items).__name__}")
    out = []
    for index, item in enumerate(items):
        where = f"{path} item {index}"
        if not isinstance(item, dict):
            raise FeedbackError(f"{where}: expected an object, found {type(item).__name__}")
        kind = item.get("type")
        if kind not in FEEDBACK_TYPES:
            raise FeedbackError(f"{where}: unknown type {kind!r}; expected one of {list(FEEDBACK_TYPES)}")
        missing = [k for k in _REQUIRED[kind] if k not in item and not (k == "prompt_id" and "prompt" in item)]
        if missing:
            raise FeedbackError(f"{where}: {kind} item lacks {missing}; found keys {sorted(item)}")
        item = dict(item)
        try:
            item["prompt"] = canonical_messages(item["prompt"], where)
        except PromptError as exc:
            raise FeedbackError(str(exc)) from None
        item.setdefault("prompt_id", prompt_id(item["prompt"]))
        if kind == "pairwise_feedback":
            item["output_A_text"] = _output_text(item["output_A"], where, "output_A")
            item["output_B_text"] = _output_text(item["output_B"], where, "output_B")
            if item["label"] not in (0, 1):
                raise FeedbackError(f"{where}: label is {item['label']!r}; expected 0 or 1")
        else:
            item["output_text"] = _output_text(item["output"], where, "output")
            if kind == "binary_feedback" and item["label"] not in (0, 1):
                raise FeedbackError(f"{where}: label is {item['label']!r}; expected 0 or 1")
            if kind == "scalar_feedback" and not isinstance(item["reward"], int | float):
                raise FeedbackError(f"{where}: reward is {item['reward']!r}; expected a number")
        out.append(item)
    return out


def check_trainable(items: list[dict], loss: str, path: str | Path) -> None:
    """Raise when the file's feedback type is not one the loss trains on."""
    from iteralign.config import LOSS_FEEDBACK_TYPES

    accepted = LOSS_FEEDBACK_TYPES[loss]
    for index, item in enumerate(items):
        kind = item["type"].removesuffix("_feedback")
        if kind not in accepted:
            raise FeedbackError(
                f"{path} item {index}: loss {loss!r} trains on {sorted(accepted)} feedback, found {item['type']!r}"
            )
