"""Shared fixtures: tiny models and tokenizers built locally, a crafted experiment.

Plain functions and constants the tests share (the micro config, run_cli, ...) live in helpers.py.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


@pytest.fixture
def crafted(tmp_path, monkeypatch):
    """The crafted experiment (crafted.py) written in a fresh folder, which becomes the current one."""
    from crafted import write_crafted_experiment

    monkeypatch.chdir(tmp_path)
    return write_crafted_experiment(tmp_path)
