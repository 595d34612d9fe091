"""Rewards from a local sequence-classification checkpoint (any AutoModelForSequenceClassification).

How a forward pass becomes a reward (``scoring.reward_model.head``):
- ``bradley_terry``: the single logit;
- ``two_class``: the logit of class 1 (HALOs' convention), not a probability;
- ``multi_objective``: the model's ``score`` output (ArmoRM-style); its ``rewards``
  output, when present, gives one ``reward_<objective>`` column each, and
  ``objective_weights`` replaces ``score`` by a weighted sum of objectives;
- ``auto``: multi_objective when the output has ``score``, else by the number
  of logits; the log says what it chose.

Each (prompt, completion) is rendered with the reward model's OWN tokenizer and
chat template. Samples are sorted by token length and scored in right-padded
batches (HALOs scores one at a time). Under ``accelerate launch`` each process
takes every world-th sample of the length-sorted order (so all get similar
lengths), and the rows are gathered back in sample order on every process.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from iteralign.errors import UserError
from iteralign.score import ScoreResult

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- loading
def check_checkpoint(path: str | Path, trust_remote_code: bool) -> Path:
    """The checkpoint folder, or an error naming what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"scoring.reward_model.path: {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"scoring.reward_model.path: {path} is not a Hugging Face checkpoint (no config.json)"
        )
    try:
        auto_map = json.loads(config_file.read_text()).get("auto_map", {})
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"scoring.reward_model.path: {config_file} is not valid JSON ({exc})") from None
    if "AutoModelForSequenceClassification" in auto_map and not trust_remote_code:
        # Without its code transformers would load a built-in class with a random head.
        raise UserError(
            f"scoring.reward_model.path: {path} ships its own model code "
            f"({auto_map['AutoModelForSequenceClassification']}); set "
            "scoring.reward_model.trust_remote_code: true if you trust it"
        )
    return path


def load_reward_model(path: Path, trust_remote_code: bool, dtype, device):
    """The model in eval mode on ``device``; refuses a checkpoint whose head would be random."""
    from transformers import AutoModelForSequenceClassification

    from iteralign.modeling import load_pretrained

    model, info = load_pretrained(AutoModelForSequenceClassification, Path(path), trust_remote_code=trust_remote_code,
                                  dtype=dtype, output_loading_info=True)
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise UserError(
            f"scoring.reward_model.path: {path} lacks weights {missing[:5]} (they would be random); "
            "expected a trained sequence-classification reward model"
        )
    model.config.use_cache = False
    return model.to(device).eval()


# ---------------------------------------------------------------- inputs
def render_conversation(tokenizer, prompt: list[dict], output: str) -> str:
    """Prompt + completion as the reward model reads them: its chat template, assistant turn last."""
    return tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": output}], tokenize=False)


def encode_conversations(tokenizer, prompts: list[list[dict]], outputs: list[str],
                         max_length: int) -> tuple[list[list[int]], int]:
    """Token ids per sample (the template carries the special tokens) and how many were truncated.

    A sequence longer than ``max_length`` keeps its last tokens: the end of the
    completion is what a reward head reads.
    """
    encoded, truncated = [], 0
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = tokenizer(render_conversation(tokenizer, prompt, output), add_special_tokens=False).input_ids
        if len(ids) > max_length:
            ids, truncated = ids[-max_length:], truncated + 1
        encoded.append(ids)
    return encoded, truncated


def process_share(lengths: list[int], rank: int, world: int) -> list[int]:
    """Indices this process scores: every world-th of the longest-first order (disjoint, covering)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return order[rank::world]


def chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


# ---------------------------------------------------------------- outputs
LOGIT_INDEX = {"bradley_terry": 0, "two_class": 1}  # the logit a head reads as the reward


def logit_head(configured: str, width: int | None, key: str = "scoring.reward_model.head") -> str:
    """The head that reads a reward from ``width`` logits: ``configured``, or for ``auto`` by the width.

    ``key`` names the config key in the error when the head does not fit the logits.
    """
    if configured == "auto":
        if width in (1, 2):
            return "bradley_terry" if width == 1 else "two_class"
        raise UserError(f"{key}=auto: the model gives {width} logits (and no `score`); cannot tell how to "
                         f"read a reward. Set {key}")
    expected_width = LOGIT_INDEX[configured] + 1
    if width != expected_width:
        raise UserError(f"{key}={configured}: expected {expected_width} logit(s), the model gives {width}")
    return configured


def resolve_head(configured: str, output) -> str:
    """The head to read: ``configured``, or for ``auto`` what the output looks like."""
    has_score = getattr(output, "score", None) is not None
    logits = getattr(output, "logits", None)
    width = None if logits is None else logits.shape[-1]
    if configured == "multi_objective" and not has_score:
        raise UserError("scoring.reward_model.head=multi_objective: the model's output has no `score` field")
    if configured == "multi_objective" or (configured == "auto" and has_score):
        return "multi_objective"
    return logit_head(configured, width)


def read_output(output, head: str):
    """(reward ``[B]``, objectives ``[B, K]`` or None), float32 on CPU."""
    if head in LOGIT_INDEX:
        return output.logits[:, LOGIT_INDEX[head]].float().cpu(), None
    score = output.score.float().cpu()
    if score.dim() == 2 and score.shape[-1] == 1:
        score = score[:, 0]
    if score.dim() != 1:
        raise UserError(f"the reward model's `score` output has shape {tuple(score.shape)}; expected [batch]")
    rewards = getattr(output, "rewards", None)
    return score, None if rewards is None else rewards.float().cpu()


def objective_names(configured: list[str] | None, count: int) -> list[str]:
    if configured is None:
        return [f"objective_{i}" for i in range(count)]
    if len(configured) != count:
        raise UserError(
            f"scoring.reward_model.objectives lists {len(configured)} names but the model returns {count} objectives"
        )
    return list(configured)


def weight_vector(weights: dict[str, float], names: list[str]) -> list[float]:
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise UserError(f"scoring.reward_model.objective_weights names {unknown}; the objectives are {names}")
    return [float(weights.get(name, 0.0)) for name in names]


# ---------------------------------------------------------------- the scorer
def _process_layout(use_gpu: bool):
    """(rank, world size, device): accelerate's when launched by it, else this process alone."""
    from iteralign.modeling import default_device

    device = default_device(use_gpu)
    gpu = device.type == "cuda"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not gpu)  # on CPU: gloo, one process per launched rank
        return state.process_index, state.num_processes, state.device
    if use_gpu and not gpu:
        log.warning("scoring.gpus > 0 but no GPU is visible: scoring on CPU")
    return 0, 1, device


def _dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


class RewardModelScorer:
    """Scores with ``scoring.reward_model`` (a dict of that section). The model loads in :meth:`score`."""

    def __init__(self, cfg: dict, use_gpu: bool = False):
        self.cfg = cfg
        self.path = check_checkpoint(cfg["path"], cfg["trust_remote_code"])
        self.name = f"reward_model:{self.path}"
        self.use_gpu = use_gpu
        self.head: str | None = None
        self.progress = True  # a progress bar on rank 0

    def score(self, prompts: list[list[dict]], outputs: list[str]) -> ScoreResult:
        from iteralign.modeling import load_tokenizer

        rank, world, device = _process_layout(self.use_gpu)
        trust = self.cfg["trust_remote_code"]
        tokenizer = load_tokenizer(self.path, trust)  # the reward model's own tokenizer and template
        encoded, truncated = encode_conversations(tokenizer, prompts, outputs, self.cfg["max_length"])
        if truncated and rank == 0:
            log.warning("%d of %d samples are longer than scoring.reward_model.max_length=%d tokens: "
                        "scored on their last tokens", truncated, len(encoded), self.cfg["max_length"])
        model = load_reward_model(self.path, trust, _dtype(self.cfg["dtype"], device), device)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # heads find the last token by it
        mine = process_share([len(ids) for ids in encoded], rank, world)
        rows = self._forward(model, encoded, mine, tokenizer.pad_token_id, device, show=rank == 0 and self.progress)
        if world > 1:
            from accelerate.utils import gather_object

            rows = gather_object(rows)
        return self._result(rows, len(encoded), truncated, world, sum(len(ids) for ids in encoded))

    def _forward(self, model, encoded, indices, pad_id, device, show: bool) -> list[tuple]:
        """(index, reward, objectives or None) for each index, length-sorted batches."""
        import torch
        from tqdm import tqdm

        from iteralign.tokens import pad

        rows = []
        with torch.inference_mode(), tqdm(total=len(indices), desc="score", unit="sample", disable=not show) as bar:
            for batch in chunks(indices, self.cfg["batch_size"]):
                input_ids, attention_mask = pad([encoded[i] for i in batch], pad_id)  # heads expect right padding
                output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
                if self.head is None:
                    self.head = resolve_head(self.cfg["head"], output)
                    if show:
                        log.info("reward model head: %s -> %s", self.cfg["head"], self.head)
                reward, objectives = read_output(output, self.head)
                for row, index in enumerate(batch):
                    values = None if objectives is None else tuple(objectives[row].tolist())
                    rows.append((index, float(reward[row]), values))
                bar.update(len(batch))
        return rows

    def _result(self, rows: list[tuple], count: int, truncated: int, world: int, tokens: int) -> ScoreResult:
        rows = sorted(rows, key=lambda r: r[0])
        if [r[0] for r in rows] != list(range(count)):
            raise RuntimeError(f"{self.name}: gathered {len(rows)} rows for {count} samples from {world} processes")
        rewards = [r[1] for r in rows]
        objectives: dict[str, list[float]] = {}
        if rows and rows[0][2] is not None:
            names = objective_names(self.cfg["objectives"], len(rows[0][2]))
            columns = list(zip(*(r[2] for r in rows), strict=True))
            objectives = {name: list(col) for name, col in zip(names, columns, strict=True)}
            if self.cfg["objective_weights"]:
                weights = weight_vector(self.cfg["objective_weights"], names)
                rewards = [sum(w * v for w, v in zip(weights, r[2], strict=True)) for r in rows]
        elif self.cfg["objective_weights"] and rows:
            raise UserError("scoring.reward_model.objective_weights is set but the model has no `rewards` output")
        errors: list[str | None] = [None if math.isfinite(r) else f"reward model returned {r}" for r in rewards]
        rewards = [r if math.isfinite(r) else math.nan for r in rewards]
        usage = {"samples": count, "tokens": tokens, "truncated": truncated, "processes": world,
                 "head": self.head}
        return ScoreResult(rewards, errors, objectives, usage)
