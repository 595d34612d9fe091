"""Small feedback files of each type, made from crafted samples (no model involved)."""

from __future__ import annotations

from pathlib import Path

from iteralign.artifacts import write_json
from iteralign.feedback import build_binary, build_pairwise, build_scalar

OUTPUTS = ["012", "1131", "10", "111", "0999", "1"]  # of different lengths


def crafted_samples(n_prompts: int = 6, offset: int = 0, outputs: list[str] = OUTPUTS) -> list[dict]:
    """4 samples per prompt (the first 4 ``outputs``, the prompt's number appended, so unique per prompt),
    of different rewards (a few ties)."""
    rows = []
    for p in range(offset, offset + n_prompts):
        prompt = [{"role": "user", "content": f"{10 + p}+{20 + p}"}]
        for s, out in enumerate(outputs[:4]):
            rows.append({"prompt_id": f"p{p}", "sample_id": s, "prompt": prompt, "output": f"{out}{p}",
                         "reward": float((s * 7 + p) % 5)})
    return rows


def write_feedback(folder: Path, kind: str, round_n: int = 1, n_prompts: int = 6, offset: int = 0) -> Path:
    samples = crafted_samples(n_prompts, offset)
    if kind == "pairwise":
        items, _ = build_pairwise(samples, "random", 0.0, seed=round_n, round_n=round_n)
    elif kind == "binary":
        items, _ = build_binary(samples, "mean", round_n)
    else:
        items, _ = build_scalar(samples, round_n)
    path = folder / f"{kind}_feedback_r{round_n}.json"
    write_json(items, path)
    return path


def nine_pairs() -> list[dict]:
    """9 pairs: with batch_size 4 the last batch has one pair, so one process gets none."""
    items = []
    for p in range(9):
        chosen, rejected = str(30 + 11 * p), f"{p}" * (1 + p % 4)
        items.append({"type": "pairwise_feedback", "prompt_id": f"p{p}",
                      "prompt": [{"role": "user", "content": f"{p}+{30 + 10 * p}"}],
                      "output_A": [{"role": "assistant", "content": chosen}],
                      "output_B": [{"role": "assistant", "content": rejected}], "label": 1})
    return items
