"""A small crafted experiment written with the real artefact writers, for audit, show and report tests.

Every artefact records its inputs as the pipeline does (relative paths from the
folder the steps ran in), so provenance verification sees a consistent chain;
the numbers are made up, and known: round n's held-out reward is 1 on the first
n + 1 of the 6 eval prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from iteralign.artifacts import Provenance, atomic_dir, write_json, write_jsonl, write_parquet
from iteralign.evaluate import HeldOut, summarize

EXPERIMENT = "crafted"
EVAL_PROMPTS = [f"e{i}" for i in range(6)]
TRAIN_PROMPTS = {1: ["t0", "t1", "t2"], 2: ["t3", "t4", "t5"]}


def _messages(pid: str) -> list[dict]:
    return [{"role": "user", "content": f"question {pid}"}]


def _provenance(step: str, inputs: dict[str, Path]) -> Provenance:
    return Provenance(step, "c0ffee", 0, inputs)


def _eval_round(results: Path, n: int, rounds: int) -> None:
    rewards = np.array([1.0 if i <= n else 0.0 for i in range(len(EVAL_PROMPTS))])
    tokens = np.array([4 + n + (i % 2) for i in range(len(EVAL_PROMPTS))], dtype=float)
    frame = pd.DataFrame({
        "round": n, "prompt_id": EVAL_PROMPTS, "prompt": [_messages(p) for p in EVAL_PROMPTS],
        "output": [f"answer {n}.{i}" for i in range(len(EVAL_PROMPTS))], "num_output_tokens": tokens.astype(int),
        "finish_reason": ["length" if i == 0 and n == rounds else "stop" for i in range(len(EVAL_PROMPTS))],
        "reward": rewards, "error": None, "policy_logp": -2.0 + 0.1 * n, "reference_logp": -2.0,
    })
    baseline = previous = None
    inputs = {"prompts": results / "prompts.parquet", "checkpoint": results / f"ckpt_r{n}/FINAL"}
    if n > 0:
        r0 = pd.read_parquet(results / "eval_r0.parquet")
        prev = pd.read_parquet(results / f"eval_r{n - 1}.parquet")
        baseline = HeldOut(r0["reward"].to_numpy(), r0["num_output_tokens"].to_numpy(dtype=float))
        previous = HeldOut(prev["reward"].to_numpy(), prev["num_output_tokens"].to_numpy(dtype=float))
        inputs.update(baseline=results / "eval_r0.parquet", previous=results / f"eval_r{n - 1}.parquet")
    summary = summarize(n, HeldOut(rewards, tokens), frame["policy_logp"], frame["reference_logp"],
                        frame["finish_reason"], baseline, previous, 200, 0)
    record = _provenance("evaluate", inputs).record(round=n)
    write_parquet(frame, results / f"eval_r{n}.parquet", record)
    write_json(summary, results / f"eval_r{n}.json", record)


def _checkpoint(path: Path, provenance: dict, n: int) -> None:
    with atomic_dir(path, provenance) as tmp:
        (tmp / "model.safetensors").write_bytes(bytes([n]) * 64)
        (tmp / "trainer_state.json").write_text(json.dumps({"round": n}))


def _train_round(results: Path, n: int) -> None:
    pids = TRAIN_PROMPTS[n]
    samples = pd.DataFrame([
        {"round": n, "prompt_id": p, "sample_id": s, "prompt": _messages(p), "output": f"try {s} of {p}",
         "num_output_tokens": 3 + s, "finish_reason": "stop"} for p in pids for s in range(2)])
    samples_path, rewards_path = results / f"samples_r{n}.parquet", results / f"rewards_r{n}.parquet"
    write_parquet(samples, samples_path, _provenance("sample", {
        "prompts": results / "prompts.parquet", "checkpoint": results / f"ckpt_r{n - 1}/FINAL"}).record(round=n))
    rewards = pd.DataFrame({"prompt_id": samples["prompt_id"], "sample_id": samples["sample_id"],
                            "reward": [float(s) for s in samples["sample_id"]], "error": None})
    write_parquet(rewards, rewards_path, _provenance("score", {"samples": samples_path}).record(round=n))
    items = [{"type": "pairwise_feedback", "prompt_id": p, "prompt": _messages(p),
              "output_A": [{"role": "assistant", "content": f"try 1 of {p}"}],
              "output_B": [{"role": "assistant", "content": f"try 0 of {p}"}], "label": 1, "reward_A": 1.0,
              "reward_B": 0.0, "reward_difference": 1.0, "sample_id_A": 1, "sample_id_B": 0, "round": n}
             for p in pids[:2]]
    stats = {"samples": 6, "samples_nan_reward": 0, "prompts": 3, "prompts_kept": 2, "pairs": 2,
             "prompts_dropped_tie": 1}
    feedback_path = results / f"feedback_r{n}.json"
    write_json(items, feedback_path, _provenance("feedback", {"samples": samples_path, "rewards": rewards_path})
               .record(round=n, stats=stats))
    _checkpoint(results / f"ckpt_r{n}/FINAL", _provenance("train", {
        "checkpoint": results / f"ckpt_r{n - 1}/FINAL", "feedback_0": feedback_path}).record(round=n), n)
    steps = [{"round": n, "step": 4 * (n - 1) + i + 1, "round_step": i + 1, "epoch": 0, "examples": 2,
              "loss": 0.69 - 0.05 * i, "margin": 0.1 * i, "accuracy": 0.5 + 0.1 * i, "lr": 1e-5, "grad_norm": 1.0}
             for i in range(4)]
    write_jsonl(steps, results / f"train_r{n}.jsonl")


def write_crafted_experiment(workdir: Path) -> Path:
    """Write results/crafted under ``workdir`` (which must be the current folder) and return it."""
    results = Path("results") / EXPERIMENT
    results.mkdir(parents=True)
    plan = pd.DataFrame({
        "prompt_id": EVAL_PROMPTS + [p for ps in TRAIN_PROMPTS.values() for p in ps],
        "prompt": [_messages(p) for p in EVAL_PROMPTS + [p for ps in TRAIN_PROMPTS.values() for p in ps]],
        "split": ["eval"] * 6 + ["train"] * 6,
        "round": [None] * 6 + [n for n, ps in TRAIN_PROMPTS.items() for _ in ps],
    })
    write_parquet(plan, results / "prompts.parquet", _provenance("plan", {}).record(rounds=2))
    _checkpoint(results / "ckpt_r0/FINAL", _provenance("sft", {}).record(), 0)
    _eval_round(results, 0, rounds=2)
    for n in TRAIN_PROMPTS:
        _train_round(results, n)
        _eval_round(results, n, rounds=2)
    return workdir / results
