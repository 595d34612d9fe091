"""Small reward-model checkpoints built locally for the scoring tests (no download of any kind).

- ``save_classifier``: a LlamaForSequenceClassification with 1 (Bradley-Terry) or 2 labels.
- ``save_multi_objective``: an ArmoRM-shaped model whose output has ``rewards`` (one
  column per objective) and ``score``; like ArmoRM it ships its own modeling code
  (``auto_map`` in config.json), so loading it needs ``trust_remote_code``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

MODELING_FILE = "modeling_tiny_multi.py"
MODELING_CODE = '''
from dataclasses import dataclass

import torch
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


@dataclass
class MultiObjectiveOutput(ModelOutput):
    rewards: torch.FloatTensor | None = None
    score: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


class TinyMultiObjectiveRewardModel(LlamaPreTrainedModel):
    """Per-objective rewards from the last token; score = mean of tanh(rewards) (not a weighted sum)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = torch.nn.Linear(config.hidden_size, config.num_objectives, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        last = attention_mask.sum(-1) - 1
        rewards = self.regression_layer(hidden[torch.arange(hidden.shape[0]), last])
        score = torch.tanh(rewards).mean(-1)
        return MultiObjectiveOutput(rewards=rewards, score=score, logits=score[:, None])
'''


TINY_SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
              "max_position_embeddings": 256}


def save_classifier(path: Path, tokenizer, num_labels: int = 1, seed: int = 0) -> Path:
    from iteralign.tiny import build_llama_classifier

    model = build_llama_classifier(tokenizer, num_labels=num_labels, seed=seed, **TINY_SHAPE)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _modeling_module(folder: Path):
    spec = importlib.util.spec_from_file_location("tiny_multi_modeling", folder / MODELING_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def save_multi_objective(path: Path, tokenizer, num_objectives: int = 3, seed: int = 0) -> Path:
    import torch

    from iteralign.tiny import llama_config

    path.mkdir(parents=True, exist_ok=True)
    (path / MODELING_FILE).write_text(MODELING_CODE)
    config = llama_config(tokenizer, num_objectives=num_objectives, **TINY_SHAPE)
    torch.manual_seed(seed)
    model = _modeling_module(path).TinyMultiObjectiveRewardModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    config_file = path / "config.json"
    saved = json.loads(config_file.read_text())
    saved["auto_map"] = {"AutoModelForSequenceClassification": "modeling_tiny_multi.TinyMultiObjectiveRewardModel"}
    config_file.write_text(json.dumps(saved, indent=2))
    return path
