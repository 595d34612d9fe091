"""Shared fixtures: tiny models and tokenizers built locally, micro-scale configs."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A graded reward so that micro runs with a barely trained model still get pairs:
# digits in the right place count, an exact answer gets the full point.
REWARD_MODULE = '''
def graded(prompt, output):
    a, b = prompt[-1]["content"].split("+")
    expected = str(int(a) + int(b)).zfill(3)
    return sum(x == y for x, y in zip(output, expected)) / 3 - 0.1 * abs(len(output) - 3)
'''

MICRO = {
    "experiment": "micro",
    "seed": 0,
    "rounds": 3,
    "prompts": {"source": "demo:addition", "num_generated": 80, "per_round": 12},
    "evaluation": {"num_prompts": 12, "max_new_tokens": 5, "bootstrap_samples": 200},
    "sft": {
        "num_examples": 1024,
        "batch_size": 64,
        "lr": 0.003,
        "warmup_steps": 2,
        "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2},
    },
    "sampling": {"backend": "hf", "num_samples": 4, "temperature": 1.0, "max_new_tokens": 5},
    "scoring": {"scorer": "python", "python": {"function": "micro_rewards:graded"}},
    "feedback": {"type": "pairwise", "pairwise": {"mode": "max"}},
    "training": {"loss": "dpo", "lr": 1.0e-3, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 2,
                 "max_length": 24, "max_prompt_length": 12},
    "resources": {"default": {"threads": 1, "mem_mb": 1000, "runtime": 10}},
    "checkpoints": {"keep_last": None},  # tests read every round's checkpoint; retention: test_retention.py
}


def micro_config(**sections) -> dict:
    """The micro experiment (as a raw config dict), with sections updated."""
    config = copy.deepcopy(MICRO)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def write_reward_module(folder: Path) -> None:
    (folder / "micro_rewards.py").write_text(REWARD_MODULE)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from iteralign.demo import ALPHABET
    from iteralign.tiny import build_char_tokenizer

    return build_char_tokenizer(ALPHABET)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer):
    """A randomly initialised 1-layer Llama saved as a Hugging Face checkpoint."""
    from iteralign.tiny import build_llama

    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    model = build_llama(tiny_tokenizer, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, seed=0)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def run_cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``iteralign <args>`` in a subprocess (as the rules do)."""
    result = subprocess.run([sys.executable, "-m", "iteralign.cli", *args], cwd=cwd, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    if check and result.returncode != 0:
        raise AssertionError(f"iteralign {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result
