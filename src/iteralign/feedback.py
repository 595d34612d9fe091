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

from iteralign.config import round_seed
from iteralign.errors import UserError

FEEDBACK_TYPES = ("pairwise_feedback", "binary_feedback", "scalar_feedback")
PAIRWISE_MODES = ("random", "max", "min", "all")
_REQUIRED = {
    "pairwise_feedback": ("prompt_id", "prompt", "output_A", "output_B", "label"),
    "binary_feedback": ("prompt_id", "prompt", "output", "label"),
    "scalar_feedback": ("prompt_id", "prompt", "output", "reward"),
}


class FeedbackError(UserError):
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
    return _item(
        "pairwise_feedback", a, round_n,
        output_A=_assistant(a["output"]),
        output_B=_assistant(b["output"]),
        label=int(a["reward"] > b["reward"]),
        reward_A=float(a["reward"]),
        reward_B=float(b["reward"]),
        reward_difference=abs(float(a["reward"]) - float(b["reward"])),
        sample_id_A=int(a["sample_id"]),
        sample_id_B=int(b["sample_id"]),
    )


def _item(kind: str, sample: dict, round_n: int | None, **fields) -> dict:
    """A feedback item of ``kind`` on ``sample``'s prompt: type, prompt_id, prompt, ``fields``, then round (when known)."""
    item = {"type": kind, "prompt_id": sample["prompt_id"], "prompt": sample["prompt"], **fields}
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


def _is_quantile(threshold) -> bool:
    return isinstance(threshold, dict) and set(threshold) == {"quantile"}


def round_gaps(samples: list[dict]) -> list[float]:
    """Non-zero reward gaps between two different texts of the same prompt (valid rewards only)."""
    gaps = []
    for group in _group(_valid(samples)).values():
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                gap = abs(group[i]["reward"] - group[j]["reward"])
                if gap > 0 and group[i]["output"] != group[j]["output"]:
                    gaps.append(gap)
    return gaps


def pairwise_threshold(samples: list[dict], threshold) -> float:
    """A number as it is; ``{"quantile": q}``: the q-quantile of the round's gaps (0 when there are none)."""
    if _is_quantile(threshold):
        gaps = round_gaps(samples)
        return float(np.quantile(gaps, threshold["quantile"])) if gaps else 0.0
    if isinstance(threshold, int | float) and not isinstance(threshold, bool) and threshold >= 0:
        return float(threshold)
    raise UserError(
        f"feedback.pairwise.threshold: found {threshold!r}; expected a number >= 0 or {{quantile: q}}"
    )


def _candidates(group: list[dict], mode: str, rng: np.random.Generator) -> list[tuple[dict, dict]]:
    """The pairs a mode considers: random, the shuffled samples two by two; else every two samples."""
    if mode == "random":
        order = rng.permutation(len(group))
        return [(group[order[i]], group[order[i + 1]]) for i in range(0, len(order) - 1, 2)]
    return [(group[i], group[j]) for i in range(len(group)) for j in range(i + 1, len(group))]


def _gap(pair: tuple[dict, dict]) -> float:
    return abs(pair[0]["reward"] - pair[1]["reward"])


def _choose(eligible: list[tuple[dict, dict]], mode: str, rng: np.random.Generator) -> tuple[list, int]:
    """The pairs a mode keeps out of the eligible ones, and how many it left out as duplicates."""
    if mode == "random" or not eligible:
        return eligible, 0
    if mode in ("max", "min"):
        best = max(map(_gap, eligible)) if mode == "max" else min(map(_gap, eligible))
        tied = [pair for pair in eligible if _gap(pair) == best]
        return [tied[rng.integers(len(tied))]], 0
    # all: largest gaps first; a pair of texts already paired (duplicate samples) is not repeated
    kept, seen = [], set()
    for pair in sorted(eligible, key=_gap, reverse=True):
        texts = frozenset((pair[0]["output"], pair[1]["output"]))
        if texts not in seen:
            seen.add(texts)
            kept.append(pair)
    return kept, len(eligible) - len(kept)


def build_pairwise(
    samples: list[dict], mode: str, threshold, seed: int, round_n: int | None = None
) -> tuple[list[dict], dict]:
    """Pairs per prompt. ``samples``: dicts with prompt_id, sample_id, prompt, output, reward.

    modes: ``random`` shuffles a prompt's samples and pairs them two by two (as HALOs);
    ``max`` takes the eligible pair with the largest gap (best vs worst); ``min`` the
    eligible pair with the smallest gap; ``all`` every eligible pair (a pair of texts
    once). A pair is eligible when its gap is > 0 and > threshold and the two texts
    differ. ``threshold``: a number, or ``{"quantile": q}`` of the round's gaps.
    Returns the items and counts of what was kept and dropped, and why.
    """
    if mode not in PAIRWISE_MODES:
        raise UserError(f"feedback.pairwise.mode: unknown mode {mode!r}; expected one of {list(PAIRWISE_MODES)}")
    cut = pairwise_threshold(samples, threshold)
    rng = np.random.default_rng(seed)
    stats: Counter = Counter()
    valid = _valid(samples)
    stats.update(samples=len(samples), samples_nan_reward=len(samples) - len(valid))
    groups, valid_groups = _group(samples), _group(valid)
    stats["prompts"] = len(groups)
    items: list[dict] = []
    for prompt_id in groups:  # insertion order: as the samples file lists prompts
        group = valid_groups.get(prompt_id, [])
        if len(group) < 2:
            stats["prompts_dropped_fewer_than_two_valid"] += 1
            continue
        eligible, reasons = [], Counter()
        for a, b in _candidates(group, mode, rng):
            why = _eligible(a, b, cut)
            if why is None:
                eligible.append((a, b))
            else:
                reasons[why] += 1
        chosen, duplicates = _choose(eligible, mode, rng)
        items.extend(_pair_item(a, b, rng, round_n) for a, b in chosen)
        for why, count in reasons.items():
            stats[f"pairs_dropped_{why}"] += count
        stats["pairs_dropped_duplicate_texts"] += duplicates
        if not chosen:
            # name the strongest reason this prompt gave nothing
            why = next(w for w in ("tie", "identical_text", "below_threshold") if reasons[w])
            stats[f"prompts_dropped_{why}"] += 1
    stats["pairs"] = len(items)
    stats["prompts_kept"] = len({item["prompt_id"] for item in items})
    stats["samples_in_pairs"] = len({(i["prompt_id"], i[k]) for i in items for k in ("sample_id_A", "sample_id_B")})
    stats["threshold"] = cut
    return items, dict(stats)


def binary_threshold(rewards: list[float], threshold) -> float:
    """The cut of ``mean``, ``median``, ``{"quantile": q}`` over ``rewards``, or a number as it is."""
    if threshold == "mean":
        return float(np.mean(rewards))
    if threshold == "median":
        return float(np.median(rewards))
    if _is_quantile(threshold):
        return float(np.quantile(rewards, threshold["quantile"]))
    if isinstance(threshold, int | float) and not isinstance(threshold, bool):
        return float(threshold)
    raise UserError(
        f"feedback.binary.threshold: found {threshold!r}; expected 'mean', 'median', {{quantile: q}} or a number"
    )


def _binary_item(s: dict, cut: float, round_n: int | None) -> dict:
    return _item("binary_feedback", s, round_n, output=_assistant(s["output"]), label=int(s["reward"] >= cut),
                 reward=float(s["reward"]), sample_id=int(s["sample_id"]))


def build_binary(samples: list[dict], threshold, round_n: int | None = None,
                 scope: str = "round") -> tuple[list[dict], dict]:
    """label 1 when reward >= threshold (as HALOs).

    ``scope="round"``: mean/median/quantile over the round's valid rewards. ``scope="prompt"``:
    over each prompt's own valid rewards; a prompt whose valid rewards are all equal gives
    no item then (every sample would be "desirable" relative to itself). A number is the
    same in both scopes.
    """
    if scope not in ("round", "prompt"):
        raise UserError(f"feedback.binary.scope: found {scope!r}; expected 'round' or 'prompt'")
    valid = _valid(samples)
    groups, valid_groups = _group(samples), _group(valid)
    stats: Counter = Counter(samples=len(samples), samples_nan_reward=len(samples) - len(valid), prompts=len(groups))
    relative = not isinstance(threshold, int | float) or isinstance(threshold, bool)
    round_cut = binary_threshold([s["reward"] for s in valid], threshold) if valid else None
    items = []
    for prompt_id in groups:
        group = valid_groups.get(prompt_id, [])
        if not group:
            stats["prompts_dropped_no_valid_reward"] += 1
            continue
        cut = round_cut
        if scope == "prompt" and relative:
            if len({s["reward"] for s in group}) < 2:
                stats["prompts_dropped_all_equal"] += 1
                continue
            cut = binary_threshold([s["reward"] for s in group], threshold)
        items.extend(_binary_item(s, cut, round_n) for s in group)
    desirable = sum(i["label"] for i in items)
    stats.update(items=len(items), desirable=desirable, undesirable=len(items) - desirable,
                 prompts_kept=len({i["prompt_id"] for i in items}))
    stats["threshold"] = None if scope == "prompt" and relative else round_cut
    return items, dict(stats)


def build_scalar(samples: list[dict], round_n: int | None = None) -> tuple[list[dict], dict]:
    """The valid rewards as they are, grouped by prompt (in the order prompts first appear)."""
    valid = _valid(samples)
    groups, valid_groups = _group(samples), _group(valid)
    items = []
    for prompt_id in groups:
        for s in valid_groups.get(prompt_id, []):
            items.append(_item("scalar_feedback", s, round_n, output=_assistant(s["output"]),
                               reward=float(s["reward"]), sample_id=int(s["sample_id"])))
    return items, {"samples": len(samples), "samples_nan_reward": len(samples) - len(valid),
                   "prompts": len(groups), "items": len(items), "prompts_kept": len(valid_groups),
                   "prompts_dropped_no_valid_reward": len(groups) - len(valid_groups)}


def build_feedback(samples: list[dict], config: dict, round_n: int) -> tuple[list[dict], dict]:
    """The round's feedback items and stats, as ``config["feedback"]`` says."""
    cfg = config["feedback"]
    seed = round_seed(config, round_n)
    if cfg["type"] == "pairwise":
        pairwise = cfg["pairwise"]
        items, stats = build_pairwise(samples, pairwise["mode"], pairwise["threshold"], seed, round_n)
        settings = {"mode": pairwise["mode"], "threshold_setting": pairwise["threshold"]}
    elif cfg["type"] == "binary":
        binary = cfg["binary"]
        items, stats = build_binary(samples, binary["threshold"], round_n, scope=binary["scope"])
        settings = {"scope": binary["scope"], "threshold_setting": binary["threshold"]}
    else:
        items, stats = build_scalar(samples, round_n)
        settings = {}
    return items, {"type": cfg["type"], **settings, **stats}


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
    if not items:
        raise FeedbackError(f"{path}: no feedback items (an empty array); expected at least one to train on",
                            hint="the feedback step's stats (its log and sidecar) say why every sample was dropped")
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
        if isinstance(item["prompt_id"], bool) or not isinstance(item["prompt_id"], int | str):
            raise FeedbackError(f"{where}: prompt_id is {item['prompt_id']!r}; expected a string or an integer")
        item["prompt_id"] = str(item["prompt_id"])  # HALOs numbers its prompts 0, 1, ...
        if kind == "pairwise_feedback":
            item["output_A_text"] = _output_text(item["output_A"], where, "output_A")
            item["output_B_text"] = _output_text(item["output_B"], where, "output_B")
            if item["label"] not in (0, 1):
                raise FeedbackError(f"{where}: label is {item['label']!r}; expected 0 or 1")
            check_pair_label(item, where)
        else:
            item["output_text"] = _output_text(item["output"], where, "output")
            if kind == "binary_feedback" and item["label"] not in (0, 1):
                raise FeedbackError(f"{where}: label is {item['label']!r}; expected 0 or 1")
            if kind == "scalar_feedback" and not isinstance(item["reward"], int | float):
                raise FeedbackError(f"{where}: reward is {item['reward']!r}; expected a number")
        check_finite_rewards(item, where)
        out.append(item)
    return out


def check_finite_rewards(item: dict, where: str) -> None:
    """Every reward an item carries is a finite number (JSON has no inf or NaN; Python's reader takes them)."""
    for key in ("reward", "reward_A", "reward_B", "reward_difference"):
        value = item.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            raise FeedbackError(f"{where}: {key} is {value}; expected a finite number")


def check_pair_label(item: dict, where: str) -> None:
    """A pair's label agrees with its own rewards (label 1 when reward_A > reward_B), when it has them."""
    reward_a, reward_b = item.get("reward_A"), item.get("reward_B")
    numbers = all(isinstance(r, int | float) and not isinstance(r, bool) for r in (reward_a, reward_b))
    if numbers and reward_a != reward_b and item["label"] != int(reward_a > reward_b):
        raise FeedbackError(
            f"{where}: label is {item['label']} but reward_A={reward_a} and reward_B={reward_b}; "
            f"expected label {int(reward_a > reward_b)} (1 when A has the higher reward)"
        )


def check_one_row_per_sample(rewards, path: str | Path) -> None:
    """A rewards table has one row per (prompt_id, sample_id)."""
    repeated = rewards[rewards.duplicated(["prompt_id", "sample_id"])]
    if not repeated.empty:
        first = repeated.iloc[0]
        raise FeedbackError(f"{path}: prompt_id {first['prompt_id']} sample_id {first['sample_id']} appears more "
                            f"than once ({len(repeated)} repeated rows); expected one row per sample")


def check_some_feedback(items: list[dict], stats: dict, rewards_path: str | Path) -> None:
    """A round's feedback has at least one item: an empty file would train on nothing, silently."""
    if not items:
        raise FeedbackError(
            f"{rewards_path}: these rewards give no {stats['type']} feedback items ({stats}); "
            "expected at least one to train on",
            hint="sample more (sampling.num_samples) or relax the feedback threshold",
        )


def check_finite_sample_rewards(records: list[dict], path: str | Path) -> None:
    """Refuse +inf/-inf rewards in a rewards table: a scorer marks those failed (NaN), so the file was changed."""
    for record in records:
        value = record["reward"]
        if value is not None and not math.isnan(value) and not math.isfinite(value):
            raise FeedbackError(
                f"{path}: prompt_id {record['prompt_id']} sample_id {record['sample_id']} has reward {value}; "
                "expected a finite number or NaN (failed)"
            )


def check_trainable(items: list[dict], loss: str, path: str | Path) -> None:
    """Raise when the file's feedback type is not one the loss trains on."""
    from iteralign.train.objectives import OBJECTIVES

    accepted = OBJECTIVES[loss].feedback_types
    for index, item in enumerate(items):
        kind = item["type"].removesuffix("_feedback")
        if kind not in accepted:
            raise FeedbackError(
                f"{path} item {index}: loss {loss!r} trains on {sorted(accepted)} feedback, found {item['type']!r}"
            )
